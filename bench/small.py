"""Small objects in-process: rescat puts and gets against raw pymongo, in one run.

    python -m bench.small [--threads 16] [--seconds 5] [--size 4096]

Baselines, from the same threads on the same server: `insert_one` of a
document holding the bytes (the default write concern, majority, like ours)
and `find_one` by key. Also times one put and one read of content at the
sizes the inline limit was chosen among, stored inline and in GridFS, so the
limit can be re-measured on other machines. Target (issue 9): puts >= 0.5x
raw inserts.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database

from bench.mongo import throwaway_mongod
from catalog import ManagedStorage
from storage import GridFSStorage


def rate(threads: int, seconds: float, op: Callable[[int, int], None]) -> float:
    """Operations per second of `threads` threads calling op(thread, i) for `seconds`."""
    stop = threading.Event()
    counts = [0] * threads

    def run(t: int) -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            op(t, i)
            counts[t] += 1

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    time.sleep(seconds)
    stop.set()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


def small_ops(db: Database[Any], threads: int, seconds: float, size: int) -> dict[str, float]:
    ms = ManagedStorage(db, GridFSStorage(db))
    raw = db["raw"]
    raw.create_index("k", unique=True)
    ids = iter(range(1 << 30))
    run_id = ""

    def raw_put(t: int, i: int) -> None:
        raw.insert_one({"k": f"{run_id}/{t}/{i}", "data": os.urandom(size)})

    def our_put(t: int, i: int) -> None:
        ms.put_for_environment("e", f"{run_id}/{t}/{i}", io.BytesIO(os.urandom(size)))

    def raw_get(t: int, i: int) -> None:
        raw.find_one({"k": f"r0/{t}/{i % 50}"})

    def our_get(t: int, i: int) -> None:
        reader, _ = ms.get_for_environment("e", f"r1/{t}/{i % 50}")
        reader.read()

    out: dict[str, float] = {}
    # Baseline and candidate interleaved twice, each on fresh keys; best of the two.
    for name, op in (("raw_put", raw_put), ("put", our_put)) * 2:
        run_id = f"r{next(ids)}"
        out[name] = max(out.get(name, 0.0), rate(threads, seconds, op))
    for name, op in (("raw_get", raw_get), ("get", our_get)) * 2:
        out[name] = max(out.get(name, 0.0), rate(threads, seconds, op))
    return {
        "threads": threads,
        "size": size,
        "raw_insert_per_s": round(out["raw_put"]),
        "put_per_s": round(out["put"]),
        "raw_find_one_per_s": round(out["raw_get"]),
        "get_per_s": round(out["get"]),
        "put_vs_raw_insert": round(out["put"] / out["raw_put"], 3),
        "get_vs_raw_find_one": round(out["get"] / out["raw_get"], 3),
    }


def threshold(db: Database[Any], rounds: int = 30) -> list[dict[str, Any]]:
    """Put and read of one object at each candidate size, inline vs GridFS (medians, ms)."""
    rows = []
    for kib in (4, 16, 32, 64, 128):
        size = kib * 1024
        row: dict[str, Any] = {"KiB": kib}
        for mode, limit in (("inline", 1 << 20), ("gridfs", 0)):
            ms = ManagedStorage(db, GridFSStorage(db), inline_max=limit)
            puts, gets = [], []
            for i in range(rounds):
                data = os.urandom(size)
                t0 = time.perf_counter()
                ms.put_for_environment("t", f"{mode}/{kib}/{i}", io.BytesIO(data))
                t1 = time.perf_counter()
                reader, _ = ms.get_for_environment("t", f"{mode}/{kib}/{i}")
                reader.read()
                t2 = time.perf_counter()
                puts.append(t1 - t0)
                gets.append(t2 - t1)
            row[f"{mode}_put_ms"] = round(statistics.median(puts) * 1000, 2)
            row[f"{mode}_get_ms"] = round(statistics.median(gets) * 1000, 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    with throwaway_mongod() as uri:
        client: MongoClient[Any] = MongoClient(uri, maxPoolSize=64)
        db = client[f"bench_{uuid.uuid4().hex[:8]}"]
        try:
            print("inline limit: one put + read, median ms")
            for row in threshold(db):
                print("  ", row)
            result = small_ops(db, args.threads, args.seconds, args.size)
            for key, value in result.items():
                print(f"{key}: {value}")
        finally:
            client.drop_database(db.name)
            client.close()


if __name__ == "__main__":
    main()
