"""Review of the KV face: defects found using it as libkv's users would.

Each test reproduces one defect on a real mongod (threads, subprocesses and
SIGKILL where the defect is about them).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from catalog import ManagedStorage
from catalog.errors import InvalidArgumentError
from catalog.kv import MAX_TTL, KVPair, KVStore
from tests.helpers import pump

ENV = "kvreview"


@pytest.fixture
def kv(managed: ManagedStorage) -> Iterator[KVStore]:
    store = KVStore(managed, ENV)
    yield store
    store.close()


def _gone(kv: KVStore, key: str) -> None:
    """Wait until a TTL key whose owner stopped renewing has expired (bounded)."""
    for _ in range(200):
        if not kv.exists(key):
            return
        time.sleep(0.05)
    raise AssertionError(f"{key} never expired")


# -- watch_range and keys written over an expired TTL key ---------------------------------------
def test_watch_range_sees_a_key_rewritten_over_an_expired_ttl_key(
    kv: KVStore, managed: ManagedStorage
) -> None:
    """An expired (not yet reclaimed) key rewritten under the prefix is a change of the range.

    Its document still exists, so the rewrite is an update of a document the
    watch did not list: the watch dropped it and never showed the new key (a
    new lock holder after the old one died, say).
    """
    owner = KVStore(managed, ENV)
    owner.put("dir/a", b"old", ttl=0.5)
    owner.close()  # stops renewing: the key expires, its document stays until gc
    _gone(kv, "dir/a")
    events: queue.Queue[list[KVPair]] = queue.Queue()
    stop = threading.Event()
    pump(kv.watch_range("dir", stop=stop), events)
    try:
        assert events.get(timeout=10) == []
        pair = kv.put("dir/a", b"new")
        assert events.get(timeout=10) == [pair]
        lock = kv.lock("dir/leader", b"me", ttl=5)
        assert lock.acquire(timeout=5)
        assert [p.key for p in events.get(timeout=10)] == ["dir/a", "dir/leader"]
        lock.release()
    finally:
        stop.set()


# -- close() and locks being acquired ----------------------------------------------------------
def test_close_ends_a_blocked_acquire(kv: KVStore, managed: ManagedStorage) -> None:
    """A thread waiting for a held lock is let go when its store closes.

    It waited on until the other holder let go (forever, for a lock held that
    long), then failed anyway: a shutdown that closes the store hung on it.
    The wait ends as a stop ends it, with False (it raised InvalidArgumentError,
    a ValueError, for what is no bad argument).
    """
    holder = KVStore(managed, ENV)
    assert holder.lock("busy", b"holder", ttl=30).acquire()
    waiter = KVStore(managed, ENV)
    outcome: queue.Queue[object] = queue.Queue()

    def wait() -> None:
        try:
            outcome.put(waiter.lock("busy", b"waiter", ttl=30).acquire())
        except Exception as exc:
            outcome.put(exc)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)  # not needed for the outcome: let it reach its wait
        waiter.close()
        result = outcome.get(timeout=15)
        assert result is False
        assert kv.get("busy").value == b"holder"  # the holder keeps it
    finally:
        holder.close()
        waiter.close()


def _closing_after_its_next_write(
    managed: ManagedStorage, monkeypatch: pytest.MonkeyPatch
) -> KVStore:
    """A store whose close() lands just after its next write, before the call returns."""
    closing = KVStore(managed, ENV)
    put_path = managed.put_path

    def put_then_close(*args: Any, **kwargs: Any) -> Any:
        info = put_path(*args, **kwargs)
        closing.close()  # another thread shutting the store down, just now
        return info

    monkeypatch.setattr(managed, "put_path", put_then_close)
    return closing


def test_lock_taken_while_its_store_closes_is_given_back(
    kv: KVStore, managed: ManagedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() racing an acquisition: the lock is released, not left held by nobody.

    The write that took it landed after close() had collected the store's
    locks: acquire raised RuntimeError("renewer closed") and the key stayed
    locked, renewed by nobody, for the lock's whole ttl.
    """
    closing = _closing_after_its_next_write(managed, monkeypatch)
    lock = closing.lock("racy", b"x", ttl=60)
    with pytest.raises(InvalidArgumentError, match="closed"):
        lock.acquire()
    monkeypatch.undo()
    assert lock.lost.is_set() and not lock.held
    assert not kv.exists("racy")
    assert kv.lock("racy").acquire(blocking=False)  # free at once, not after 60 s


