"""gc running again and again while uploads, removals and moves run loses nothing."""

from __future__ import annotations

import datetime
import io
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import blake3
import pytest
from pymongo.database import Database

from catalog import ManagedStorage
from catalog.clock import utcnow
from catalog.fsck import FsckReport, fsck
from catalog.gc import GcReport, gc
from storage import GridFSStorage

MiB = 1024 * 1024
THREADS = 8
GRACE = 3.0  # far below the default hour, above any pause between an upload's batches here


class Stream:
    """A non-seekable reader: the hash is unknown until the last byte."""

    def __init__(self, data: bytes, pause: float = 0.0) -> None:
        self._buf = io.BytesIO(data)
        self._pause = pause

    def read(self, size: int = -1) -> bytes:
        if self._pause:
            time.sleep(self._pause)
        return self._buf.read(min(size, MiB) if size >= 0 else MiB)

    def readable(self) -> bool:
        return True


def digest(data: bytes) -> str:
    return str(blake3.blake3(data).hexdigest())


def read_hash(managed: ManagedStorage, env: str, path: str) -> str:
    reader, _ = managed.get_for_environment(env, path)
    try:
        hasher = blake3.blake3()
        for piece in iter(lambda: reader.read(MiB), b""):
            hasher.update(piece)
        return str(hasher.hexdigest())
    finally:
        reader.close()


def gc_loop(
    managed: ManagedStorage,
    done: threading.Event,
    grace: float,
    checks: list[FsckReport] | None = None,
) -> list[GcReport]:
    """gc again and again until `done`; with `checks`, an fsck after each gc."""
    reports = []
    while not done.is_set():
        reports.append(gc(managed, grace=grace))
        if checks is not None:
            checks.append(fsck(managed, grace=grace))
        time.sleep(0.02)
    return reports


