"""Core benchmark: rescat's storage paths against pymongo's GridFS, in one run.

    python -m bench.core [--mib 256] [--rss-mib 1024] [--rounds 2]

Prints ratios against baselines measured in the same run (these machines are
noisy, so absolute times mean little). Targets (issue 2): put >= 1.5x pymongo
upload_from_stream, read >= 1.0x open_download_stream().read(), second put of
known content <= 0.05x the first, peak RSS of a 1 GiB put and get < 64 MiB over
the process baseline.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO, cast

import gridfs
from pymongo import MongoClient

from bench.mongo import throwaway_mongod
from catalog import ManagedStorage
from storage import GridFSStorage

MIB = 1024 * 1024


class _Stream(io.RawIOBase):
    """A non-seekable reader over bytes, as an HTTP body would be."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = len(self._view) - self._pos
        out = bytes(self._view[self._pos : self._pos + size])
        self._pos += len(out)
        return out


def stream(data: bytes) -> BinaryIO:
    """A non-seekable binary reader over `data` (`_Stream`), typed as the core's readers are."""
    return cast(BinaryIO, _Stream(data))


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_round(
    ms: ManagedStorage,
    bucket: gridfs.GridFSBucket,
    data: bytes,
    other: bytes,
    record: Callable[[str, Callable[[], Any]], None],
) -> None:
    size = len(data)
    record("pymongo_put", lambda: bucket.upload_from_stream("b", data))
    record("put_stream", lambda: ms.put_for_environment("e", "s", stream(other)))
    ms.remove_for_environment("e", "s")
    record("put_seekable", lambda: ms.put_for_environment("e", "f", io.BytesIO(data)))
    record("second_put", lambda: ms.put_for_environment("e", "g", io.BytesIO(data)))
    digest = ms.stat_for_environment("e", "f").hash
    record(
        "second_put_hash",
        lambda: ms.put_for_environment_and_check_hash("e", "h", stream(data), size, digest),
    )

    def our_read() -> None:
        reader, _ = ms.get_for_environment("e", "f")
        for _ in reader.iter_chunks():  # type: ignore[attr-defined]
            pass

    record("pymongo_read", lambda: bucket.open_download_stream_by_name("b").read())
    record("read", our_read)
    record("read_all", lambda: ms.get_for_environment("e", "f")[0].read())
    for path in ("f", "g", "h"):
        ms.remove_for_environment("e", path)
    for doc in bucket.find({}):
        bucket.delete(doc._id)


def throughput(uri: str, mib: int, rounds: int) -> dict[str, float]:
    """Each round runs baseline and candidates back to back on fresh data, then deletes
    everything, so every contender meets the same server state; ratios are of medians."""
    client: MongoClient[Any] = MongoClient(uri)
    db = client[f"bench_{uuid.uuid4().hex[:8]}"]
    size = mib * MIB
    times: dict[str, list[float]] = {}

    def record(name: str, fn: Callable[[], Any]) -> None:
        # Checkpoint first: otherwise each write pays for the eviction of the one before.
        client.admin.command("fsync")
        times.setdefault(name, []).append(timed(fn))

    try:
        bucket = gridfs.GridFSBucket(db, bucket_name="baseline")
        ms = ManagedStorage(db, GridFSStorage(db))
        for _ in range(rounds):
            one_round(ms, bucket, os.urandom(size), os.urandom(size), record)
        t = {name: statistics.median(values) for name, values in times.items()}
        return {
            "MiB": mib,
            "pymongo_put_s": t["pymongo_put"],
            "put_stream_s": t["put_stream"],
            "put_seekable_s": t["put_seekable"],
            "put_stream_vs_pymongo": t["pymongo_put"] / t["put_stream"],
            "put_seekable_vs_pymongo": t["pymongo_put"] / t["put_seekable"],
            "second_put_vs_first": t["second_put"] / t["put_seekable"],
            "second_put_with_hash_vs_first": t["second_put_hash"] / t["put_seekable"],
            "pymongo_read_s": t["pymongo_read"],
            "read_s": t["read"],
            "read_vs_pymongo": t["pymongo_read"] / t["read"],
            "read_all_vs_pymongo": t["pymongo_read"] / t["read_all"],
        }
    finally:
        client.drop_database(db.name)
        client.close()


