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
    """As if the content and paths had been written an hour ago: no uploader holds it,
    and no put that changed a path is still dropping the reference it replaced."""
    past = utcnow() - datetime.timedelta(hours=1)
    db.catalog.update_many({}, {"$set": {"lease_until": past}})
    db.paths.update_many({"dropping_until": {"$gt": past}}, {"$set": {"dropping_until": past}})


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


_CHILD = r"""
import io, json, os, random, sys
import blake3
from catalog import connect
from catalog.errors import CatalogError
from catalog.proof import ranges_checksum

ms = connect(sys.argv[1], sys.argv[2], lease=60.0)
env = sys.argv[4]
rng = random.Random(int(sys.argv[3]))
contents = [rng.randbytes(n) for n in (10, 3000, 70_000, 200_000, 3000 + 1)]
hashes = [blake3.blake3(c).hexdigest() for c in contents]
paths = [f"p{i}" for i in range(8)]
state = {}

def announce(after):
    print(json.dumps({"before": state, "after": after}), flush=True)

while True:
    op = rng.randrange(7)
    p, q = rng.choice(paths), rng.choice(paths)
    k = rng.randrange(len(contents))
    after = dict(state)
    try:
        if op <= 1:
            after[p] = hashes[k]
            announce(after)
            ms.put_for_environment(env, p, io.BytesIO(contents[k]))
        elif op == 2 and p in state:
            del after[p]
            announce(after)
            ms.delete_path(env, p)
        elif op == 3 and p in state and p != q:
            after[q] = after.pop(p)
            announce(after)
            ms.move_path(env, p, env, q)
        elif op == 4 and p in state and p != q:
            after[q] = after[p]
            announce(after)
            ms.copy_path(env, p, env, q)
        elif op == 5 and hashes[k] in state.values():
            after[p] = hashes[k]
            announce(after)
            req = ms.put_for_environment_request(env, p, hashes[k])
            ms.prove_for_environment(
                env, req.request_id, ranges_checksum(io.BytesIO(contents[k]), req.ranges)
            )
        elif op == 6:
            k2 = rng.randrange(len(contents))
            after[p], after[q] = hashes[k], hashes[k2]
            if q in state and q != p:
                after.pop(q)
            announce(after)
            with ms.transaction() as tx:
                tx.put(env, p, io.BytesIO(contents[k]))
                tx.put(env, q, io.BytesIO(contents[k2]))
                if q != p and q in state:
                    tx.remove(env, q)
        else:
            continue
    except CatalogError as exc:
        raise SystemExit(f"refused: {exc!r}")
    state = after
    print(json.dumps({"done": True}), flush=True)
"""


def test_kill_9_amid_path_changes_while_gc_runs(
    mongo_uri: str, db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """Processes changing paths (puts of shared content, replaces, deletes, moves,
    copies, proofs, content transactions) are killed -9 at many points while gc
    (grace 0) loops; afterwards every path holds what its last acknowledged change
    (or the change cut short, whole) left, reads exactly those bytes, and every
    count equals its paths."""
    import json
    import signal
    import subprocess
    import sys

    managed = ManagedStorage(db, gridfs_storage)
    stop = threading.Event()
    failed: list[BaseException] = []

    def gc_loop() -> None:
        while not stop.is_set():
            try:
                gc(managed, grace=0)
            except BaseException as exc:  # pragma: no cover - reported below
                failed.append(exc)
                return

    looper = threading.Thread(target=gc_loop)
    looper.start()
    candidates: dict[str, list[dict[str, str]]] = {}
    try:
        for run in range(6):
            env = f"e{run}"
            proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD, mongo_uri, db.name, str(run), env],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert proc.stdout is not None
            done, last = 0, None
            while done < 10 + 5 * run:
                line = proc.stdout.readline()
                assert line, proc.communicate()[1]
                msg = json.loads(line)
                if "done" in msg:
                    done += 1
                else:
                    last = msg
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
            assert last is not None
            candidates[env] = [last["before"], last["after"]]
    finally:
        stop.set()
        looper.join()
    assert not failed, failed
    age_leases(db)  # the killed processes renew nothing
    gc(managed, grace=0)
    fresh = ManagedStorage(db, gridfs_storage)  # no inline bytes cached in this process
    expected: dict[tuple[str, str], str] = {}
    for env, states in candidates.items():
        now = {doc["path"]: doc["hash"] for doc in db.paths.find({"env": env})}
        assert now in states, (env, now, states)
        expected.update({(env, path): digest for path, digest in now.items()})
    for (env, path), digest in expected.items():
        assert blake3.blake3(read_all(fresh, env, path)).hexdigest() == digest, (env, path)
    check_all(fresh, "e0", {})


