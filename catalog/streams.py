"""Reader helpers for uploads: hashing passes and a reader that reports progress."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, BinaryIO

import blake3

from storage.gridfs_storage import read_exact

__all__ = [
    "Heartbeat",
    "PrefixedReader",
    "WatchedReader",
    "binary_source",
    "hash_stream",
    "read_exact",
]

HASH_BLOCK = 4 * 1024 * 1024


def is_seekable(reader: Any) -> bool:
    try:
        return bool(reader.seekable()) and reader.tell() >= 0
    except (AttributeError, OSError, ValueError):
        return False


def hash_stream(reader: BinaryIO, length: int = -1) -> tuple[str, int]:
    """BLAKE3 hex and byte count of the next `length` bytes (< 0: to EOF)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    total = hash_into(hasher, reader, length)
    return hasher.hexdigest(), total


def hash_into(
    hasher: Any,
    reader: BinaryIO,
    length: int = -1,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Feed the next `length` bytes (< 0: to EOF) to `hasher`; return how many there were.

    on_progress(done) is called after each block, for progress bars.
    """
    total = 0
    while length < 0 or total < length:
        want = HASH_BLOCK if length < 0 else min(HASH_BLOCK, length - total)
        data = reader.read(want)
        if not data:
            break
        hasher.update(data)
        total += len(data)
        if on_progress is not None:
            on_progress(total)
    return total


class WatchedReader:
    """Counts the bytes read through it (the storage protocol returns only a hash)."""

    def __init__(self, inner: BinaryIO) -> None:
        self._inner = inner
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if data:
            self.count += len(data)
        return data if data is not None else b""

    def readable(self) -> bool:
        return True


class PrefixedReader:
    """Bytes already read from a one-way stream, then the rest of that stream.

    A put reads up to the inline limit to learn whether content is small; when
    it is not, the bytes it took must still come first.
    """

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def read(self, size: int = -1) -> bytes:
        if self._head:
            n = len(self._head) if size is None or size < 0 else min(size, len(self._head))
            out = bytes(self._head[:n])
            self._head = self._head[n:]
            return out
        data = self._rest.read(size)
        return data if data is not None else b""

    def readable(self) -> bool:
        return True


class Heartbeat:
    """Calls `beat` every `every` seconds on a daemon thread while the block runs.

    An uploader's lease must mean "the uploader is alive", not "it read bytes
    recently": a write stalled on a busy server must not let the lease lapse,
    while a killed process stops beating at once.
    """

    def __init__(self, beat: Callable[[], None], every: float) -> None:
        self._beat = beat
        self._every = max(every, 0.01)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rescat-lease", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._beat()
            except Exception:  # a missed beat is retried; the upload decides the outcome
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


def binary_source(
    reader: BinaryIO | bytes | bytearray | memoryview, length: int = -1
) -> tuple[BinaryIO, int]:
    """What a put reads: a binary reader, or the bytes themselves (as httpx takes them).

    A `str` is refused (which encoding?), as is a file opened in text mode.
    """
    if isinstance(reader, (bytes, bytearray, memoryview)):
        view = memoryview(reader)
        if length not in (-1, view.nbytes):
            raise ValueError(f"length {length} given for {view.nbytes} bytes")
        return io.BytesIO(view), view.nbytes
    if isinstance(reader, (str, io.TextIOBase)):
        raise TypeError(
            f"put() needs bytes or a binary reader, not {type(reader).__name__}: "
            "encode the text, or open the file in binary mode ('rb')"
        )
    return reader, length
