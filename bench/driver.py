"""Registry driver benchmark: writer sessions, move, list and walk, in one run.

    python -m bench.driver [--mib 256] [--move-mib 1024] [--rounds 3]
                           [--children 10000] [--walk 100000]

Ratios are of medians of paired rounds against baselines measured in the same
run (a checkpoint before every timed step, as bench/core.py does). Targets
(issue 11): a writer streaming `--mib` MiB in 1 MiB writes >= 0.9x one
ManagedStorage put of the same number of bytes (fresh random bytes each, so
neither deduplicates); a session closed and resumed 64 times >= 0.8x one writer;
a move of a `--move-mib` MiB path about 1x a move of a 4 KiB path. List and
walk print milliseconds and the MongoDB commands they sent (a pymongo
CommandListener); their path documents are inserted directly (all pointing at
one stored content), since only path documents are read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from pymongo import MongoClient, monitoring

from bench.core import stream
from bench.mongo import throwaway_mongod
from catalog import ManagedStorage
from catalog.driver import StorageDriver
from storage import GridFSStorage

MIB = 1024 * 1024
RESUMES = 64


class Commands(monitoring.CommandListener):
    """Counts the commands sent (find, getMore, ...)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.on = False

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.on:
            self.counts[event.command_name] = self.counts.get(event.command_name, 0) + 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def measure(self, fn: Callable[[], Any]) -> tuple[float, dict[str, int]]:
        self.counts = {}
        self.on = True
        start = time.perf_counter()
        try:
            fn()
        finally:
            elapsed = time.perf_counter() - start
            self.on = False
        return elapsed, dict(self.counts)


def write_blocks(writer: Any, data: bytes, start: int, end: int) -> None:
    view = memoryview(data)
    for offset in range(start, end, MIB):
        writer.write(view[offset : min(offset + MIB, end)])


def sessions(uri: str, mib: int, rounds: int) -> dict[str, float]:
    client: MongoClient[Any] = MongoClient(uri, tz_aware=True)
    db = client[f"bench_drv_{uuid.uuid4().hex[:8]}"]
    ms = ManagedStorage(db, GridFSStorage(db))
    driver = StorageDriver(ms, "bench")
    size = mib * MIB
    times: dict[str, list[float]] = {}

    def record(name: str, fn: Callable[[], Any]) -> None:
        client.admin.command("fsync")
        start = time.perf_counter()
        fn()
        times.setdefault(name, []).append(time.perf_counter() - start)

    def one_writer(data: bytes) -> None:
        writer = driver.writer("/w/one")
        write_blocks(writer, data, 0, len(data))
        writer.commit()

    def resumed(data: bytes) -> None:
        step = len(data) // RESUMES
        writer = driver.writer("/w/resumed")
        for i in range(RESUMES):
            if i:
                writer = driver.writer("/w/resumed", append=True)
            end = len(data) if i == RESUMES - 1 else (i + 1) * step
            write_blocks(writer, data, i * step, end)
            if i < RESUMES - 1:
                writer.close()
        writer.commit()

    try:

        def one_round() -> None:
            a, b, c = (os.urandom(size) for _ in range(3))
            record("put", lambda: ms.put_for_environment("bench", "put", stream(a)))
            record("writer", lambda: one_writer(b))
            record("resumed", lambda: resumed(c))
            for path in ("put", "w/one", "w/resumed"):
                ms.remove_for_environment("bench", path)

        for _ in range(rounds):
            one_round()
        t = {name: statistics.median(values) for name, values in times.items()}
        return {
            "MiB": mib,
            "put_s": t["put"],
            "writer_s": t["writer"],
            "resumed_s": t["resumed"],
            "writer_vs_put": t["put"] / t["writer"],
            "resumed_vs_writer": t["writer"] / t["resumed"],
        }
    finally:
        client.drop_database(db.name)
        client.close()


def moves(uri: str, big_mib: int, rounds: int) -> dict[str, float]:
    client: MongoClient[Any] = MongoClient(uri, tz_aware=True)
    db = client[f"bench_mv_{uuid.uuid4().hex[:8]}"]
    ms = ManagedStorage(db, GridFSStorage(db))
    driver = StorageDriver(ms, "bench")
    try:
        writer = driver.writer("/big/a")
        block = os.urandom(MIB)
        for i in range(big_mib):
            writer.write(block[:-4] + i.to_bytes(4, "big"))
        writer.commit()
        driver.put_content("/small/a", os.urandom(4096))
        times: dict[str, list[float]] = {"big": [], "small": []}
        for i in range(rounds * 5):
            for name in ("small", "big"):
                src, dst = (f"/{name}/a", f"/{name}/b") if i % 2 == 0 else (
                    f"/{name}/b", f"/{name}/a"
                )  # fmt: skip
                start = time.perf_counter()
                driver.move(src, dst)
                times[name].append(time.perf_counter() - start)
        big, small = statistics.median(times["big"]), statistics.median(times["small"])
        return {
            "MiB": big_mib,
            "big_ms": big * 1e3,
            "small_ms": small * 1e3,
            "big_vs_small": big / small,
        }
    finally:
        client.drop_database(db.name)
        client.close()