def test_gc_between_a_streamed_upload_and_its_catalog_entry(
    db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """A streamed upload of unknown hash stores its file first and learns the hash
    from it; only then does a catalog entry point at the file. gc finding the file
    then (no entry, its upload date past the grace) must leave it: the put that
    follows is acknowledged and must read its bytes."""
    from tests.helpers import OneWayReader

    managed = ManagedStorage(db, gridfs_storage)
    original = gridfs_storage.put
    old = utcnow() - datetime.timedelta(hours=2)

    def put_then_gc(path: str, reader: Any, length: int = -1) -> str:
        digest = original(path, reader, length)
        # as if the file had been written long ago, or gc ran with grace 0
        db["resources.files"].update_one({"filename": path}, {"$set": {"uploadDate": old}})
        gc_on_thread(managed)
        return digest

    gridfs_storage.put = put_then_gc  # type: ignore[method-assign]
    data, shared = os.urandom(200_000), os.urandom(150_000)
    managed.put_for_environment("e", "kept", io.BytesIO(shared))
    try:
        managed.put_for_environment("e", "new", OneWayReader(data), -1)  # new content
        managed.put_for_environment("e", "dup", OneWayReader(shared), -1)  # a spare copy
    finally:
        gridfs_storage.put = original  # type: ignore[method-assign]
    check_all(managed, "e", {"new": data, "dup": shared, "kept": shared})


def test_gc_never_deletes_an_orphan_file_under_a_reader_that_opened_it(
    db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """A reader that resolved a path before its entry went (here the process that
    deleted the entry died before deleting the bytes) streams the bytes to the end,
    even when it opens them just as gc, finding them unreferenced, checks for readers."""
    managed = ManagedStorage(db, gridfs_storage)
    data = os.urandom(3 * 1024 * 1024 + 5)
    managed.put_for_environment("e", "p", io.BytesIO(data))
    res = managed._resolve("e", "p")
    # delete_path's transaction, and a crash before the bytes were deleted
    db.paths.delete_one({"env": "e", "path": "p"})
    db.catalog.delete_one({"hash": res.hash})
    db["resources.files"].update_many({}, {"$set": {"uploadDate": utcnow()}})
    leases = managed.read_leases
    original = leases.live
    opened: list[Any] = []

    def live_then_open(storage_path: str) -> bool:
        answer = original(storage_path)
        if not opened:
            opened.append(managed._open_content(res))  # the reader gets in just now
        return answer

    leases.live = live_then_open  # type: ignore[method-assign]
    try:
        gc_on_thread(managed)
    finally:
        leases.live = original  # type: ignore[method-assign]
    assert opened
    reader = opened[0]
    try:
        assert reader.read() == data
    finally:
        reader.close()
    check_all(managed, "e", {})
    assert db["resources.files"].count_documents({}) == 0


def _lost_answer(managed: ManagedStorage, method: str) -> Any:
    """Make `managed.<method>` apply its write, then lose the answer (as a connection
    dropped after the server applied it, and the driver's one retry failed too)."""
    from pymongo.errors import AutoReconnect

    original = getattr(managed, method)

    def applied_then_lost(*args: Any, **kw: Any) -> Any:
        original(*args, **kw)
        raise AutoReconnect("connection closed after the write was sent")

    setattr(managed, method, applied_then_lost)
    return original


def test_a_put_whose_link_answer_was_lost_keeps_the_reference_its_path_may_hold(
    db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """A put that fails after its link may have committed must not drop its reference:
    the path may hold it now (here it does), and the drop would delete its bytes."""
    from pymongo.errors import AutoReconnect

    managed = ManagedStorage(db, gridfs_storage)
    old, small, large = os.urandom(100), os.urandom(2000), os.urandom(200_000)
    managed.put_for_environment("e", "p", io.BytesIO(old))

    class LinkAnswerLost:
        """The paths collection, whose find-and-modify (the link) applies, then loses its
        answer."""

        def __init__(self, collection: Any) -> None:
            self._collection = collection

        def __getattr__(self, name: str) -> Any:
            return getattr(self._collection, name)

        def find_one_and_update(self, *args: Any, **kw: Any) -> Any:
            self._collection.find_one_and_update(*args, **kw)
            raise AutoReconnect("connection closed after the write was sent")

    paths = managed.paths
    for path, data in (("p", small), ("q", large)):
        managed.paths = LinkAnswerLost(paths)  # type: ignore[assignment]
        try:
            managed.put_for_environment("e", path, io.BytesIO(data))
        except AutoReconnect:
            pass
        finally:
            managed.paths = paths
    age_leases(db)
    check_all(managed, "e", {"p": small, "q": large})


def test_a_content_transaction_whose_commit_answer_was_lost_keeps_its_references(
    db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """The same for a content transaction whose commit may have committed."""
    from pymongo.errors import AutoReconnect

    managed = ManagedStorage(db, gridfs_storage)
    data = os.urandom(3000)
    original = _lost_answer(managed, "transact")
    try:
        with managed.transaction() as tx:
            tx.put("e", "p", io.BytesIO(data))
    except AutoReconnect:
        pass
    finally:
        managed.transact = original  # type: ignore[method-assign]
    age_leases(db)
    check_all(managed, "e", {"p": data})
