"""A snapshot transaction of a process killed with -9 stops blocking others within seconds.

bolt's file lock goes with a dead process; a MongoDB transaction stayed open
until the server's lifetime limit (85 s measured), and every writer of the
namespace lost conflicts meanwhile. catalog.txnowners aborts it once its
owner is seen dead. A live transaction held open longer than that must not be
touched: the second test holds one open past STALE while another process
keeps losing conflicts against it, and it still commits.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

from pymongo.database import Database

from catalog import ManagedStorage
from catalog.errors import AlreadyExistsError
from catalog.snapshots import MetaStore
from catalog.txnowners import STALE

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pymongo import MongoClient
    from catalog import ManagedStorage
    from catalog.snapshots import MetaStore
    from storage import GridFSStorage

    uri, name, key, hold = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    db = MongoClient(uri, tz_aware=True)[name]
    ms = MetaStore(ManagedStorage(db, GridFSStorage(db)))
    tx = ms.transaction_context(True)
    tx.create_active(key, "")  # a create of the same key conflicts until this ends
    print("holding", flush=True)
    time.sleep(hold)
    tx.commit()
    print("committed", flush=True)
    """
)


def _hold(mongo_uri: str, db: Database[Any], key: str, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, mongo_uri, db.name, key, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "holding"
    return proc


def _create_in_thread(ms: MetaStore, key: str) -> tuple[threading.Thread, list[Any]]:
    done: list[Any] = []

    def run() -> None:
        try:
            done.append(ms.with_transaction(lambda tx: tx.create_active(key, "")))
        except Exception as exc:  # surfaced by the test
            done.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def test_a_killed_holder_s_transaction_is_aborted_within_seconds(
    mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    ms = MetaStore(managed)
    holder = _hold(mongo_uri, db, "dead", 600)
    holder.kill()
    holder.wait()
    started = time.monotonic()
    thread, done = _create_in_thread(ms, "dead")
    thread.join(STALE + 25)  # the server's own limit would take 60-85 s
    assert done and not isinstance(done[0], BaseException), done
    waited = time.monotonic() - started
    assert waited < STALE + 25, waited
    with ms.transaction(False) as tx:
        _, info = tx.get_info("dead")  # ours: nothing of the dead transaction is visible
        assert info.parent == ""
    assert db["txn_owners"].count_documents({}) == 1  # ours alone: the dead one's went


def test_a_live_transaction_held_past_stale_is_not_aborted(
    mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    ms = MetaStore(managed)
    hold = STALE * 2
    holder = _hold(mongo_uri, db, "slow", hold)
    try:
        thread, done = _create_in_thread(ms, "slow")  # loses conflicts until the holder ends
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "committed"
        assert holder.wait(30) == 0
        thread.join(60)
    finally:
        holder.kill()
    # The holder's create committed, so ours found the key taken (had the holder's
    # transaction been aborted, ours would have created it and the holder's commit failed).
    assert done and isinstance(done[0], AlreadyExistsError), done
    with ms.transaction(False) as tx:
        tx.get_active("slow")


LOCK_HOLDER = textwrap.dedent(
    """
    import os, signal, sys
    from pymongo import MongoClient
    from pymongo.client_session import ClientSession
    from catalog import ManagedStorage
    from catalog.kv import KVStore
    from storage import GridFSStorage

    db = MongoClient(sys.argv[1], tz_aware=True)[sys.argv[2]]
    kv = KVStore(ManagedStorage(db, GridFSStorage(db)), "locks")
    lock = kv.lock("lk", b"holder", ttl=2.0)
    assert lock.acquire(timeout=10)
    # Killed inside the fenced write's transaction, after it touched the lock document.
    ClientSession.commit_transaction = lambda self: os.kill(os.getpid(), signal.SIGKILL)
    print("holding", flush=True)
    lock.put("job", b"x")
    """
)


def test_a_lock_whose_holder_died_in_a_fenced_write_is_free_in_seconds(
    mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    """Was: the dead transaction held the lock's document ~60 s; a waiter's write waited
    inside the server that long (past its timeout), then acquire returned True with a
    lease that had expired while it waited, so two waiters could both "hold" it."""
    from catalog.kv import KVStore

    run = subprocess.run(
        [sys.executable, "-c", LOCK_HOLDER, mongo_uri, db.name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == -9 and "holding" in run.stdout, run.stderr[-2000:]
    time.sleep(2.5)  # the holder's ttl has run out
    held: list[tuple[str, float, float]] = []
    failures: list[BaseException] = []

    def waiter(name: str) -> None:
        store = KVStore(managed, "locks")
        lock = store.lock("lk", name.encode(), ttl=2.0)
        try:
            if lock.acquire(timeout=STALE + 20):
                got = time.monotonic()
                time.sleep(0.5)
                assert lock.held
                lock.release()  # raises CannotLockError if it was never really ours
                held.append((name, got, time.monotonic()))
        except BaseException as exc:
            failures.append(exc)
        finally:
            store.close()

    started = time.monotonic()
    waiters = [threading.Thread(target=waiter, args=(n,)) for n in ("A", "B")]
    for t in waiters:
        t.start()
    for t in waiters:
        t.join(90)
    assert not failures, failures
    assert len(held) == 2, held
    first = min(got for _, got, _ in held)
    assert first - started < STALE + 15, first - started  # the server alone: ~60 s
    (_, _, a_done), (_, b_got, _) = sorted(held, key=lambda h: h[1])
    assert b_got >= a_done, held  # one holder at a time


def test_a_forked_child_killed_in_a_transaction_is_reaped_too(
    mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    """Was (found by review): a store made before a fork gave the child its parent's
    owner document; the parent kept beating it, so the child's dead transaction held
    its writes ~87 s."""
    import os
    import signal
    import warnings

    ms = MetaStore(managed)
    with ms.transaction(True) as tx:  # the parent is registered before the fork
        tx.create_active("before", "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymongo warns about forking with a client open
        pid = os.fork()
    if pid == 0:  # the child: a transaction, then killed inside it
        try:
            child = ms.transaction_context(True)
            child.create_active("forked", "")
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status)
    started = time.monotonic()
    thread, done = _create_in_thread(ms, "forked")
    thread.join(STALE + 25)
    assert done and not isinstance(done[0], BaseException), done
    assert time.monotonic() - started < STALE + 25
