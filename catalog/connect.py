"""One call from a URI (or nothing) to a ready ManagedStorage."""

from __future__ import annotations

import os
import re
from typing import Any

import pymongo
from pymongo import MongoClient

from catalog.errors import CatalogError
from catalog.managed import ManagedStorage
from catalog.resources import DEFAULT_LEASE

MEMORY_SCHEME = "mongomock://"
# Seconds a configured server has to answer the first ping (RESCAT_CONNECT_TIMEOUT).
CONNECT_TIMEOUT = float(os.environ.get("RESCAT_CONNECT_TIMEOUT", "5"))


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
    return _checked_client(uri)[database]


class DatabaseUnavailableError(CatalogError):
    """A configured MongoDB URI is malformed or its server does not answer."""

    code = "database_unavailable"


def redact(uri: str) -> str:
    """The URI with its password masked: it goes into messages and logs."""
    return re.sub(r"^(mongodb(?:\+srv)?://[^:/@]*):[^@/]*@", r"\1:***@", uri)


def _checked_client(uri: str) -> MongoClient[Any]:
    """A client for `uri`, known to reach its server, or one line that says what to check.

    Without the check the first operation waits out the driver's 30 s server
    selection and then fails with a dump of its topology; a user who mistyped
    a host wants to know within seconds.
    """
    from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError

    shown = redact(uri)
    try:
        if not uri.startswith(("mongodb://", "mongodb+srv://")):
            raise InvalidURI("it does not start with mongodb:// or mongodb+srv://")
        client: MongoClient[Any] = MongoClient(uri, tz_aware=True)
    except (InvalidURI, ConfigurationError, ValueError, TypeError) as exc:
        raise DatabaseUnavailableError(
            f"not a MongoDB URI: {shown!r} ({_first_line(exc)}); "
            "expected mongodb://HOST:PORT/?replicaSet=NAME (check --mongo-uri / RESCAT_MONGO_URI)"
        ) from None
    try:
        with pymongo.timeout(CONNECT_TIMEOUT):
            client.admin.command("ping")
    except PyMongoError as exc:
        client.close()
        raise DatabaseUnavailableError(
            f"cannot reach MongoDB at {shown} within {CONNECT_TIMEOUT:g} s "
            f"({_first_line(exc)[:120]}): check the host, the port, that mongod runs and "
            "accepts connections from here, and the credentials "
            "(--mongo-uri / RESCAT_MONGO_URI)"
        ) from None
    return client


def _first_line(exc: BaseException) -> str:
    text = re.split(r" \(configured timeouts|, Timeout:|, Topology Description", str(exc))[0]
    return " ".join(text.split()) or type(exc).__name__


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
    dedup_scope: str | None = None,
) -> ManagedStorage:
    """A ManagedStorage on GridFS.

    `uri`: a MongoDB URI; else $RESCAT_MONGO_URI; else a local mongod of this
    user's own (started and reused). `mongomock://` (any suffix names a
    separate store) is an in-memory store for tests. `lease`: seconds an
    uploader's claim on a pending entry lasts without renewal (default 60, or
    $RESCAT_UPLOAD_LEASE). `dedup_scope`: "global" (default, or
    $RESCAT_DEDUP_SCOPE) or "environment" (a put-request only finds content the
    same environment already references).
    """
    from storage import GridFSStorage

    db = open_database(uri, database)
    if lease is None:
        lease = float(os.environ.get("RESCAT_UPLOAD_LEASE", DEFAULT_LEASE))
    scope = dedup_scope or os.environ.get("RESCAT_DEDUP_SCOPE", "global")
    return ManagedStorage(
        db,
        GridFSStorage(db, namespace),
        request_expiry=request_expiry,
        lease=lease,
        dedup_scope=scope,
    )
