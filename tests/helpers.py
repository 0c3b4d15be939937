"""Small readers and data makers shared by the core tests."""

from __future__ import annotations

import io
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import blake3
from pymongo import MongoClient


def rand(n: int, seed: int | None = None) -> bytes:
    if seed is None:
        return os.urandom(n)
    import random

    return random.Random(seed).randbytes(n)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


class OneWayReader(io.RawIOBase):
    """A non-seekable reader that returns short reads, like a socket."""

    def __init__(self, data: bytes, step: int = 65536) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = len(self._data) - self._pos
        n = min(size, self._step, len(self._data) - self._pos)
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out


class BrokenReader(OneWayReader):
    """Fails with OSError after `fail_after` bytes, like a dropped connection."""

    def __init__(self, data: bytes, fail_after: int) -> None:
        super().__init__(data)
        self._fail_after = fail_after

    def read(self, size: int | None = -1) -> bytes:
        if self._pos >= self._fail_after:
            raise OSError("connection reset by peer")
        return super().read(size)


def gridfs_files(managed: Any) -> int:
    """GridFS files documents in every bucket of the managed storage's database."""
    return sum(
        managed.db[name].count_documents({})
        for name in managed.db.list_collection_names()
        if name.endswith(".files")
    )


def change_streams(client: MongoClient[Any], database: str) -> int:
    """Change-stream cursors open on `database` (running or idle)."""
    count = 0
    for op in client.admin.aggregate([{"$currentOp": {"idleCursors": True, "allUsers": True}}]):
        command = op.get("cursor", {}).get("originatingCommand") or op.get("command") or {}
        pipeline = command.get("pipeline") or []
        if op.get("ns", "").split(".")[0] == database and any(
            "$changeStream" in stage for stage in pipeline
        ):
            count += 1
    return count


def flip_chunk_bit(db: Any, storage_path: str, n: int, byte: int) -> None:
    """Damage stored bytes in place: one bit of chunk n of the GridFS file `storage_path`."""
    file_doc = db["resources.files"].find_one({"filename": storage_path})
    assert file_doc is not None
    chunk = db["resources.chunks"].find_one({"files_id": file_doc["_id"], "n": n})
    assert chunk is not None
    flipped = bytearray(chunk["data"])
    flipped[byte] ^= 0x01
    db["resources.chunks"].update_one({"_id": chunk["_id"]}, {"$set": {"data": bytes(flipped)}})


def pump(iterator: Iterator[Any], into: queue.Queue[Any]) -> threading.Thread:
    """Feed what `iterator` yields (a watch) into `into`, on a daemon thread."""

    def run() -> None:
        for item in iterator:
            into.put(item)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
