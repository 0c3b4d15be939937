"""Races, with real threads and real processes against a real mongod."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import pytest
from pymongo.database import Database

from catalog import ManagedStorage, NotFoundError
from storage import GridFSStorage
from tests.helpers import OneWayReader, b3, rand


def run_threads(n: int, fn: Callable[[int], None]) -> None:
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        barrier.wait()
        try:
            fn(i)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]


def assert_consistent(ms: ManagedStorage) -> None:
    """Every entry's refcount equals the paths using it, and every entry has its file."""
    for doc in ms.catalog.collection.find():
        assert doc["state"] == "ready"
        assert doc["refcount"] == ms.paths.count_documents({"resource_id": doc["_id"]})
        assert ms.resource_storage.exists(doc["path"])
    referenced = {d["path"] for d in ms.catalog.collection.find()}
    assert {f.path for f in ms.resource_storage.iter_files()} == referenced
    assert not ms.resource_storage.orphan_chunk_file_ids()


@pytest.mark.parametrize("make_reader", [io.BytesIO, OneWayReader], ids=["seekable", "stream"])
def test_16_threads_same_content_16_paths(
    managed: ManagedStorage, db: Database[Any], make_reader: Any
) -> None:
    data = rand(3_000_000)
    run_threads(16, lambda i: managed.put_for_environment("env", f"p{i}", make_reader(data)))
    entry = managed.catalog.get(managed.catalog.find(b3(data)))
    assert entry.refcount == 16
    assert db["resources.files"].count_documents({}) == 1
    assert len(managed.list_for_environment("env")) == 16
    assert_consistent(managed)
    reader, _ = managed.get_for_environment("env", "p7")
    assert reader.read() == data


def test_16_threads_put_same_path(managed: ManagedStorage) -> None:
    blobs = [rand(200_000, seed=i) for i in range(16)]
    run_threads(16, lambda i: managed.put_for_environment("env", "one", io.BytesIO(blobs[i])))
    reader, _ = managed.get_for_environment("env", "one")
    assert reader.read() in blobs
    assert managed.catalog.collection.count_documents({}) == 1
    assert_consistent(managed)


def test_put_delete_race(managed: ManagedStorage) -> None:
    data = rand(500_000)

    def op(i: int) -> None:
        for _ in range(5):
            if i % 2:
                managed.put_for_environment("env", "p", io.BytesIO(data))
            else:
                with contextlib.suppress(NotFoundError):
                    managed.remove_for_environment("env", "p")

    run_threads(8, op)
    assert_consistent(managed)


def test_remove_race(managed: ManagedStorage) -> None:
    managed.put_for_environment("env", "a", io.BytesIO(b"shared"))
    managed.put_for_environment("env", "b", io.BytesIO(b"shared"))
    outcomes: list[str] = []

    def op(i: int) -> None:
        try:
            managed.remove_for_environment("env", "ab"[i % 2])
            outcomes.append("removed")
        except NotFoundError:
            outcomes.append("missing")

    run_threads(8, op)
    assert outcomes.count("removed") == 2
    assert managed.catalog.collection.count_documents({}) == 0
    assert_consistent(managed)


def test_overlapping_content_many_threads(managed: ManagedStorage) -> None:
    blobs = [rand(300_000, seed=i) for i in range(4)]

    def op(i: int) -> None:
        for j in range(4):
            managed.put_for_environment(f"env{i % 3}", f"p{i}/{j}", io.BytesIO(blobs[(i + j) % 4]))

    run_threads(12, op)
    assert managed.catalog.collection.count_documents({}) == 4
    assert sum(d["refcount"] for d in managed.catalog.collection.find()) == 48
    assert_consistent(managed)


WORKER = textwrap.dedent(
    """
    import io, sys, threading
    from pymongo import MongoClient
    from catalog import ManagedStorage
    from storage import GridFSStorage
    uri, name, proc = sys.argv[1], sys.argv[2], int(sys.argv[3])
    db = MongoClient(uri)[name]
    ms = ManagedStorage(db, GridFSStorage(db))
    data = bytes(range(256)) * 8000
    ms.put_for_environment("env", f"proc{proc}", io.BytesIO(data))
    print("ok")
    """
)


def test_four_processes_same_content(mongo_uri: str, db: Database[Any]) -> None:
    GridFSStorage(db)  # indexes first, as a deployed service would have them
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, mongo_uri, db.name, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(4)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    ms = ManagedStorage(db, GridFSStorage(db))
    data = bytes(range(256)) * 8000
    assert ms.catalog.get(ms.catalog.find(b3(data))).refcount == 4
    assert db["resources.files"].count_documents({}) == 1
    assert_consistent(ms)
