"""Bytes are not deleted while a reader streams them (read leases).

Readers loop over a path while it is replaced with large new contents and then
deleted: every read that started returns exactly the bytes it started on (or
NotFoundError once the path is gone), never a short or mixed stream; bytes that
nobody reads still go at once when their last reference does.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import blake3
from pymongo.database import Database

from catalog import ManagedStorage, NotFoundError
from tests.helpers import rand

MiB = 1024 * 1024


def files(db: Database[Any]) -> int:
    return db["resources.files"].count_documents({})


def test_readers_during_replace_and_delete_get_whole_versions(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    versions = [rand(64 * MiB, seed=i) for i in range(3)]
    hashes = {blake3.blake3(v).hexdigest() for v in versions}
    managed.put_for_environment("e", "big", io.BytesIO(versions[0]))
    stop = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                stream, length = managed.get_for_environment("e", "big")
            except NotFoundError:
                continue
            try:
                h = blake3.blake3()
                got = 0
                for piece in iter(lambda s=stream: s.read(MiB), b""):  # type: ignore[misc]
                    h.update(piece)
                    got += len(piece)
                assert got == length, f"short read: {got} of {length}"
                seen.append(h.hexdigest())
            except BaseException as exc:
                errors.append(exc)
                return
            finally:
                stream.close()

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for data in versions[1:]:
        managed.put_for_environment("e", "big", io.BytesIO(data))
    managed.remove_for_environment("e", "big")
    stop.set()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert seen and set(seen) <= hashes
    # Every reader closed: nothing references the old bytes and nothing is left.
    assert files(db) == 0
    assert db["read_leases"].count_documents({}) == 0


def test_unread_bytes_go_at_once(managed: ManagedStorage, db: Database[Any]) -> None:
    managed.put_for_environment("e", "p", io.BytesIO(rand(2 * MiB)))
    managed.put_for_environment("e", "p", io.BytesIO(rand(2 * MiB)))
    assert files(db) == 1
    managed.remove_for_environment("e", "p")
    assert files(db) == 0


def test_open_reader_keeps_bytes_until_closed(managed: ManagedStorage, db: Database[Any]) -> None:
    old = rand(3 * MiB)
    managed.put_for_environment("e", "p", io.BytesIO(old))
    stream, _ = managed.get_for_environment("e", "p")
    first = stream.read(100)
    managed.put_for_environment("e", "p", io.BytesIO(rand(3 * MiB)))  # last reference gone
    assert files(db) == 2  # still being read
    assert first + stream.read() == old
    stream.close()
    assert files(db) == 1


def test_gc_leaves_bytes_being_read(managed: ManagedStorage, db: Database[Any]) -> None:
    from catalog.gc import gc

    old = rand(2 * MiB)
    managed.put_for_environment("e", "p", io.BytesIO(old))
    stream, _ = managed.get_for_environment("e", "p")
    managed.remove_for_environment("e", "p")
    report = gc(managed, grace=0)
    assert report.in_flight >= 1 and files(db) == 1
    assert stream.read() == old
    stream.close()
    assert files(db) == 0
