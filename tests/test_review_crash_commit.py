"""A writer killed with -9 while committing a session: the commit rolls forward.

Found by review: once a session's chunks had their files document (the commit
of new content got that far), a writer killed before the path was linked lost
everything: the next opener deleted the session ("ended in a commit that did
not finish"), the path never appeared, and gc deleted the bytes that close()
or a 204 PATCH had confirmed. The bytes are whole and durable at that point,
so the next opener (or a retried commit) now finishes the commit instead.
Killed at both steps after the files document: before the entry records the
bytes (`_complete`) and before the path is linked (`_link`).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from typing import Any

import blake3
import pytest
from pymongo.database import Database

from catalog import ManagedStorage, connect
from catalog.driver import StorageDriver
from catalog.fsck import fsck
from catalog.gc import gc
from catalog.sessions import SessionStore

DATA = bytes(range(256)) * 8192  # 2 MiB: above the inline limit, so a stored file
LEASE = 2.0

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from catalog import connect
    from catalog.driver import StorageDriver
    from catalog.sessions import UPLOAD, SessionStore

    uri, name, face, step = sys.argv[1:5]
    data = bytes(range(256)) * 8192 if len(sys.argv) < 6 else b"small" * int(sys.argv[5])
    ms = connect(uri, database=name, lease=2.0)
    if face == "driver":
        driver = StorageDriver(ms, "e")
        w = driver.writer("/blob")
        w.write(data)
        w.close()  # a checkpoint: these bytes are confirmed
        w = driver.writer("/blob", append=True)
    else:
        store = SessionStore(ms)
        session = store.create("e", "blob", kind=UPLOAD)
        store.append("e", session.id, 0, __import__("io").BytesIO(data), len(data))
        print(session.id, flush=True)  # a 204 PATCH: confirmed
        w = store.open("e", session.id)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if step == "after_link":  # the commit took effect; its session is not deleted yet
        from catalog.sessions import SessionWriter

        SessionWriter._end = die
    else:
        setattr(ms, step, die)
    w.commit()
    """
)


def _killed_in_commit(mongo_uri: str, db: Database[Any], face: str, step: str, *small: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", CHILD, mongo_uri, db.name, face, step, *small],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == -9, run.stderr[-2000:]
    time.sleep(LEASE + 1)  # the dead writer's session lease runs out
    return run.stdout.strip()


def _consistent_after_gc(ms: ManagedStorage) -> None:
    gc(ms, grace=0)
    report = fsck(ms, grace=0)
    assert not any(report.counts().values()), report.counts()


@pytest.mark.parametrize("step", ["_complete", "_link"])
def test_a_driver_writer_killed_in_commit_keeps_its_bytes(
    mongo_uri: str, db: Database[Any], step: str
) -> None:
    _killed_in_commit(mongo_uri, db, "driver", step)
    ms = connect(mongo_uri, database=db.name, lease=LEASE)
    driver = StorageDriver(ms, "e")
    w = driver.writer("/blob", append=True)  # finishes the dead commit, then appends
    assert w.size() == len(DATA)
    w.write(b"more")
    w.commit()
    assert driver.get_content("/blob") == DATA + b"more"
    _consistent_after_gc(ms)


@pytest.mark.parametrize("step", ["_complete", "_link"])
def test_a_retried_upload_commit_answers_after_the_service_died_in_it(
    mongo_uri: str, db: Database[Any], step: str
) -> None:
    session_id = _killed_in_commit(mongo_uri, db, "uploads", step)
    ms = connect(mongo_uri, database=db.name, lease=LEASE)
    info = SessionStore(ms).commit("e", session_id)  # the client's retry
    assert info.hash == blake3.blake3(DATA).hexdigest() and info.length == len(DATA)
    assert ms.stat_for_environment("e", "blob").revision == info.revision
    reader, length = ms.get_for_environment("e", "blob")
    with reader:
        assert length == len(DATA) and reader.read() == DATA
    _consistent_after_gc(ms)


def test_an_upload_whose_uploader_died_reads_failed_before_gc(managed: ManagedStorage) -> None:
    """Was: the Python API showed it `pending` until gc ran (HTTP and the CLI said failed)."""
    from catalog import history

    history.start_upload(managed.history, "e", "dead", 0.3, replacing=False)
    assert [e["state"] for e in managed.history_for_environment("e", "dead")] == ["pending"]
    time.sleep(0.5)  # nobody renews it: its uploader is gone
    assert [e["state"] for e in managed.history_for_environment("e", "dead")] == ["failed"]


@pytest.mark.parametrize("step", ["_complete", "_link"])
def test_gc_between_the_kill_and_the_retry_keeps_the_bytes(
    mongo_uri: str, db: Database[Any], step: str
) -> None:
    """Was (found by review of the roll-forward): gc took the stored file (an orphan) or
    the entry the dead writer had completed (refcount 1, no paths) with its bytes, and
    the retry then had nothing to finish. A session's bytes stay while it exists."""
    session_id = _killed_in_commit(mongo_uri, db, "uploads", step)
    ms = connect(mongo_uri, database=db.name, lease=LEASE)
    report = gc(ms, grace=0)
    assert not report.orphan_files and not report.unreferenced_entries, report.actions
    info = SessionStore(ms).commit("e", session_id)
    assert info.hash == blake3.blake3(DATA).hexdigest()
    reader, _ = ms.get_for_environment("e", "blob")
    with reader:
        assert reader.read() == DATA
    _consistent_after_gc(ms)


@pytest.mark.parametrize("small", [(), ("100",)], ids=["stored", "inline"])
def test_a_commit_that_took_effect_is_not_redone_over_a_newer_write(
    mongo_uri: str, db: Database[Any], small: tuple[str, ...]
) -> None:
    """Was (found by review of the roll-forward): a writer killed after its commit had
    linked the path (only deleting its session was left) had that commit done again
    by the next open, over a write acknowledged since; or, with nothing to roll
    forward, `writer(append=True)` refused to append to the newer file."""
    _killed_in_commit(mongo_uri, db, "driver", "after_link", *small)
    ms = connect(mongo_uri, database=db.name, lease=LEASE)
    driver = StorageDriver(ms, "e")
    driver.put_content("/blob", b"newer")  # acknowledged after the commit
    w = driver.writer("/blob", append=True)
    assert w.size() == len(b"newer")  # appends to the newer file
    w.write(b"+")
    w.commit()
    assert driver.get_content("/blob") == b"newer+"
    _consistent_after_gc(ms)


def test_a_retried_commit_that_took_effect_answers_with_it(
    mongo_uri: str, db: Database[Any]
) -> None:
    session_id = _killed_in_commit(mongo_uri, db, "uploads", "after_link")
    ms = connect(mongo_uri, database=db.name, lease=LEASE)
    info = SessionStore(ms).commit("e", session_id)  # the commit happened: its answer
    assert info.hash == blake3.blake3(DATA).hexdigest()
    assert ms.stat_for_environment("e", "blob").revision == info.revision
    _consistent_after_gc(ms)
