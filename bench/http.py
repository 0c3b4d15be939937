"""HTTP service benchmark: one run, ratios against baselines measured in the same run.

1. PUT and GET of a 256 MiB object over HTTP (CatalogClient against `rescat
   serve` in a subprocess) vs the same through an in-process ManagedStorage.
   Target: >= 0.8x.
2. Dedup upload of a 1 GiB file the server already has vs a full upload of it.
   Target: <= 0.05x the time.
3. 4 KiB PUTs and GETs per second with 16 concurrent clients vs raw pymongo
   `insert_one`s / `find_one`s of 4 KiB documents with 16 threads. Targets:
   >= 0.3x (PUT), >= 0.5x (GET). With --etcd-url, the same workload against
   etcd's HTTP/JSON gateway (same httpx clients), as rescat/etcd ratios.
4. The seed's workload (go-storage-server): 16 clients each create, read,
   replace, read and delete blobs of 1 KiB-1 MiB (log-uniform, distinct bytes)
   through the seed's API (`rescat serve --compat-store`). With `--seed-url URL`
   the same workload, in the same run, against a running go-storage-server
   (alternating rounds), and the rescat/seed ratios.

Starts its own throwaway mongod (fresh dbpath in a temp dir, deleted after).

    .venv/bin/python bench/http.py [--size-mib 256] [--dedup-mib 1024] [--seconds 8]
        [--seed-url http://127.0.0.1:7777] [--only-seed]
    .venv/bin/python bench/http.py --small-only --seconds 3 [--etcd-url http://127.0.0.1:2379]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named http.py: run as a script, its directory would shadow the
# standard library's `http` package (which httpx imports). Drop it from the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager, suppress  # noqa: E402
from typing import Any, BinaryIO, cast  # noqa: E402

import blake3  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402
from pymongo import MongoClient  # noqa: E402

from bench.ceiling import ceiling_server  # noqa: E402
from catalog import connect  # noqa: E402
from catalog.mongod import free_port, start_mongod, stop_process, uri_for, wait_primary  # noqa: E402
from service.client import CatalogClient  # noqa: E402

MiB = 1024 * 1024


class Sink:
    """A write-only, non-seekable file object that discards what it gets."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)

    def seekable(self) -> bool:
        return False


def random_file(path: Path, size: int) -> str:
    hasher = blake3.blake3()
    seed = os.urandom(32)
    with open(path, "wb") as out:
        for i in range(0, size, 16 * MiB):
            # Fast distinct bytes: SHAKE-256 keystream of (seed, block index).
            block = hashlib.shake_256(seed + i.to_bytes(8, "big")).digest(min(16 * MiB, size - i))
            hasher.update(block)
            out.write(block)
    return str(hasher.hexdigest())


@contextmanager
def rss_peak(pid: int) -> Iterator[list[int]]:
    """Sample a process's RSS every 20 ms; yields [peak_bytes] (filled on exit)."""
    proc = psutil.Process(pid)
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def median(values: list[float]) -> float:
    return statistics.median(values)


