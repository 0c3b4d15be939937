"""Review: gc (grace 0) racing writers must never lose an acknowledged path's bytes.

Each test drives a real interleaving against a real mongod: gc runs, on another
thread, at the exact moment a writer sits between two of its steps, then every
acknowledged path is read back and fsck --verify-content must be clean.
"""

from __future__ import annotations

import datetime
import io
import os
import threading
import time
from typing import Any

import blake3
from pymongo.database import Database

from catalog import ManagedStorage
from catalog.clock import utcnow
from catalog.fsck import fsck
from catalog.gc import gc
from storage import GridFSStorage


def read_all(managed: ManagedStorage, env: str, path: str) -> bytes:
    reader, _ = managed.get_for_environment(env, path)
    try:
        return reader.read()
    finally:
        reader.close()


def age_leases(db: Database[Any]) -> None:
    """As if the content had been written an hour ago: no uploader holds it."""
    past = utcnow() - datetime.timedelta(hours=1)
    db.catalog.update_many({}, {"$set": {"lease_until": past}})


def gc_on_thread(managed: ManagedStorage) -> None:
    """One gc with grace 0, run by another thread (as `serve --gc-interval` would)."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            gc(managed, grace=0)
        except BaseException as exc:  # pragma: no cover - reported below
            failed.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert not failed, failed


def check_all(managed: ManagedStorage, env: str, expected: dict[str, bytes]) -> None:
    gc(managed, grace=0)
    for path, data in expected.items():
        assert read_all(managed, env, path) == data, path
    report = fsck(managed, grace=0, verify_content=True)
    assert report.clean, report.problems
    counts: dict[Any, int] = {}
    for doc in managed.paths.find({}, {"resource_id": 1}):
        counts[doc["resource_id"]] = counts.get(doc["resource_id"], 0) + 1
    for entry in managed.catalog.collection.find({}, {"refcount": 1}):
        assert entry["refcount"] == counts.get(entry["_id"], 0), entry


def test_gc_between_a_replace_and_its_release(
    db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """A put that replaces a path drops the old content's reference after its link
    commits. gc recounting that content in between must not make the drop one too
    many: the other path that holds the content would lose its bytes."""
    managed = ManagedStorage(db, gridfs_storage)
    for size in (1000, 200_000):  # inline and stored in GridFS
        old, new = os.urandom(size), os.urandom(size)
        env = f"e{size}"
        managed.put_for_environment(env, "a", io.BytesIO(old))
        managed.put_for_environment(env, "b", io.BytesIO(old))
        age_leases(db)
        catalog = managed.catalog
        original = catalog.remove
        hit: list[str] = []

        def remove_after_gc(
            rid: str, *args: Any, original: Any = original, hit: list[str] = hit, **kw: Any
        ) -> Any:
            if not hit:
                hit.append(rid)
                gc_on_thread(managed)  # gc runs while the put drops the old reference
            return original(rid, *args, **kw)

        catalog.remove = remove_after_gc  # type: ignore[method-assign]
        try:
            managed.put_for_environment(env, "a", io.BytesIO(new))
        finally:
            catalog.remove = original  # type: ignore[method-assign]
        assert hit
        check_all(managed, env, {"a": new, "b": old})


def test_gc_while_a_content_transaction_holds_its_puts(
    db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """A content transaction's puts hold references no path backs until the block ends.

    gc, looping with grace 0 while the block outlives the lease, must neither
    delete that content nor count its references away (here one content is new,
    one shared with a path that exists): the paths committed at the end must read
    their bytes, and the counts must match the paths.
    """
    lease = 2.0
    managed = ManagedStorage(db, gridfs_storage, lease=lease)
    shared, small, large = os.urandom(3000), os.urandom(4000), os.urandom(300_000)
    managed.put_for_environment("e", "kept", io.BytesIO(shared))
    with managed.transaction() as tx:
        tx.put("e", "small", io.BytesIO(small))
        tx.put("e", "large", io.BytesIO(large))
        tx.put("e", "shared", io.BytesIO(shared))
        deadline = time.monotonic() + 3 * lease  # the leases taken by the puts have run out
        while time.monotonic() < deadline:
            gc_on_thread(managed)
            time.sleep(0.2)
    check_all(managed, "e", {"kept": shared, "small": small, "large": large, "shared": shared})


def test_a_content_transaction_whose_put_was_reclaimed_commits_nothing(
    db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """Should a held reference be taken all the same (the process stalled past its
    lease and gc recounted the entry away), the commit fails: no acknowledged path
    may point at content that is gone."""
    from catalog.errors import ResourceDeletedError

    managed = ManagedStorage(db, gridfs_storage)
    data = os.urandom(5000)
    try:
        with managed.transaction() as tx:
            tx.put("e", "p", io.BytesIO(data))
            tx.put("e", "q", io.BytesIO(os.urandom(100)))
            db.catalog.delete_one({"hash": blake3.blake3(data).hexdigest()})  # as gc's recount
    except ResourceDeletedError:
        pass
    else:
        raise AssertionError("the commit linked a path to content that is gone")
    assert managed.list_for_environment("e") == []
    check_all(managed, "e", {})