def run_threads(workers: list[Callable[[], None]]) -> tuple[threading.Event, list[BaseException]]:
    errors: list[BaseException] = []
    done = threading.Event()

    def guard(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        return run

    threads = [threading.Thread(target=guard(fn)) for fn in workers]
    for t in threads:
        t.start()

    def joiner() -> None:
        for t in threads:
            t.join()
        done.set()

    threading.Thread(target=joiner, daemon=True).start()
    return done, errors


def seed_garbage(db: Database[Any], gridfs_storage: GridFSStorage, managed: ManagedStorage) -> int:
    """Old orphans and an abandoned upload for gc to reclaim meanwhile; their byte count."""
    old = utcnow() - datetime.timedelta(hours=2)
    for i in range(3):
        gridfs_storage.put(f"stray-{i}", io.BytesIO(os.urandom(MiB)), -1)
    db["resources.files"].update_many({}, {"$set": {"uploadDate": old}})
    managed.catalog.put("ab" * 32, 123)
    db.catalog.update_one({"hash": "ab" * 32}, {"$set": {"lease_until": old}})
    return 3 * MiB


@pytest.mark.slow
def test_gc_while_8_threads_upload(db: Database[Any], gridfs_storage: GridFSStorage) -> None:
    managed = ManagedStorage(db, gridfs_storage)
    garbage = seed_garbage(db, gridfs_storage, managed)
    shared = [os.urandom(2 * MiB + i) for i in range(3)]
    expected: dict[str, str] = {}
    lock = threading.Lock()

    def uploader(i: int) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(i)
            for k in range(6):
                path = f"t{i}/f{k}"
                kind = (i + k) % 3
                if kind == 0:  # new content, streamed: chunks before any catalog entry
                    data = os.urandom(rng.randint(1, 5) * MiB + rng.randint(0, 999))
                    reader: Any = Stream(data)
                elif kind == 1:  # shared content: concurrent uploaders of one hash
                    data = rng.choice(shared)
                    reader = io.BytesIO(data)
                else:  # new content, seekable: a pending entry while it uploads
                    data = os.urandom(rng.randint(1, 5) * MiB)
                    reader = io.BytesIO(data)
                managed.put_for_environment("env", path, reader, -1)
                with lock:
                    expected[path] = digest(data)
                if k == 3:  # removal and repointing while gc runs
                    managed.remove_for_environment("env", f"t{i}/f0")
                    managed.move_for_environment("env", f"t{i}/f1", f"t{i}/moved")
                    with lock:
                        del expected[f"t{i}/f0"]
                        expected[f"t{i}/moved"] = expected.pop(f"t{i}/f1")

        return run

    slow_data = os.urandom(40 * MiB)

    def slow_uploader() -> None:
        # Runs longer than the grace: its files_id gets old while its chunks stay fresh.
        managed.put_for_environment("env", "slow", Stream(slow_data, pause=0.12), -1)
        with lock:
            expected["slow"] = digest(slow_data)

    started = time.monotonic()
    done, errors = run_threads([uploader(i) for i in range(THREADS)] + [slow_uploader])
    checks: list[FsckReport] = []
    reports = gc_loop(managed, done, GRACE, checks)
    assert not errors, errors
    assert time.monotonic() - started > GRACE + 1  # the slow upload outlived the grace
    assert len(reports) >= 3

    assert sorted(managed.list_for_environment("env")) == sorted(expected)
    for path, want in expected.items():
        assert read_hash(managed, "env", path) == want, path
    assert sum(r.orphan_files for r in reports) == 3
    assert sum(r.abandoned_pending for r in reports) == 1
    assert sum(r.bytes for r in reports) == garbage
    assert sum(r.refcounts_fixed + r.unreferenced_entries for r in reports) == 0
    # fsck under load, after gc took the seeded garbage: no false positives
    assert all(c.clean for c in checks), [c.problems for c in checks if not c.clean]
    assert sum(c.in_flight for c in checks) > 0

    final = gc(managed, grace=0)
    assert not final.changed, final.actions  # the uploads left no garbage of their own
    report = fsck(managed, grace=0, verify_content=True)
    assert report.clean, report.problems


@pytest.mark.slow
def test_recount_races_removals_and_moves(db: Database[Any], gridfs_storage: GridFSStorage) -> None:
    """Drifted counts with expired leases are recounted while paths come and go."""
    managed = ManagedStorage(db, gridfs_storage)
    contents = [os.urandom(100_000 + i) for i in range(4)]
    for c, data in enumerate(contents):
        for i in range(THREADS):
            for k in range(4):
                managed.put_for_environment("env", f"c{c}/t{i}/p{k}", io.BytesIO(data))
    past = utcnow() - datetime.timedelta(hours=1)
    db.catalog.update_many({}, {"$inc": {"refcount": 5}, "$set": {"lease_until": past}})

    def churn(i: int) -> Callable[[], None]:
        def run() -> None:
            for c in range(len(contents)):
                managed.remove_for_environment("env", f"c{c}/t{i}/p0")
                managed.move_for_environment("env", f"c{c}/t{i}/p1", f"c{c}/t{i}/m1")
                managed.move_for_environment("env", f"c{c}/t{i}/p2", f"c{c}/t{i}/p3")
                if i % 2 and c % 2:
                    managed.remove_for_environment("env", f"c{c}/t{i}/m1")
                    managed.remove_for_environment("env", f"c{c}/t{i}/p3")

        return run

    churn_done = threading.Event()

    def drift() -> None:
        # Keep counts drifting (too high, leases expired) while the paths change.
        rng = random.Random(0)
        while not churn_done.is_set():
            db.catalog.update_one(
                {"hash": digest(rng.choice(contents))},
                {"$inc": {"refcount": 1}, "$set": {"lease_until": past}},
            )
            time.sleep(0.005)

    def churn_all() -> None:
        done, errors = run_threads([churn(i) for i in range(THREADS)])
        done.wait()
        churn_errors.extend(errors)
        churn_done.set()

    churn_errors: list[BaseException] = []
    done, errors = run_threads([churn_all, drift])
    reports = gc_loop(managed, done, 0.0)
    errors += churn_errors
    assert sum(r.refcounts_fixed + r.unreferenced_entries for r in reports) > len(reports) // 2
    assert not errors, errors
    gc(managed, grace=0)
    report = fsck(managed, grace=0)
    assert report.clean, report.problems
    paths = managed.list_for_environment("env")
    assert len(paths) == len(contents) * THREADS * 2 - 2 * (THREADS // 2) * (len(contents) // 2)
    for path in paths:
        c = int(path.split("/")[0][1:])
        assert read_hash(managed, "env", path) == digest(contents[c])
    for doc in db.catalog.find({}):
        assert doc["refcount"] == db.paths.count_documents({"resource_id": doc["_id"]})