def hash_file(path: Path) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while data := f.read(4 * MiB):
            hasher.update(data)
    return str(hasher.hexdigest())


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextmanager
def serve(uri: str, database: str, *extra: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    cmd = [
        sys.executable, "-c", "from cli.main import main; main()",
        "--mongo-uri", uri, "--database", database,
        "serve", "--port", str(port), "--no-auth", "--log-level", "warning", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise RuntimeError("rescat serve did not start")
        yield url, proc.pid
    finally:
        stop_process(proc, 20)


class CpuMeter:
    """CPU milliseconds per operation of each process of a run: where a rate's time goes.

    On a small machine the clients, the service and mongod share the cores, so
    a rate over HTTP is bounded by the sum of the three; this says which part
    is whose (`clients` is the benchmark's own process, whose threads are them).
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self._procs = {who: psutil.Process(pid) for who, pid in pids.items()}
        self._before: dict[str, float] = {}
        self.per_op: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {who: sum(p.cpu_times()[:2]) for who, p in self._procs.items()}

    def start(self) -> None:
        self._before = self._now()

    def stop(self, ops: int) -> None:
        after = self._now()
        self.per_op = {w: (after[w] - self._before[w]) * 1000 / max(ops, 1) for w in after}

    def text(self) -> str:
        parts = [f"{who} {ms:.2f}" for who, ms in self.per_op.items()]
        return ", ".join(parts) + f" (sum {sum(self.per_op.values()):.2f}) ms"


def rate(
    workers: int,
    seconds: float,
    make: Callable[[int], Callable[[int], None]],
    meter: CpuMeter | None = None,
) -> float:
    """Operations per second of `workers` threads each calling its op in a loop.

    `make(w)` (setup, e.g. preloading what a reader reads) runs before the clock
    starts; `meter`, if given, measures the CPU spent while the clock runs.
    """
    counts = [0] * workers
    errors: list[BaseException] = []
    ready = threading.Barrier(workers + 1)
    go = threading.Event()
    deadline = [0.0]

    def run(w: int) -> None:
        try:
            op = make(w)
        except BaseException as exc:
            errors.append(exc)
            ready.abort()
            raise
        ready.wait()
        go.wait()
        try:
            i = 0
            while time.perf_counter() < deadline[0]:
                op(i)
                i += 1
            counts[w] = i
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    with suppress(threading.BrokenBarrierError):
        ready.wait()
    if meter is not None:
        meter.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    go.set()
    for t in threads:
        t.join()
    elapsed = max(time.perf_counter() - start, seconds)
    if meter is not None:
        meter.stop(sum(counts))
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


# -- 4. the seed's workload -------------------------------------------------------------
SEED_CLIENTS = 16
SEED_OPS = ("create", "get", "replace", "get", "delete")
SEED_OK = {"create": (201, 204), "replace": (200,), "get": (200,), "delete": (200, 204)}


def seed_payloads(count: int = 64) -> list[bytes]:
    """Blobs of 1 KiB-1 MiB, log-uniform, from a fixed seed (both servers get the same)."""
    import random

    rng = random.Random(7)
    return [rng.randbytes(int(1024 * 2 ** rng.uniform(0, 10))) for _ in range(count)]


def seed_round(store: str, seconds: float, payloads: list[bytes]) -> dict[str, Any]:
    """SEED_CLIENTS clients cycling create/get/replace/get/delete for `seconds`."""
    latencies: dict[str, list[float]] = {op: [] for op in set(SEED_OPS)}
    moved = [0]
    lock = threading.Lock()
    stamp = os.urandom(4)

    def make(w: int) -> Callable[[int], None]:
        client = httpx.Client(timeout=60)

        def cycle(i: int) -> None:
            name = f"w{w}-{i}"
            # Distinct bytes per write, so that rescat cannot deduplicate them away.
            first = stamp + w.to_bytes(2, "big") + i.to_bytes(6, "big")
            second = first[::-1]
            body = payloads[(w * 7919 + i) % len(payloads)]
            local: list[tuple[str, float, int]] = []
            for op in SEED_OPS:
                content = None
                if op in ("create", "replace"):
                    content = (first if op == "create" else second) + body[12:]
                method = {"create": "POST", "replace": "PUT", "get": "GET", "delete": "DELETE"}
                start = time.perf_counter()
                answer = client.request(method[op], f"{store}/{name}", content=content)
                took = time.perf_counter() - start
                if answer.status_code not in SEED_OK[op]:
                    raise RuntimeError(f"{op} {name}: HTTP {answer.status_code} {answer.text[:99]}")
                if op == "get" and len(answer.content) != len(body):
                    raise RuntimeError(f"get {name}: {len(answer.content)} bytes, not {len(body)}")
                local.append((op, took, len(content or answer.content)))
            with lock:
                for op, took, size in local:
                    latencies[op].append(took)
                    moved[0] += size

        return cycle

    cycles = rate(SEED_CLIENTS, seconds, make)
    return {
        "ops": cycles * len(SEED_OPS),
        "mib": moved[0] / MiB / seconds,
        "p50": {op: median(v) * 1000 for op, v in latencies.items() if v},
    }


def seed_workload(
    url: str, seed_url: str | None, seconds: float, results: list[tuple[str, float, str, bool]]
) -> None:
    payloads = seed_payloads()
    targets = {"rescat": url + "/store"}
    if seed_url:
        targets["seed"] = seed_url.rstrip("/") + "/store"
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for _ in range(3):  # alternate the servers; compare medians
        for name, store in targets.items():
            rounds[name].append(seed_round(store, seconds, payloads))
    summary: dict[str, dict[str, float]] = {}
    for name, runs in rounds.items():
        ops = median([r["ops"] for r in runs])
        mib = median([r["mib"] for r in runs])
        p50 = {op: median([r["p50"][op] for r in runs]) for op in runs[0]["p50"]}
        summary[name] = {"ops": ops, "mib": mib, **p50}
        lat = ", ".join(f"{op} {p50[op]:.1f}" for op in ("create", "replace", "get", "delete"))
        print(
            f"seed workload on {name}: {SEED_CLIENTS} clients, 1 KiB-1 MiB: "
            f"{'/'.join(str(round(r['ops'])) for r in runs)} ops/s, {mib:.1f} MiB/s; "
            f"p50 ms: {lat}"
        )
    if "seed" in summary:
        ours, theirs = summary["rescat"], summary["seed"]
        for key, label in (("ops", "ops/s"), ("mib", "MiB/s")):
            ratio = ours[key] / theirs[key]
            print(f"seed workload rescat/seed {label}: {ratio:.2f}x")
            results.append((f"seed workload {label} rescat/seed", ratio, "-", True))
        for op in ("create", "replace", "get", "delete"):
            print(f"  p50 {op}: rescat/seed {ours[op] / theirs[op]:.2f}x (lower is faster)")


SMALL = 4096
CLIENTS = 16
KEPT = 64  # objects per client that the GET phases read in turn
_METERED = ("raw insert_one", "HTTP PUT", "raw find_one", "HTTP GET")


CEILINGS = {  # bench.ceiling's modes, each what it serves with
    "null": "no database",
    "pymongo": "one pymongo call per request",
    "async": "one AsyncMongoClient call per request",
    "asyncput": "a small PUT's database work alone, batched on asyncio",
}


def small_objects(
    url: str, uri: str, ms: Any, seconds: float, etcd_url: str | None, pids: dict[str, int]
) -> list[tuple[str, float, str, bool]]:
    """4 KiB PUTs and GETs, 16 client threads: rescat over HTTP vs raw pymongo (and etcd).

    Every HTTP client (rescat's and etcd's) is a plain httpx.Client per thread
    with keep-alive, so the only difference is the server behind it.
    """
    results: list[tuple[str, float, str, bool]] = []

    def http_put(w: int, server: str = url) -> Callable[[int], None]:
        base = f"{server}/v1/environments/small/resources"
        c = httpx.Client(timeout=60)
        payload = os.urandom(SMALL)

        def op(i: int) -> None:
            c.put(f"{base}/w{w}/{i}", content=payload).raise_for_status()

        return op

    def http_get(w: int, server: str = url) -> Callable[[int], None]:
        base = f"{server}/v1/environments/small/resources"
        c = httpx.Client(timeout=60)
        payload = os.urandom(SMALL)
        for i in range(KEPT):
            c.put(f"{base}/r{w}/{i}", content=payload).raise_for_status()

        def op(i: int) -> None:
            r = c.get(f"{base}/r{w}/{i % KEPT}")
            r.raise_for_status()
            assert len(r.content) == SMALL

        return op

    raw_client: MongoClient[Any] = MongoClient(uri)
    raw = raw_client["bench_raw"]["docs"]
    raw.create_index([("w", 1), ("i", 1)])

    def raw_put(w: int) -> Callable[[int], None]:
        payload = os.urandom(SMALL)
        return lambda i: (raw.insert_one({"w": w, "i": i, "data": payload}), None)[1]

    def raw_get(w: int) -> Callable[[int], None]:
        payload = os.urandom(SMALL)
        raw.insert_many([{"w": -1 - w, "i": i, "data": payload} for i in range(KEPT)])

        def op(i: int) -> None:
            assert raw.find_one({"w": -1 - w, "i": i % KEPT}) is not None

        return op

    def core_put(w: int) -> Callable[[int], None]:
        payload = os.urandom(SMALL)
        return lambda i: (ms.put_for_environment("core", f"w{w}/{i}", io.BytesIO(payload)), None)[1]

    meters = {what: CpuMeter({"clients": os.getpid(), **pids}) for what in _METERED}
    put_raw = rate(CLIENTS, seconds, raw_put, meters["raw insert_one"])
    put_http = rate(CLIENTS, seconds, http_put, meters["HTTP PUT"])
    put_core = rate(CLIENTS, seconds, core_put)
    get_raw = rate(CLIENTS, seconds, raw_get, meters["raw find_one"])
    get_http = rate(CLIENTS, seconds, http_get, meters["HTTP GET"])
    raw_client.close()
    ceilings: dict[str, tuple[float, float]] = {}
    for mode in CEILINGS:  # the same clients against bench.ceiling's servers
        with ceiling_server(mode, uri) as floor_url:
            ceilings[mode] = (
                rate(CLIENTS, seconds, functools.partial(_on, http_put, floor_url)),
                rate(CLIENTS, seconds, functools.partial(_on, http_get, floor_url)),
            )
    put_ratio, get_ratio = put_http / put_raw, get_http / get_raw
    print(
        f"4 KiB PUT, {CLIENTS} concurrent: HTTP {put_http:.0f}/s, raw pymongo insert_one "
        f"{put_raw:.0f}/s -> {put_ratio:.2f}x (target >= 0.3x); in-process ManagedStorage "
        f"puts {put_core:.0f}/s (HTTP / in-process {put_http / put_core:.2f}x)",
        flush=True,
    )
    print(
        f"4 KiB GET, {CLIENTS} concurrent: HTTP {get_http:.0f}/s, raw pymongo find_one "
        f"{get_raw:.0f}/s -> {get_ratio:.2f}x (target >= 0.5x)",
        flush=True,
    )
    for mode, what in CEILINGS.items():
        put_c, get_c = ceilings[mode]
        print(
            f"ceiling ({what}; same server stack and clients, bench.ceiling --mode {mode}): "
            f"PUT {put_c:.0f}/s ({put_c / put_raw:.2f}x raw), GET {get_c:.0f}/s "
            f"({get_c / get_raw:.2f}x raw) -> rescat reaches PUT {put_http / put_c:.2f}x, "
            f"GET {get_http / get_c:.2f}x of it",
            flush=True,
        )
    print(f"CPU per operation, {CLIENTS} clients (the cores all of them share: {os.cpu_count()}):")
    for what, meter in meters.items():
        print(f"  {what:15s} {meter.text()}", flush=True)
    results.append(("4 KiB PUT/s HTTP / raw inserts", put_ratio, ">= 0.3", put_ratio >= 0.3))
    results.append(("4 KiB GET/s HTTP / raw find_one", get_ratio, ">= 0.5", get_ratio >= 0.5))
    for mode in CEILINGS:
        put_c, get_c = ceilings[mode]
        results.append((f"ceiling {mode}: PUT/s / raw inserts", put_c / put_raw, "", True))
        results.append((f"ceiling {mode}: GET/s / raw find_one", get_c / get_raw, "", True))
    if etcd_url:
        put_etcd, get_etcd = etcd_rates(etcd_url, seconds)
        print(
            f"etcd {etcd_url} (HTTP/JSON gateway, same httpx clients): PUT {put_etcd:.0f}/s, "
            f"GET {get_etcd:.0f}/s -> rescat/etcd PUT {put_http / put_etcd:.2f}x, "
            f"GET {get_http / get_etcd:.2f}x",
            flush=True,
        )
        results.append(("4 KiB PUT/s rescat / etcd", put_http / put_etcd, "", True))
        results.append(("4 KiB GET/s rescat / etcd", get_http / get_etcd, "", True))
    return results


def _on(
    make: Callable[[int, str], Callable[[int], None]], server: str, w: int
) -> Callable[[int], None]:
    return make(w, server)


def etcd_rates(etcd_url: str, seconds: float) -> tuple[float, float]:
    """4 KiB puts and ranges per second through etcd's gateway (POST /v3/kv/put, /v3/kv/range)."""
    import base64

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    run = os.urandom(4).hex()

    def etcd_put(w: int) -> Callable[[int], None]:
        c = httpx.Client(base_url=etcd_url, timeout=60)
        value = b64(os.urandom(SMALL))

        def op(i: int) -> None:
            key = b64(f"bench/{run}/w{w}/{i}".encode())
            c.post("/v3/kv/put", json={"key": key, "value": value}).raise_for_status()

        return op

    def etcd_get(w: int) -> Callable[[int], None]:
        c = httpx.Client(base_url=etcd_url, timeout=60)
        value = b64(os.urandom(SMALL))
        for i in range(KEPT):
            key = b64(f"bench/{run}/r{w}/{i}".encode())
            c.post("/v3/kv/put", json={"key": key, "value": value}).raise_for_status()

        def op(i: int) -> None:
            key = b64(f"bench/{run}/r{w}/{i % KEPT}".encode())
            r = c.post("/v3/kv/range", json={"key": key})
            r.raise_for_status()
            assert len(base64.b64decode(r.json()["kvs"][0]["value"])) == SMALL

        return op

    put = rate(CLIENTS, seconds, etcd_put)
    get = rate(CLIENTS, seconds, etcd_get)
    with httpx.Client(base_url=etcd_url, timeout=60) as c:  # leave etcd as it was
        prefix = f"bench/{run}/".encode()
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        c.post("/v3/kv/deleterange", json={"key": b64(prefix), "range_end": b64(end)})
    return put, get


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--dedup-mib", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--seed-url", default=None, help="a running go-storage-server")
    parser.add_argument("--only-seed", action="store_true", help="run section 4 only")
    parser.add_argument(
        "--small-only",
        action="store_true",
        help="run only the 4 KiB PUT/GET part (16 clients), e.g. with --seconds 3",
    )
    parser.add_argument(
        "--etcd-url",
        default=None,
        help="also run the 4 KiB part against etcd's HTTP/JSON gateway at this URL "
        "(e.g. http://127.0.0.1:2379) and print rescat/etcd ratios",
    )
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rescat-bench-http-"))
    dbpath = tmp / "db"
    port = free_port()
    mongod = start_mongod(dbpath, port)
    results: list[tuple[str, float, str, bool]] = []
    try:
        wait_primary(port, mongod)
        uri = uri_for(port)
        ms = connect(uri, "bench")
        print(f"mongod {uri}, dbpath {dbpath}", flush=True)

        if args.only_seed:
            with serve(uri, "bench", "--compat-store", "seed") as (url, _):
                seed_workload(url, args.seed_url, args.seconds, results)
            summary(results)
            return
        if args.small_only:
            with serve(uri, "bench") as (url, server_pid):
                pids = {"service": server_pid, "mongod": mongod.pid}
                results.extend(small_objects(url, uri, ms, args.seconds, args.etcd_url, pids))
            return
        size = args.size_mib * MiB
        obj = tmp / "object.bin"
        digest = random_file(obj, size)
        print(f"object {args.size_mib} MiB", flush=True)
        with (
            serve(uri, "bench", "--compat-store", "seed") as (url, server_pid),
            CatalogClient(url, timeout=600) as client,
        ):
            # -- 1. 256 MiB PUT and GET ---------------------------------------------
            def inproc_put() -> None:
                with open(obj, "rb") as f:
                    ms.put_for_environment_and_check_hash("b", "inproc", f, size, digest)

            def inproc_get() -> None:
                reader, _ = ms.get_for_environment("b", "inproc")
                sink = Sink()
                for chunk in reader.iter_chunks():  # type: ignore[attr-defined]
                    sink.write(chunk)
                reader.close()

            # Warm up mongod (a fresh server writes far faster than a steady one).
            inproc_put()
            ms.remove_for_environment("b", "inproc")
            put_in, put_http, get_in, get_http = [], [], [], []
            peak_put, peak_get = 0, 0

            def settle() -> None:
                # Checkpoint first: otherwise each write pays for the eviction of the last.
                ms.db.client.admin.command("fsync")

            for _ in range(5):  # alternate; compare medians
                settle()
                put_in.append(timed(inproc_put))
                settle()
                get_in.append(timed(inproc_get))
                ms.remove_for_environment("b", "inproc")  # so the HTTP put stores anew
                settle()
                with rss_peak(server_pid) as peak:
                    put_http.append(timed(lambda: client.put("b", "http", obj, hash=digest)))
                peak_put = max(peak_put, peak[0])
                settle()
                sink = cast(BinaryIO, Sink())
                with rss_peak(server_pid) as peak:
                    get_http.append(timed(functools.partial(client.download, "b", "http", sink)))
                peak_get = max(peak_get, peak[0])
                client.remove("b", "http")
            mbs = size / MiB
            put_ratio = median(put_in) / median(put_http)
            get_ratio = median(get_in) / median(get_http)

            def speeds(times: list[float]) -> str:
                return "/".join(f"{mbs / t:.0f}" for t in times)

            print(
                f"PUT {args.size_mib} MiB: in-process {speeds(put_in)} MiB/s, "
                f"HTTP {speeds(put_http)} MiB/s -> median ratio {put_ratio:.2f}x "
                f"(target >= 0.8x); server peak RSS {peak_put / MiB:.0f} MiB"
            )
            print(
                f"GET {args.size_mib} MiB: in-process {speeds(get_in)} MiB/s, "
                f"HTTP {speeds(get_http)} MiB/s -> median ratio {get_ratio:.2f}x "
                f"(target >= 0.8x); server peak RSS {peak_get / MiB:.0f} MiB"
            )
            results.append(("PUT HTTP / in-process", put_ratio, ">= 0.8", put_ratio >= 0.8))
            results.append(("GET HTTP / in-process", get_ratio, ">= 0.8", get_ratio >= 0.8))
            obj.unlink()

            # -- 2. dedup upload of 1 GiB ---------------------------------------------
            big = tmp / "big.bin"
            random_file(big, args.dedup_mib * MiB)
            full_result: list[Any] = []
            dedup_result: list[Any] = []
            settle()
            full = timed(lambda: full_result.append(client.upload("b", "full", big)))
            settle()
            dedup = timed(lambda: dedup_result.append(client.upload("b", "dedup", big)))
            hash_only = timed(lambda: hash_file(big))
            assert not full_result[0].deduplicated and dedup_result[0].deduplicated
            dedup_ratio = dedup / full
            print(
                f"upload {args.dedup_mib} MiB: full {full:.2f} s "
                f"({full_result[0].bytes_sent / MiB:.0f} MiB sent), dedup {dedup:.3f} s "
                f"({dedup_result[0].bytes_sent} B sent; of which hashing the file locally "
                f"{hash_only:.3f} s) -> {dedup_ratio:.3f}x (target <= 0.05x)"
            )
            results.append(
                ("dedup / full upload time", dedup_ratio, "<= 0.05", dedup_ratio <= 0.05)
            )
            client.remove("b", "full")
            client.remove("b", "dedup")
            big.unlink()

            pids = {"service": server_pid, "mongod": mongod.pid}
            results.extend(small_objects(url, uri, ms, args.seconds, args.etcd_url, pids))

            # -- 4. the seed's workload ------------------------------------------------------
            seed_workload(url, args.seed_url, args.seconds, results)
    finally:
        stop_process(mongod)
        shutil.rmtree(tmp, ignore_errors=True)
        if args.small_only:
            summary(results)

    summary(results)


def summary(results: list[tuple[str, float, str, bool]]) -> None:
    print("\nsummary")
    for name, value, target, ok in results:
        verdict = ("met" if ok else "MISSED") if target else ""
        print(f"  {name:34s} {value:6.3f}x  target {target or '-':7s} {verdict}")


if __name__ == "__main__":
    main()
