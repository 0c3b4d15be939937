"""Scaling benchmark: N `rescat serve` instances, M client processes, one run.

    python -m bench.scale [--servers 1] [--clients 4] [--seconds 5] [--big-mib 32]

Each phase runs M client processes against the instances (round robin) for a
fixed time, then the same M processes against MongoDB directly (the baseline):
4 KiB PUT vs `insert_one`, 4 KiB GET vs `find_one`, `--big-mib` PUT vs GridFS
`upload_from_stream`, GET vs `open_download_stream().read()`. Prints each rate,
its ratio to the baseline, and the service CPU per small PUT (CPU seconds of
the `rescat serve` processes over the PUTs they answered). With more cores,
raise --servers and --clients to see how it scales.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gridfs
import httpx
import psutil
from pymongo import MongoClient

from bench.mongo import throwaway_mongod
from catalog.mongod import free_port

MiB = 1024 * 1024


@contextmanager
def servers(uri: str, database: str, n: int) -> Iterator[list[tuple[str, int]]]:
    procs: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for _ in range(n):
            port = free_port()
            cmd = [
                sys.executable, "-c", "from cli.main import main; main()",
                "--mongo-uri", uri, "--database", database,
                "serve", "--port", str(port), "--no-auth", "--log-level", "warning",
            ]  # fmt: skip
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            procs.append((proc, f"http://127.0.0.1:{port}"))
        for _, url in procs:
            for _ in range(300):
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                raise RuntimeError(f"rescat serve at {url} did not start")
        yield [(url, proc.pid) for proc, url in procs]
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def client_loop(args: tuple[str, str, str, int, float, int, str]) -> int:
    """One client process: run `op` until the deadline; returns operations done."""
    op, target, database, worker, seconds, size, run = args
    deadline = time.monotonic() + seconds
    done = 0
    payload = os.urandom(size)
    kept = 64 if size <= MiB else 4  # objects preloaded per worker for the GET phases
    if target.startswith("http"):
        with httpx.Client(base_url=target + "/v1/environments/scale", timeout=120) as http:
            while time.monotonic() < deadline:
                key = f"{run}/{worker}/{done % kept if op == 'get' else done}"
                if op == "put":
                    r = http.put(f"/resources/{key}", content=payload)
                else:
                    r = http.get(f"/resources/{key}")
                if r.status_code >= 400:  # (httpx's error does not cross a process pool)
                    raise RuntimeError(f"{op} {key}: {r.status_code} {r.text[:200]}")
                done += 1
        return done
    client: MongoClient[Any] = MongoClient(target)
    db = client[database]
    bucket = gridfs.GridFSBucket(db, bucket_name="raw")
    try:
        while time.monotonic() < deadline:
            key = f"{run}/{worker}/{done}"
            if op == "put" and size > MiB:
                bucket.upload_from_stream(key, payload)
            elif op == "put":
                db.raw.insert_one({"k": key, "data": payload})
            elif size > MiB:
                bucket.open_download_stream_by_name(f"{run}/{worker}/{done % 4}").read()
            else:
                db.raw.find_one({"k": f"{run}/{worker}/{done % 64}"})
            done += 1
    finally:
        client.close()
    return done


def phase(
    pool: Any, op: str, targets: list[str], database: str, m: int, seconds: float, size: int
) -> tuple[float, str]:
    run = uuid.uuid4().hex[:8]
    if op == "get":  # the objects the readers read, written first
        fill = [("put", targets[w % len(targets)], database, w, 0.0, size, run) for w in range(m)]
        preload(fill, 64 if size <= MiB else 4)
    jobs = [(op, targets[w % len(targets)], database, w, seconds, size, run) for w in range(m)]
    start = time.monotonic()
    total = sum(pool.map(client_loop, jobs))
    return total / (time.monotonic() - start), run


def preload(jobs: list[tuple[str, str, str, int, float, int, str]], count: int) -> None:
    for _, target, database, worker, _, size, run in jobs:
        payload = os.urandom(size)
        if target.startswith("http"):
            with httpx.Client(base_url=target + "/v1/environments/scale", timeout=120) as http:
                for i in range(count):
                    http.put(f"/resources/{run}/{worker}/{i}", content=payload).raise_for_status()
            continue
        client: MongoClient[Any] = MongoClient(target)
        db = client[database]
        bucket = gridfs.GridFSBucket(db, bucket_name="raw")
        for i in range(count):
            if size > MiB:
                bucket.upload_from_stream(f"{run}/{worker}/{i}", payload)
            else:
                db.raw.insert_one({"k": f"{run}/{worker}/{i}", "data": payload})
        db.raw.create_index("k")
        client.close()


def cpu(pids: list[int]) -> float:
    return sum(sum(psutil.Process(p).cpu_times()[:2]) for p in pids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--big-mib", type=int, default=32)
    args = parser.parse_args()
    database = f"scale_{uuid.uuid4().hex[:6]}"
    m = args.clients
    with (
        throwaway_mongod() as uri,
        servers(uri, database, args.servers) as running,
        mp.get_context("spawn").Pool(m) as pool,
    ):
        urls = [u for u, _ in running]
        pids = [p for _, p in running]
        print(f"{args.servers} rescat serve, {m} client processes, {os.cpu_count()} cores")
        for op, size in (
            ("put", 4096),
            ("get", 4096),
            ("put", args.big_mib * MiB),
            ("get", args.big_mib * MiB),
        ):
            before = cpu(pids)
            ours, _ = phase(pool, op, urls, database, m, args.seconds, size)
            spent = cpu(pids) - before
            raw, _ = phase(pool, op, [uri], database + "_raw", m, args.seconds, size)
            label = (
                f"{op.upper()} {size // 1024} KiB"
                if size <= MiB
                else f"{op.upper()} {size // MiB} MiB"
            )
            unit = "ops/s" if size <= MiB else "MiB/s"
            scale = 1 if size <= MiB else size / MiB
            extra = ""
            if op == "put" and size <= MiB:
                per_put = spent / max(ours * args.seconds, 1) * 1000
                extra = f"; service CPU per PUT {per_put:.2f} ms"
            print(
                f"{label:12s} rescat {ours * scale:8.1f} {unit}, raw {raw * scale:8.1f} {unit}"
                f" -> {ours / raw:.2f}x{extra}",
                flush=True,
            )


if __name__ == "__main__":
    main()
