"""GridFSStorage, after juju/blobstore's gridfs tests, on a real mongod."""

from __future__ import annotations

import io
from typing import Any

import gridfs
import pytest
from pymongo.database import Database

from catalog.errors import CatalogError, LengthMismatchError, NotFoundError
from storage import CorruptFileError, GridFSStorage, ResourceStorage
from tests.helpers import BrokenReader, OneWayReader, b3, rand


def counts(db: Database[Any], ns: str = "resources") -> tuple[int, int]:
    return db[f"{ns}.files"].count_documents({}), db[f"{ns}.chunks"].count_documents({})


def test_is_a_resource_storage(gridfs_storage: GridFSStorage) -> None:
    assert isinstance(gridfs_storage, ResourceStorage)


def test_put_get_returns_blake3(gridfs_storage: GridFSStorage) -> None:
    data = rand(3 * gridfs_storage.chunk_size + 17)
    assert gridfs_storage.put("some/path", io.BytesIO(data), len(data)) == b3(data)
    reader = gridfs_storage.get("some/path")
    assert reader.read() == data


def test_put_until_eof_with_negative_length(gridfs_storage: GridFSStorage) -> None:
    data = rand(100_000)
    assert gridfs_storage.put("p", OneWayReader(data, step=777), -1) == b3(data)
    assert gridfs_storage.get("p").read() == data


def test_put_reads_exactly_length(gridfs_storage: GridFSStorage) -> None:
    src = io.BytesIO(b"0123456789")
    gridfs_storage.put("p", src, 4)
    assert src.tell() == 4
    assert gridfs_storage.get("p").read() == b"0123"


def test_put_empty(gridfs_storage: GridFSStorage, db: Database[Any]) -> None:
    assert gridfs_storage.put("empty", io.BytesIO(b""), 0) == b3(b"")
    assert gridfs_storage.get("empty").read() == b""
    assert counts(db) == (1, 0)


def test_put_same_path_replaces(gridfs_storage: GridFSStorage, db: Database[Any]) -> None:
    gridfs_storage.put("p", io.BytesIO(b"first"), 5)
    gridfs_storage.put("p", io.BytesIO(b"second!"), 7)
    assert gridfs_storage.get("p").read() == b"second!"
    assert counts(db) == (1, 1)


def test_short_input_leaves_nothing(gridfs_storage: GridFSStorage, db: Database[Any]) -> None:
    data = rand(5 * gridfs_storage.chunk_size)
    with pytest.raises(LengthMismatchError) as info:
        gridfs_storage.put("p", io.BytesIO(data), len(data) + 1)
    assert isinstance(info.value, CatalogError)
    assert counts(db) == (0, 0)
    assert not gridfs_storage.exists("p")


def test_failing_reader_leaves_nothing(gridfs_storage: GridFSStorage, db: Database[Any]) -> None:
    # Large enough that several batches were inserted before the failure.
    data = rand(3 * gridfs_storage.batch_bytes)
    with pytest.raises(OSError):
        gridfs_storage.put("p", BrokenReader(data, 2 * gridfs_storage.batch_bytes + 5), -1)
    assert counts(db) == (0, 0)


def test_get_missing(gridfs_storage: GridFSStorage) -> None:
    with pytest.raises(NotFoundError):
        gridfs_storage.get("nope")


def test_remove(gridfs_storage: GridFSStorage, db: Database[Any]) -> None:
    gridfs_storage.put("p", io.BytesIO(b"x" * 10), 10)
    gridfs_storage.remove("p")
    assert counts(db) == (0, 0)
    with pytest.raises(NotFoundError):
        gridfs_storage.remove("p")


def test_namespaces_are_separate(db: Database[Any]) -> None:
    one, two = GridFSStorage(db, "one"), GridFSStorage(db, "two")
    one.put("p", io.BytesIO(b"one"), 3)
    with pytest.raises(NotFoundError):
        two.get("p")
    two.put("p", io.BytesIO(b"two"), 3)
    one.remove("p")
    assert two.get("p").read() == b"two"


def test_files_are_standard_gridfs(gridfs_storage: GridFSStorage, db: Database[Any]) -> None:
    data = rand(2 * gridfs_storage.chunk_size + 5)
    gridfs_storage.put("std", io.BytesIO(data), len(data))
    bucket = gridfs.GridFSBucket(db, bucket_name="resources")
    assert bucket.open_download_stream_by_name("std").read() == data


def test_reads_files_written_by_pymongo(gridfs_storage: GridFSStorage, db: Database[Any]) -> None:
    data = rand(600_000)
    gridfs.GridFSBucket(db, bucket_name="resources").upload_from_stream("theirs", data)
    assert gridfs_storage.get("theirs").read() == data


def test_reader_seek_and_partial_reads(gridfs_storage: GridFSStorage) -> None:
    size = gridfs_storage.chunk_size
    data = rand(3 * size + 100)
    gridfs_storage.put("p", io.BytesIO(data), len(data))
    reader = gridfs_storage.get("p")
    assert reader.seekable() and reader.length == len(data)
    reader.seek(size - 10)
    assert reader.read(20) == data[size - 10 : size + 10]
    reader.seek(-50, io.SEEK_END)
    assert reader.read() == data[-50:]
    reader.seek(5)
    assert reader.read(3) == data[5:8]
    assert b"".join(reader.iter_chunks()) == data[8:]
    assert reader.read(10) == b""


def test_reader_detects_missing_chunk(gridfs_storage: GridFSStorage, db: Database[Any]) -> None:
    data = rand(3 * gridfs_storage.chunk_size)
    gridfs_storage.put("p", io.BytesIO(data), len(data))
    db["resources.chunks"].delete_one({"n": 1})
    with pytest.raises(CorruptFileError):
        gridfs_storage.get("p").read()


def test_chunk_problems(gridfs_storage: GridFSStorage, db: Database[Any]) -> None:
    data = rand(3 * gridfs_storage.chunk_size + 1)
    gridfs_storage.put("p", io.BytesIO(data), len(data))
    stored = gridfs_storage.stat("p")
    assert gridfs_storage.chunk_problems(stored) == []
    db["resources.chunks"].delete_one({"n": 2})
    assert gridfs_storage.chunk_problems(stored) == ["chunk 2 missing"]


def test_put_streams_in_batches(gridfs_storage: GridFSStorage, db: Database[Any]) -> None:
    """Chunks are inserted batch by batch, not one round trip each."""
    commands: list[str] = []
    from pymongo import monitoring

    class Listener(monitoring.CommandListener):
        def started(self, event: monitoring.CommandStartedEvent) -> None:
            commands.append(event.command_name)

        def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
            pass

        def failed(self, event: monitoring.CommandFailedEvent) -> None:
            pass

    from pymongo import MongoClient

    host, port = db.client.address  # type: ignore[misc]
    client: MongoClient[Any] = MongoClient(
        host, port, directConnection=True, event_listeners=[Listener()]
    )
    try:
        store = GridFSStorage(client[db.name], "batched")
        commands.clear()
        data = rand(4 * store.batch_bytes)
        store.put("p", io.BytesIO(data), len(data))
        batches = len(data) // store.batch_bytes
        # one insert per batch of chunks, plus the files document (the commit point)
        assert commands.count("insert") == batches + 1 < len(data) // store.chunk_size
    finally:
        client.close()