def namespace(uri: str, children: int, walk_paths: int) -> dict[str, Any]:
    commands = Commands()
    client: MongoClient[Any] = MongoClient(uri, tz_aware=True, event_listeners=[commands])
    db = client[f"bench_ns_{uuid.uuid4().hex[:8]}"]
    ms = ManagedStorage(db, GridFSStorage(db))
    driver = StorageDriver(ms, "bench")
    try:
        driver.put_content("/seed", b"x" * 4096)
        seed = ms.paths.find_one({"env": "bench", "path": "seed"})
        assert seed is not None
        now = datetime.datetime.now(datetime.timezone.utc)
        base = {k: seed[k] for k in ("resource_id", "hash", "length")}
        base.update({"env": "bench", "created_at": now, "updated_at": now, "rev": 1})
        flat = [f"flat/f{i:06d}" for i in range(children)]
        per_dir = 100
        dirs = max(1, walk_paths // (per_dir * 10))
        tree = [
            f"tree/d{a:04d}/s{b}/f{c:03d}"
            for a in range(dirs)
            for b in range(10)
            for c in range(per_dir)
        ][:walk_paths]
        for start in range(0, len(flat) + len(tree), 10_000):
            chunk = (flat + tree)[start : start + 10_000]
            ms.paths.insert_many([{**base, "path": p} for p in chunk], ordered=False)
        out: dict[str, Any] = {"children": children, "walk_paths": len(tree)}

        listed: list[str] = []
        elapsed, counts = commands.measure(lambda: listed.extend(driver.list("/flat")))
        assert len(listed) == children
        out["list_ms"], out["list_commands"] = elapsed * 1e3, counts

        seen = [0]

        def visit(fi: Any) -> None:
            seen[0] += 1

        elapsed, counts = commands.measure(lambda: driver.walk("/tree", visit))
        # every file, and every directory above one (d*, and d*/s* when --walk cuts it short)
        parents = {p.rsplit("/", 1)[0] for p in tree} | {p.rsplit("/", 2)[0] for p in tree}
        assert seen[0] == len(tree) + len(parents)
        out["walk_ms"], out["walk_commands"], out["walk_entries"] = elapsed * 1e3, counts, seen[0]

        elapsed, counts = commands.measure(lambda: driver.stat("/tree/d0000"))
        out["stat_dir_ms"], out["stat_dir_commands"] = elapsed * 1e3, counts
        return out
    finally:
        client.drop_database(db.name)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--move-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--children", type=int, default=10_000)
    parser.add_argument("--walk", type=int, default=100_000)
    args = parser.parse_args()
    with throwaway_mongod() as uri:
        n = namespace(uri, args.children, args.walk)
        m = moves(uri, args.move_mib, args.rounds)
        s = sessions(uri, args.mib, args.rounds)
    print(f"== rescat driver: {args.mib} MiB, median of {args.rounds} rounds")
    print(
        f"   put {s['put_s']:.2f}s, writer {s['writer_s']:.2f}s, "
        f"resumed x{RESUMES} {s['resumed_s']:.2f}s; move {m['MiB']} MiB {m['big_ms']:.1f} ms, "
        f"4 KiB {m['small_ms']:.1f} ms"
    )
    rows = [
        ("writer, 1 MiB writes", s["writer_vs_put"], "x one put", ">= 0.9"),
        (f"session resumed {RESUMES} times", s["resumed_vs_writer"], "x one writer", ">= 0.8"),
        (f"move {m['MiB']} MiB path", m["big_vs_small"], "x move of 4 KiB", "~ 1"),
    ]
    for label, value, unit, target in rows:
        print(f"{label:<30} {value:8.3f} {unit}  (target {target})")
    print(
        f"list {n['children']} children     {n['list_ms']:8.1f} ms  commands {n['list_commands']}"
    )
    print(
        f"walk {n['walk_paths']} paths      {n['walk_ms']:8.1f} ms  commands {n['walk_commands']}"
        f" ({n['walk_entries']} entries)"
    )
    print(
        f"stat of a directory       {n['stat_dir_ms']:8.1f} ms  commands {n['stat_dir_commands']}"
    )
    print(json.dumps({"sessions": s, "move": m, "namespace": n}))


if __name__ == "__main__":
    main()