def test_a_ttl_put_whose_store_closes_during_the_write_succeeds(
    kv: KVStore, managed: ManagedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() landing while put(ttl=...) writes: the write stands and the put returns it.

    The put raised RuntimeError("renewer closed") although its value was
    written: a caller would retry or report a failure for a write that landed.
    Now it returns the pair, and the key lives out its first lease, as every
    TTL key of a closed store does.
    """
    closing = _closing_after_its_next_write(managed, monkeypatch)
    pair = closing.put("lease/racy", b"v", ttl=1)
    monkeypatch.undo()
    assert kv.get("lease/racy") == pair
    deadline = time.monotonic() + 10
    while kv.exists("lease/racy") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not kv.exists("lease/racy"), "nobody renews it: gone after its ttl"
    with pytest.raises(InvalidArgumentError, match="closed"):
        closing.put("lease/after", b"v", ttl=1)


# -- delete_range is one step ------------------------------------------------------------------
def test_delete_range_is_one_step_for_watchers(kv: KVStore) -> None:
    """DeleteTree removes the tree at once: a watcher never sees half of it.

    Each key went in a transaction of its own, so watch_range (and any reader,
    or a crash) saw the tree partly deleted.
    """
    keys = [f"tree/k{i:02d}" for i in range(40)]
    for key in keys:
        kv.put(key, key.encode())
    kv.put("treetop", b"outside")
    events: queue.Queue[list[KVPair]] = queue.Queue()
    stop = threading.Event()
    pump(kv.watch_range("tree", stop=stop), events)
    try:
        assert [p.key for p in events.get(timeout=10)] == keys
        kv.delete_range("tree")
        assert events.get(timeout=10) == []  # no list in between
        assert kv.get("treetop").value == b"outside"
        kv.put("tree/after", b"1")
        assert [p.key for p in events.get(timeout=10)] == ["tree/after"]
    finally:
        stop.set()


# -- TTL expiry seen by watches while the environment is busy ----------------------------------
def test_watches_see_a_ttl_key_expire_while_other_keys_change(
    kv: KVStore, managed: ManagedStorage
) -> None:
    """Expiry reaches watchers even when the stream never goes quiet.

    Watches decided expiry only when their stream had been idle for a moment:
    other keys being created (or any new small content in the database) more
    often than that kept an expired key shown forever.
    """
    owner = KVStore(managed, ENV)
    owner.put("lease/x", b"alive", ttl=1)
    key_events: queue.Queue[KVPair | None] = queue.Queue()
    range_events: queue.Queue[list[KVPair]] = queue.Queue()
    stop = threading.Event()
    busy = threading.Event()
    pump(kv.watch("lease/x", stop=stop), key_events)
    pump(kv.watch_range("lease", stop=stop), range_events)

    def noise() -> None:
        with KVStore(managed, ENV) as other:
            i = 0
            while not stop.is_set():
                other.put(f"noise/{i}", f"value {i}".encode())  # a new key, new content
                i += 1
                busy.set()
                time.sleep(0.02)

    writer = threading.Thread(target=noise, daemon=True)
    try:
        assert key_events.get(timeout=10) is not None
        assert [p.key for p in range_events.get(timeout=10)] == ["lease/x"]
        writer.start()
        busy.wait(10)
        owner._renewer.pause()  # the owner stalls: the key expires within 1 s
        assert key_events.get(timeout=15) is None
        assert range_events.get(timeout=15) == []
        assert not kv.exists("lease/x")
    finally:
        stop.set()
        owner.close()
        writer.join(10)


# -- a very long ttl ---------------------------------------------------------------------------
def test_a_huge_ttl_is_refused_and_renewals_go_on(kv: KVStore, managed: ManagedStorage) -> None:
    """A ttl too long to represent is a clear error; the longest allowed breaks nothing.

    ttl=1e12 raised OverflowError (a datetime past year 9999); ttl=1e11 was
    written, and its renewal wait (past threading.TIMEOUT_MAX) killed the
    store's renewal thread: every other TTL key and lock of the open store
    then expired.
    """
    for ttl in (1e11, 1e12, 1e300):
        with pytest.raises(InvalidArgumentError, match="ttl"):
            kv.put("far", b"x", ttl=ttl)
        with pytest.raises(InvalidArgumentError, match="ttl"):
            kv.lock("far", ttl=ttl)
    assert not kv.exists("far")
    kv.put("far", b"x", ttl=MAX_TTL)  # the longest allowed
    kv.put("short", b"y", ttl=0.6)
    time.sleep(1.5)  # past its ttl: the store, open, renews it
    assert kv.get("short").value == b"y"
    assert kv.get("far").value == b"x"


def test_a_slow_key_watcher_gets_every_large_value_as_written(kv: KVStore) -> None:
    """Values over the small-content size (64 KiB) were stored in GridFS and deleted by the
    next overwrite, so a key watch that read them after that skipped the change (3 of 20
    rapid 100 KiB overwrites reached a watcher reading every 0.2 s). Every KV value (at
    most 1 MiB) now travels inside its change, like small content."""
    stop = threading.Event()
    watch = kv.watch("big", stop=stop)
    assert next(watch) is None
    values = [bytes([i]) * (100 * 1024 + i) for i in range(1, 21)]
    for value in values:
        kv.put("big", value)
    seen: list[bytes] = []

    def read_slowly() -> None:
        for item in watch:
            assert item is not None
            seen.append(item.value)
            time.sleep(0.2)  # a slow reader: the values it has not read are overwritten

    reader = threading.Thread(target=read_slowly, daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while len(seen) < len(values) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    reader.join(10)
    assert [v[:1] for v in seen] == [v[:1] for v in values]
    assert seen == values
