"""The errors the byte store raises, and the root of every rescat error.

They live in the bottom layer so that storage needs nothing from the layers
above it; `catalog.errors` re-exports them (the contract names them there)
and derives every other error from the same root, so
`except catalog.errors.NotFoundError` also catches storage's.
"""

from __future__ import annotations


class CatalogError(Exception):
    """Base of every rescat error (storage, catalog, service and CLI)."""

    code = "catalog_error"


class NotFoundError(CatalogError, KeyError):
    """No such resource, path, hash or stored file."""

    code = "not_found"

    def __init__(self, *args: object, path: str = "") -> None:
        super().__init__(*args)
        self.path = path  # the missing path or key, where there is one

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else "not found"


class LengthMismatchError(CatalogError):
    """The content is not the length that was declared."""

    code = "length_mismatch"


class StaleWriteError(CatalogError):
    """A chunk to replace no longer holds what its writer last stored there.

    Another writer has rewritten (or deleted) it since: the write is refused
    rather than change bytes that are no longer the writer's.
    """

    code = "stale_write"


__all__ = ["CatalogError", "LengthMismatchError", "NotFoundError", "StaleWriteError"]
