"""Streaming reader over the chunks of one GridFS file.

pymongo's GridOut works, but it does not run on mongomock, and a `read(n)` loop
over it is ~1.5x slower than walking the chunk cursor. This reader walks one
cursor in `n` order, re-opens it only on a seek outside the chunk it is in, and
checks every chunk's index and size, so a file whose chunks vanish while it is
being read raises instead of returning a silently truncated stream.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

from pymongo.collection import Collection
from pymongo.cursor import Cursor

from storage.errors import CatalogError


class CorruptFileError(CatalogError):
    """A stored file is missing chunks or has chunks of the wrong size."""

    code = "corrupt_file"


class NotDurableError(CorruptFileError):
    """Bytes just written did not all reach a majority of the replica set.

    A failover rolled back some of them: the write did not happen, and nothing
    the client sent is at fault, so trying again (or resuming a session from the
    offset the error names) is the answer.
    """

    code = "not_durable"


class GridFSReader(io.RawIOBase):
    """A readable, seekable binary stream over a GridFS file."""

    def __init__(self, chunks: Collection[Any], file_doc: dict[str, Any]) -> None:
        super().__init__()
        self._chunks = chunks
        self.file_id = file_doc["_id"]
        self.filename: str = file_doc.get("filename", "")
        self.length: int = int(file_doc["length"])
        self.chunk_size: int = int(file_doc["chunkSize"])
        meta = file_doc.get("metadata") or {}
        self.blake3: str | None = meta.get("blake3")
        self._pos = 0
        self._cursor: Cursor[Any] | None = None
        self._next_n = 0  # chunk index the cursor yields next
        self._buf = b""
        self._buf_start = 0  # file offset of _buf[0]
        # Hooks for whoever hands the reader out (a read lease is renewed per chunk
        # fetched and released on close); the store itself needs neither.
        self.on_chunk: Callable[[], None] | None = None
        self.on_close: Callable[[], None] | None = None

    # -- io.RawIOBase -------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.length + offset
        else:
            raise ValueError(f"invalid whence: {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        parts: list[bytes] = []
        want = size
        while want > 0:
            piece = self.readchunk(want)
            if not piece:
                break
            parts.append(piece)
            want -= len(piece)
        return b"".join(parts)

    def readall(self) -> bytes:
        return b"".join(iter(self.readchunk, b""))

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
            self._cursor = None
        hook, self.on_close = self.on_close, None
        super().close()
        if hook is not None:
            hook()

    # -- chunk access ---------------------------------------------------------
    def readchunk(self, limit: int = -1) -> bytes:
        """The bytes from the current position to the end of its chunk (b"" at EOF)."""
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if self._pos >= self.length:
            return b""
        offset = self._pos - self._buf_start
        if not (0 <= offset < len(self._buf)):
            self._load(self._pos // self.chunk_size, limit)
            offset = self._pos - self._buf_start
        end = len(self._buf) if limit < 0 else min(len(self._buf), offset + limit)
        piece = self._buf[offset:end] if offset or end != len(self._buf) else self._buf
        self._pos += len(piece)
        return piece

    def iter_chunks(self, size: int = -1) -> Iterator[bytes]:
        """Yield the rest of the file (at most `size` bytes when >= 0) chunk by chunk."""
        left = size
        while left != 0:
            piece = self.readchunk(left)
            if not piece:
                return
            if left > 0:
                left -= len(piece)
            yield piece

    def _load(self, n: int, limit: int = -1) -> None:
        if self._cursor is None or n != self._next_n:
            if self._cursor is not None:
                self._cursor.close()
            # A short read after a seek (a proof range, a small Range GET) must not
            # pull the server's default first batch of up to 16 MiB of chunks.
            batch = 0 if limit < 0 else 2 + limit // self.chunk_size
            self._cursor = self._chunks.find(
                {"files_id": self.file_id, "n": {"$gte": n}},
                sort=[("n", 1)],
                batch_size=batch if batch <= 16 else 0,
            )
            self._next_n = n
        doc = next(self._cursor, None)
        if doc is None or doc["n"] != n:
            raise CorruptFileError(f"stored file {self.filename!r}: chunk {n} is missing")
        data = bytes(doc["data"])
        last = (self.length - 1) // self.chunk_size
        expected = self.chunk_size if n < last else self.length - last * self.chunk_size
        if len(data) != expected:
            raise CorruptFileError(
                f"stored file {self.filename!r}: chunk {n} has {len(data)} bytes, "
                f"expected {expected}"
            )
        self._buf = data
        self._buf_start = n * self.chunk_size
        self._next_n = n + 1
        if self.on_chunk is not None:
            self.on_chunk()
