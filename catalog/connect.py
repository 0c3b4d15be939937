"""One call from a URI (or nothing) to a ready ManagedStorage."""

from __future__ import annotations

import os
from typing import Any

from pymongo import MongoClient

from catalog.managed import ManagedStorage
from catalog.resources import DEFAULT_LEASE

MEMORY_SCHEME = "mongomock://"


def open_database(uri: str | None = None, database: str = "rescat") -> Any:
    """The pymongo (or mongomock) Database for `uri`; without one, the embedded mongod."""
    uri = uri or os.environ.get("RESCAT_MONGO_URI") or None
    if uri is not None and uri.startswith(MEMORY_SCHEME):
        return _memory_client(uri)[database]
    if uri is None:
        from catalog.mongod import ensure_embedded

        uri = ensure_embedded()
    client: MongoClient[Any] = MongoClient(uri, tz_aware=True)
    return client[database]


_memory_clients: dict[str, Any] = {}


def _memory_client(uri: str) -> Any:
    """One in-memory server per URI, so two connects in a process see the same data."""
    import mongomock

    if uri not in _memory_clients:
        _memory_clients[uri] = mongomock.MongoClient(tz_aware=True)
    return _memory_clients[uri]


def connect(
    uri: str | None = None,
    database: str = "rescat",
    *,
    namespace: str = "resources",
    request_expiry: float = 60.0,
    lease: float | None = None,
) -> ManagedStorage:
    """A ManagedStorage on GridFS.

    `uri`: a MongoDB URI; else $RESCAT_MONGO_URI; else a local mongod of this
    user's own (started and reused). `mongomock://` (any suffix names a
    separate store) is an in-memory store for tests. `lease`: seconds an
    uploader's claim on a pending entry lasts without renewal (default 60, or
    $RESCAT_UPLOAD_LEASE).
    """
    from storage import GridFSStorage

    db = open_database(uri, database)
    if lease is None:
        lease = float(os.environ.get("RESCAT_UPLOAD_LEASE", DEFAULT_LEASE))
    return ManagedStorage(
        db, GridFSStorage(db, namespace), request_expiry=request_expiry, lease=lease
    )