RSS_CHILD = r"""
import io, json, sys, uuid
import psutil
from pymongo import MongoClient
from catalog import ManagedStorage
from storage import GridFSStorage

uri, mib, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
client = MongoClient(uri)
db = client[sys.argv[4]]
ms = ManagedStorage(db, GridFSStorage(db))
block = bytes(range(256)) * 4096  # 1 MiB

class Gen(io.RawIOBase):
    def __init__(self, n): self.left = n; self.i = 0
    def readable(self): return True
    def read(self, size=-1):
        size = min(size if size >= 0 else self.left, self.left, len(block))
        self.left -= size; self.i += 1
        return bytes([self.i % 256]) + block[1:size] if size else b""

# warm up imports and connection pools on a small object
ms.put_for_environment("e", "warm", io.BytesIO(b"x" * 100_000))
base = psutil.Process().memory_info().rss
if mode == "put":
    ms.put_for_environment("e", "big", Gen(mib * 1048576))
else:
    reader, n = ms.get_for_environment("e", "big")
    for chunk in reader.iter_chunks():
        pass
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec from the parent.
with open("/proc/self/status") as status:
    peak = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:"))
print(json.dumps({"over_baseline_MiB": (peak - base) / 1048576}))
"""


def peak_rss(uri: str, mib: int) -> dict[str, float]:
    name = f"bench_rss_{uuid.uuid4().hex[:8]}"
    out: dict[str, float] = {"MiB": mib}
    try:
        for mode in ("put", "get"):
            done = subprocess.run(
                [sys.executable, "-c", RSS_CHILD, uri, str(mib), mode, name],
                capture_output=True,
                text=True,
                check=True,
            )
            out[f"{mode}_peak_rss_over_baseline_MiB"] = json.loads(done.stdout)["over_baseline_MiB"]
    finally:
        client: MongoClient[Any] = MongoClient(uri)
        client.drop_database(name)
        client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rss-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with throwaway_mongod() as uri:
        t = throughput(uri, args.mib, args.rounds)
        r = peak_rss(uri, args.rss_mib)
    rows = [
        ("put, stream (no hash given)", t["put_stream_vs_pymongo"], "x pymongo upload", ">= 1.5"),
        ("put, seekable file", t["put_seekable_vs_pymongo"], "x pymongo upload", ""),
        ("read, chunk stream", t["read_vs_pymongo"], "x pymongo download", ">= 1.0"),
        ("read, reader.read()", t["read_all_vs_pymongo"], "x pymongo download", ""),
        ("second put, same bytes", t["second_put_vs_first"], "x the first put", "<= 0.05"),
        ("second put, hash given", t["second_put_with_hash_vs_first"], "x the first put", ""),
        ("peak RSS, put", r["put_peak_rss_over_baseline_MiB"], " MiB over baseline", "< 64"),
        ("peak RSS, get", r["get_peak_rss_over_baseline_MiB"], " MiB over baseline", "< 64"),
    ]
    print(
        f"== rescat core: {args.mib} MiB (RSS {args.rss_mib} MiB), median of {args.rounds} rounds"
    )
    print(f"   pymongo put {t['pymongo_put_s']:.2f}s, read {t['pymongo_read_s']:.2f}s")
    for label, value, unit, target in rows:
        goal = f"  (target {target})" if target else ""
        print(f"{label:<28} {value:8.3f}{unit}{goal}")
    print(json.dumps({"throughput": t, "rss": r}))


if __name__ == "__main__":
    main()
