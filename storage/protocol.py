"""The one interface the catalog needs from a byte store.

Kept as small as juju/blobstore's ResourceStorage so that any store (GridFS, a
filesystem, an object store) can sit under ManagedStorage: the catalog only
ever puts bytes at a path it chose, reads them back and removes them.
"""

from __future__ import annotations

from typing import BinaryIO, Protocol, runtime_checkable


@runtime_checkable
class ResourceStorage(Protocol):
    def put(self, path: str, reader: BinaryIO, length: int) -> str:
        """Store exactly `length` bytes (< 0: until EOF) at `path`; return their BLAKE3 hex."""
        ...

    def get(self, path: str) -> BinaryIO:
        """A readable, seekable stream of the bytes at `path` (NotFoundError)."""
        ...

    def remove(self, path: str) -> None:
        """Delete the bytes at `path` (NotFoundError)."""
        ...
