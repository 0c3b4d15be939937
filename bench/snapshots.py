"""Snapshot metastore benchmark: containerd's MetaStore benchmark set against raw pymongo.

    python -m bench.snapshots [--ops 300] [--rounds 5]

containerd's set (metastore_bench_test.go): StatActive, StatCommitted,
CreateActive, Remove, Commit, GetActive (on a chain of 10 committed parents),
WriteTransaction and ReadTransaction (open + close). As there, every
operation bench runs its operations inside one writable transaction, and only
the named operation is timed (creates and removes that only set the stage run
off the clock). MongoDB starts a transaction lazily, so an empty one (the
Write/ReadTransaction benches) never reaches the server; WriteTx+stat and
ReadTx+stat are the same with one read each, which do.

Baselines, measured in the same process and the same rounds: raw pymongo
``find_one`` by _id (for the reads) and ``insert_one`` of a small document at
the client's default write concern (for the writes and transactions). Each
round runs every contender back to back on a fresh namespace; the figures are
medians over rounds, in operations per second; the ratio (ours / baseline)
is printed last: the median of the rounds' ratios, each bench paired with a
baseline run just before it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from pymongo import MongoClient
from pymongo.collection import Collection

from bench.mongo import throwaway_mongod
from catalog import ManagedStorage
from catalog.snapshots import MetaStore, Transaction
from storage import GridFSStorage

# A bench gets a MetaStore, a writable transaction and n, and returns the timed seconds.
Bench = Callable[[MetaStore, Transaction, int], float]


def base_and_active(tx: Transaction, active: str) -> None:
    tx.create_active("bottom")
    tx.commit_active("bottom", "base")
    tx.create_active(active, "base")


def stat_active(ms: MetaStore, tx: Transaction, n: int) -> float:
    base_and_active(tx, "active")
    start = time.perf_counter()
    for _ in range(n):
        tx.stat("active")
    return time.perf_counter() - start


def stat_committed(ms: MetaStore, tx: Transaction, n: int) -> float:
    base_and_active(tx, "active")
    tx.commit_active("active", "committed")
    start = time.perf_counter()
    for _ in range(n):
        tx.stat("committed")
    return time.perf_counter() - start


def create_active(ms: MetaStore, tx: Transaction, n: int) -> float:
    spent = 0.0
    for _ in range(n):
        start = time.perf_counter()
        tx.create_active("active")
        spent += time.perf_counter() - start
        tx.remove("active")
    return spent


def remove(ms: MetaStore, tx: Transaction, n: int) -> float:
    spent = 0.0
    for _ in range(n):
        tx.create_active("active")
        start = time.perf_counter()
        tx.remove("active")
        spent += time.perf_counter() - start
    return spent


def commit(ms: MetaStore, tx: Transaction, n: int) -> float:
    spent = 0.0
    for _ in range(n):
        tx.create_active("active")
        start = time.perf_counter()
        tx.commit_active("active", "committed")
        spent += time.perf_counter() - start
        tx.remove("committed")
    return spent


def get_active(ms: MetaStore, tx: Transaction, n: int) -> float:
    base = ""
    for i in range(1, 11):
        tx.create_active("tmp", base)
        base = f"base-{i}"
        tx.commit_active("tmp", base)
    tx.create_active("active", base)
    start = time.perf_counter()
    for _ in range(n):
        tx.get_active("active")
    return time.perf_counter() - start


def write_transaction(ms: MetaStore, tx: Transaction, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        ms.transaction_context(True).commit()
    return time.perf_counter() - start


def read_transaction(ms: MetaStore, tx: Transaction, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        ms.transaction_context(False).rollback()
    return time.perf_counter() - start


def write_transaction_one_read(ms: MetaStore, tx: Transaction, n: int) -> float:
    base_and_active(tx, "active")
    tx.commit()
    start = time.perf_counter()
    for _ in range(n):
        t = ms.transaction_context(True)
        t.stat("active")
        t.commit()
    return time.perf_counter() - start


def read_transaction_one_read(ms: MetaStore, tx: Transaction, n: int) -> float:
    base_and_active(tx, "active")
    tx.commit()
    start = time.perf_counter()
    for _ in range(n):
        t = ms.transaction_context(False)
        t.stat("active")
        t.rollback()
    return time.perf_counter() - start


# name -> (bench, baseline it is compared with)
BENCHES: dict[str, tuple[Bench, str]] = {
    "StatActive": (stat_active, "find_one"),
    "StatCommitted": (stat_committed, "find_one"),
    "CreateActive": (create_active, "insert_one"),
    "Remove": (remove, "insert_one"),
    "Commit": (commit, "insert_one"),
    "GetActive": (get_active, "find_one"),
    "WriteTransaction": (write_transaction, "insert_one"),
    "ReadTransaction": (read_transaction, "find_one"),
    # Beyond containerd's set: MongoDB starts a transaction lazily, so an empty
    # one never reaches the server; these pay the real start and end.
    "WriteTx+stat": (write_transaction_one_read, "find_one"),
    "ReadTx+stat": (read_transaction_one_read, "find_one"),
}


def find_one(coll: Collection[dict[str, Any]], n: int) -> float:
    coll.insert_one({"_id": "x", "key": "active", "kind": "active"})
    start = time.perf_counter()
    for _ in range(n):
        coll.find_one({"_id": "x"})
    return time.perf_counter() - start


def insert_one(coll: Collection[dict[str, Any]], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        coll.insert_one({"key": f"active-{i}", "kind": "active"})
    return time.perf_counter() - start


def run(uri: str, ops: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Each bench runs right after its own baseline, so a ratio pairs like with like.

    The machine is shared and noisy: the ratio is the median of per-round
    ratios, the ops/s beside it medians of their own.
    """
    client: MongoClient[Any] = MongoClient(uri, tz_aware=True)
    db = client[f"bench_{uuid.uuid4().hex[:8]}"]
    baselines = {"find_one": find_one, "insert_one": insert_one}
    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    try:
        managed = ManagedStorage(db, GridFSStorage(db))
        for r in range(rounds):
            for name, (bench, base) in BENCHES.items():
                coll = db[f"baseline_{name}_{r}"]
                base_rate = ops / baselines[base](coll, ops)
                coll.drop()
                ms = MetaStore(managed, f"{name}-{r}")
                tx = ms.transaction_context(True)
                try:
                    rate = ops / bench(ms, tx, ops)
                finally:
                    if tx.open:
                        tx.commit()
                rates.setdefault(name, []).append(rate)
                rates.setdefault(f"{name}/{base}", []).append(base_rate)
                rates.setdefault(base, []).append(base_rate)
                ratios.setdefault(name, []).append(rate / base_rate)
        med = {name: statistics.median(values) for name, values in rates.items()}
        return {
            name: {
                "ops_per_s": med[name],
                "baseline": base,
                "baseline_ops_per_s": med[f"{name}/{base}"],
                "ratio": statistics.median(ratios[name]),
            }
            for name, (_, base) in BENCHES.items()
        } | {base: {"ops_per_s": med[base]} for base in baselines}
    finally:
        client.drop_database(db.name)
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=300, help="timed operations per bench per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with throwaway_mongod() as uri:
        result = run(uri, args.ops, args.rounds)
    print(
        f"== rescat snapshot metastore: {args.ops} ops x {args.rounds} rounds, "
        f"median ops/s (raw pymongo find_one {result['find_one']['ops_per_s']:.0f}/s, "
        f"insert_one {result['insert_one']['ops_per_s']:.0f}/s)"
    )
    print(f"{'bench':<18} {'ops/s':>9}   {'baseline':<10} {'ops/s':>9}   {'ratio':>6}")
    for name, (_, base) in BENCHES.items():
        row = result[name]
        print(
            f"{name:<18} {row['ops_per_s']:9.0f}   {base:<10} "
            f"{row['baseline_ops_per_s']:9.0f}   {row['ratio']:6.2f}x"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
