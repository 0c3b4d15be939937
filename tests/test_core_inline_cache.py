"""Reads of small content: the entry a process has read or written is not asked for again."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import MongoClient, monitoring
from pymongo.database import Database

from catalog import ManagedStorage
from storage import GridFSStorage
from tests.helpers import b3


class Commands(monitoring.CommandListener):
    """The (command, collection) pairs a client sends."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        target = event.command.get(event.command_name)
        self.seen.append((event.command_name, target if isinstance(target, str) else ""))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
def watched(mongo_uri: str, db: Database[Any]) -> Iterator[tuple[Database[Any], Commands]]:
    commands = Commands()
    client: MongoClient[Any] = MongoClient(mongo_uri, tz_aware=True, event_listeners=[commands])
    yield client[db.name], commands
    client.close()


def read(managed: ManagedStorage, path: str) -> bytes:
    reader, _ = managed.open_path("e", path)
    with reader:
        return reader.read()


def test_a_small_read_asks_only_for_the_path_once_its_entry_is_known(
    watched: tuple[Database[Any], Commands],
) -> None:
    db, commands = watched
    writer = ManagedStorage(db, GridFSStorage(db))
    writer.put_path("e", "p", io.BytesIO(b"small"), 5)
    commands.seen.clear()
    assert read(writer, "p") == b"small"  # written here: known
    assert commands.seen == [("find", "paths")]

    other = ManagedStorage(db, GridFSStorage(db))  # another process: nothing known yet
    commands.seen.clear()
    assert read(other, "p") == b"small"
    assert ("find", "catalog") in commands.seen
    commands.seen.clear()
    assert read(other, "p") == b"small"
    assert commands.seen == [("find", "paths")]


def test_a_read_follows_the_path_not_what_it_held(managed: ManagedStorage) -> None:
    managed.put_path("e", "p", io.BytesIO(b"one"), 3)
    assert read(managed, "p") == b"one"
    managed.put_path("e", "p", io.BytesIO(b"two"), 3)
    assert read(managed, "p") == b"two"
    managed.delete_path("e", "p")
    with pytest.raises(Exception, match="no such path"):
        read(managed, "p")


def test_content_stored_anew_elsewhere_is_read_as_its_new_entry(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Deleted and stored again by another process, the same bytes are another entry."""
    other = ManagedStorage(db, GridFSStorage(db))
    first = managed.put_path("e", "a", io.BytesIO(b"same"), 4)
    assert read(managed, "a") == b"same"  # known here now
    other.delete_path("e", "a")  # its last reference: the entry goes
    second = other.put_path("e", "b", io.BytesIO(b"same"), 4)
    assert second.resource_id != first.resource_id and second.hash == b3(b"same")
    reader, info = managed.open_path("e", "b")
    with reader:
        assert reader.read() == b"same"
    assert info.resource_id == second.resource_id
    assert info.history == managed.catalog.entry(second.resource_id).history


def test_large_content_is_read_through_its_entry_every_time(
    watched: tuple[Database[Any], Commands],
) -> None:
    db, commands = watched
    managed = ManagedStorage(db, GridFSStorage(db))
    data = b"x" * (managed.inline_max + 1)
    managed.put_path("e", "big", io.BytesIO(data), len(data))
    for _ in range(2):
        commands.seen.clear()
        assert read(managed, "big") == data
        assert ("find", "catalog") in commands.seen


def test_damaged_bytes_read_from_the_database_are_not_kept(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Kept, they outlived their repair until the process ended (every read failing)."""
    from bson import Binary

    from catalog.kv import KVStore

    writer = ManagedStorage(db, GridFSStorage(db))
    writer.put_path("e", "p", io.BytesIO(b"hello\n"), 6)
    entries = db[managed.catalog.collection.name]
    entries.update_one({"hash": b3(b"hello\n")}, {"$set": {"data": Binary(b"HELLO\n")}})
    store = KVStore(managed, "e")
    try:
        assert read(managed, "p") == b"HELLO\n"  # as stored: fsck --verify-content finds it
        assert store.get("p").value == b"HELLO\n"
        entries.update_one({"hash": b3(b"hello\n")}, {"$set": {"data": Binary(b"hello\n")}})
        assert read(managed, "p") == b"hello\n"  # repaired: read again, not from memory
        assert store.get("p").value == b"hello\n"
    finally:
        store.close()
