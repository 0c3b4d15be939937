"""docker/libkv's backend conformance suite (testutils/utils.go), ported to KVStore.

Each test mirrors one function of the Go suite, in its order and with its keys
and values; timings are shortened (TTLs of 1-2 s instead of 2-3 s). Where the
Go suite checks only that some error happened, the exact contract type is
checked here; its vacuous `assert.Error(t, store.ErrKeyExists)` checks (which
pass whatever the store does) are real checks of AlreadyExistsError /
NotFoundError. `kv` and `other` are two stores on two separate MongoClients,
as the Go suite's `kv` and `backup` connections.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from catalog import ManagedStorage
from catalog.errors import AlreadyExistsError, KeyModifiedError, NotFoundError
from catalog.kv import KVPair, KVStore
from storage import GridFSStorage
from tests.helpers import pump

ENV = "libkv"


@pytest.fixture
def kv(managed: ManagedStorage) -> Iterator[KVStore]:
    store = KVStore(managed, ENV)
    yield store
    store.close()


@pytest.fixture
def other(mongo_uri: str, db: Database[Any]) -> Iterator[KVStore]:
    """A second connection (its own MongoClient) to the same environment."""
    client: MongoClient[Any] = MongoClient(mongo_uri, tz_aware=True)
    second = client[db.name]
    store = KVStore(ManagedStorage(second, GridFSStorage(second)), ENV)
    yield store
    store.close()
    client.close()


# -- Common ----------------------------------------------------------------------------
def test_put_get_delete_exists(kv: KVStore) -> None:
    with pytest.raises(NotFoundError):
        kv.get("testPutGetDelete_not_exist_key")

    value = b"bar"
    for key in (
        "testPutGetDeleteExists",
        "testPutGetDeleteExists/",
        "testPutGetDeleteExists/testbar/",
        "testPutGetDeleteExists/testbar/testfoobar",
    ):
        kv.put(key, value)
        pair = kv.get(key)
        assert pair.value == value, key
        assert pair.last_index != 0
        assert pair.key == key.strip("/")
        assert kv.exists(key) is True
        kv.delete(key)
        with pytest.raises(NotFoundError) as info:
            kv.get(key)
        assert info.value.path == key.strip("/")
        assert kv.exists(key) is False


def test_list(kv: KVStore) -> None:
    prefix = "testList"
    first_key, first_value = "testList/first", b"first"
    second_key, second_value = "testList/second", b"second"
    kv.put(first_key, first_value)
    kv.put(second_key, second_value)
    for parent in (prefix, prefix + "/"):
        pairs = kv.get_range(parent)
        assert len(pairs) == 2
        values = {pair.key: pair.value for pair in pairs}
        assert values == {first_key: first_value, second_key: second_value}
    with pytest.raises(NotFoundError):
        kv.get_range("idontexist")


def test_delete_tree(kv: KVStore) -> None:
    prefix = "testDeleteTree"
    first_key, first_value = "testDeleteTree/first", b"first"
    second_key, second_value = "testDeleteTree/second", b"second"
    kv.put(first_key, first_value)
    kv.put(second_key, second_value)
    pair = kv.get(first_key)
    assert pair.value == first_value and pair.last_index != 0
    pair = kv.get(second_key)
    assert pair.value == second_value and pair.last_index != 0

    kv.delete_range(prefix)

    with pytest.raises(NotFoundError):
        kv.get(first_key)
    with pytest.raises(NotFoundError):
        kv.get(second_key)


# -- Atomic ----------------------------------------------------------------------------
def test_atomic_put(kv: KVStore) -> None:
    key, value = "testAtomicPut", b"world"
    kv.put(key, value)
    pair = kv.get(key)
    assert pair.value == value and pair.last_index != 0

    # This CAS should fail: previous exists.
    with pytest.raises(AlreadyExistsError):
        kv.atomic_put(key, b"WORLD", None)
    assert kv.get(key) == pair

    # This CAS should succeed.
    new = kv.atomic_put(key, b"WORLD", pair)
    assert new.value == b"WORLD" and new.last_index > pair.last_index

    # This CAS should fail: the index is wrong.
    stale = KVPair(pair.key, pair.value, 6744)
    with pytest.raises(KeyModifiedError):
        kv.atomic_put(key, b"WORLDWORLD", stale)
    assert kv.get(key) == new


def test_atomic_put_create(kv: KVStore) -> None:
    # A key in a new directory: stores must create what does not exist yet.
    key, value = "testAtomicPutCreate/create", b"putcreate"
    created = kv.atomic_put(key, value, None)
    assert created.value == value

    pair = kv.get(key)
    assert pair.value == value
    assert pair == created

    # Attempting to create again must fail, with the contract's error.
    with pytest.raises(AlreadyExistsError):
        kv.atomic_put(key, value, None)

    # This CAS should succeed, since it has the pair from get().
    kv.atomic_put(key, b"PUTCREATE", pair)
    assert kv.get(key).value == b"PUTCREATE"


def test_atomic_put_with_slash_suffix_key(kv: KVStore) -> None:
    k1 = "testAtomicPutWithSlashSuffixKey/key/"
    pair = kv.atomic_put(k1, b"", None)
    assert pair.key == "testAtomicPutWithSlashSuffixKey/key"
    assert kv.get(k1).value == b""


def test_atomic_delete(kv: KVStore) -> None:
    key, value = "testAtomicDelete", b"world"
    kv.put(key, value)
    pair = kv.get(key)
    assert pair.value == value and pair.last_index != 0

    # AtomicDelete should fail: wrong index, and nothing changes.
    with pytest.raises(KeyModifiedError):
        kv.atomic_delete(key, KVPair(key, value, 6744))
    assert kv.get(key) == pair

    # AtomicDelete should succeed.
    kv.atomic_delete(key, pair)
    assert not kv.exists(key)

    # Deleting a key that does not exist must fail, with the contract's error.
    with pytest.raises(NotFoundError):
        kv.atomic_delete(key, pair)


# -- Watch -----------------------------------------------------------------------------
def test_watch(kv: KVStore) -> None:
    key, value, new_value = "testWatch", b"world", b"world!"
    kv.put(key, value)

    stop = threading.Event()
    events: queue.Queue[KVPair | None] = queue.Queue()
    pump(kv.watch(key, stop=stop), events)

    def update_loop() -> None:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            time.sleep(0.25)
            kv.put(key, new_value)

    updater = threading.Thread(target=update_loop, daemon=True)
    updater.start()
    try:
        for count in range(1, 4):
            event = events.get(timeout=4)
            assert event is not None
            assert event.key == key
            assert event.value == (value if count == 1 else new_value)
    finally:
        stop.set()
        updater.join()


def test_watch_tree(kv: KVStore) -> None:
    directory = "testWatchTree"
    nodes = {
        "testWatchTree/node1": b"node1",
        "testWatchTree/node2": b"node2",
        "testWatchTree/node3": b"node3",
    }
    for node, value in nodes.items():
        kv.put(node, value)

    stop = threading.Event()
    events: queue.Queue[list[KVPair]] = queue.Queue()
    pump(kv.watch_range(directory, stop=stop), events)

    def delete_later() -> None:
        time.sleep(0.5)
        kv.delete("testWatchTree/node3")

    deleter = threading.Thread(target=delete_later, daemon=True)
    deleter.start()
    try:
        first = events.get(timeout=4)
        assert {p.key: p.value for p in first} == nodes
        # The Delete event on a child node.
        second = events.get(timeout=4)
        assert [p.key for p in second] == ["testWatchTree/node1", "testWatchTree/node2"]
    finally:
        stop.set()
        deleter.join()


# -- Lock ------------------------------------------------------------------------------
def test_lock_unlock(kv: KVStore) -> None:
    key, value = "testLockUnlock", b"bar"
    lock = kv.lock(key, value, ttl=2)
    assert lock.acquire() is True

    pair = kv.get(key)
    assert pair.value == value and pair.last_index != 0

    lock.release()

    assert lock.acquire() is True
    pair = kv.get(key)
    assert pair.value == value and pair.last_index != 0
    lock.release()


def test_lock_ttl(kv: KVStore, other: KVStore) -> None:
    key, value = "testLockTTL", b"bar"
    ttl = 1.0

    first = other.lock(key, value, ttl=ttl)
    assert first.acquire() is True
    pair = other.get(key)
    assert pair.value == value and pair.last_index != 0

    time.sleep(ttl * 1.5)  # renewals keep it alive past its ttl

    second = kv.lock(key, b"foobar", ttl=1.5)
    stop = threading.Event()
    done = threading.Event()
    result: list[bool] = []

    def try_lock() -> None:
        result.append(second.acquire(stop=stop))
        done.set()

    threading.Thread(target=try_lock, daemon=True).start()
    # The lock is still held and renewed: the other client must stay blocked.
    assert not done.wait(2.0), "lock taken while another client holds and renews it"
    stop.set()
    assert done.wait(2.0) and result == [False]

    # The holder stops renewing (the Go suite closes its renewal channel).
    other._renewer.pause()
    assert first.lost.wait(ttl + 1.0), "holder not told it lost the lock"

    # The lock is now free for the other client.
    got: queue.Queue[bool] = queue.Queue()
    threading.Thread(target=lambda: got.put(second.acquire()), daemon=True).start()
    assert got.get(timeout=4) is True
    assert second.fence > first.fence

    pair = kv.get(key)
    assert pair.value == b"foobar" and pair.last_index != 0
    second.release()


def test_lock_wait(kv: KVStore) -> None:
    key = "testLockWait"
    lock1 = kv.lock(key, ttl=2)
    assert lock1.acquire() is True

    lock2 = kv.lock(key, ttl=2)
    got_lock2 = threading.Event()

    def take() -> None:
        assert lock2.acquire() is True
        got_lock2.set()

    threading.Thread(target=take, daemon=True).start()

    # The other client blocks (the Go suite waits 5 s).
    assert not got_lock2.wait(2.5), "the second client got a held lock"

    lock1.release()
    # Woken by the change stream, well before any poll interval would matter.
    assert got_lock2.wait(2.0), "the second client was not woken by the release"
    assert lock2.fence > lock1.fence
    lock2.release()


# -- TTL -------------------------------------------------------------------------------
def test_put_ttl(kv: KVStore, other: KVStore) -> None:
    first_key, first_value = "testPutTTL", b"foo"
    second_key, second_value = "second", b"bar"

    other.put(first_key, first_value, ttl=1)
    other.put(second_key, second_value, ttl=1)

    assert kv.get(first_key).value == first_value
    assert kv.get(second_key).value == second_value

    time.sleep(1.5)  # renewed by the open store: still there after its ttl
    assert kv.get(first_key).value == first_value

    other.close()
    time.sleep(1.5)  # let the session expire

    with pytest.raises(NotFoundError):
        kv.get(first_key)
    with pytest.raises(NotFoundError):
        kv.get(second_key)
