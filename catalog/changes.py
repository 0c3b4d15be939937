"""Resumable change streams over path documents, opened before the first read.

A watcher that reads a state and then opens a stream "from now" can miss what
changed in between (docker/libkv#15). `PathChanges` takes the server's
operation time first and starts its events there (startAtOperationTime is
inclusive), so the watcher's read, made afterwards, is covered: every change
after the read comes, and the changes the read already reflects carry a
revision no larger than the one read, which is how watchers drop them.

A watcher gets, for one environment:

* every change of `managed.paths` (inserts only for that environment: updates
  and deletes carry just the document id, which the watcher knows from its
  read or from the insert that created the document; `focus` narrows them to
  the documents a watcher follows). Updates arrive as deltas: `updatedFields`
  holds `rev` on every change of content and `expires_at` on TTL renewals;
  the per-path event list is projected away.
* (content=True) the bytes of new small (inline) content. A put of new
  content inserts the entry before it links the path, so a watcher holds the
  bytes a change wrote even after the key was overwritten and those bytes
  deleted. On a stream of its own they come as the entry's insert; from the
  shared stream, inside the change that links them (changehub.CONTENT).

The events normally come from the process's one stream of the database
(catalog.changehub), since a stream per watcher costs mongod an oplog cursor
each. When that hub cannot cover the watcher's start time (or there is no
hub: mongomock, a standalone server), or the watcher fell behind the hub, the
watcher opens a stream of its own with the same filter on the server. When a
stream breaks (a failover, a killed cursor) it is reopened from its last
resume token, so nothing is lost or repeated; pymongo already resumes once on
its own, this covers the rest.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from bson import Timestamp
from pymongo.change_stream import ChangeStream
from pymongo.errors import PyMongoError

from catalog import changehub
from catalog.changehub import PATH_FIELDS, operation_time
from catalog.errors import CatalogError
from catalog.resources import INLINE

__all__ = ["PATH_FIELDS", "PathChanges", "operation_time"]

log = logging.getLogger("rescat.changes")

# Events after which a stream can never resume.
_ENDING = changehub.ENDING


class PathChanges:
    """Change events of one environment's paths (and new inline content), resumable."""

    def __init__(
        self,
        managed: Any,
        env_uuid: str,
        *,
        await_seconds: float = 0.25,
        defer: bool = False,
        content: bool = True,
    ) -> None:
        """Take the start time now; open the stream now, or (defer) at the first focus/next.

        content=False: no inserts of new inline content, for a watcher that
        shows no values (their bytes are most of what a stream carries).

        Deferring lets a watcher read first and then open a stream already
        narrowed to what it read: the stream still starts at this time. On
        the shared stream the watcher is subscribed at once either way: its
        filter is applied in this process, so a later focus costs nothing.
        """
        self._db = managed.db
        self._env = env_uuid
        self._paths = managed.paths.name
        self._catalog = managed.catalog.collection.name
        self._await_seconds = await_seconds
        self._content = content
        self._await_ms = max(int(await_seconds * 1000), 10)
        self._token: Any = None
        self._ids: list[Any] | None = None
        self._last_key: Any = None  # the path document of the update/delete last returned
        self._last_token: Any = None  # the resume token of the event last returned (shared)
        self._stream: ChangeStream[Any] | None = None
        self._closed = False
        self.ended = False  # True once the watched collection is gone: no more events
        self._start: Timestamp | None
        self._sub: changehub.Subscriber | None
        self._start, self._sub = changehub.subscribe(
            self._db, self._paths, self._catalog, env_uuid, content
        )
        if not defer and self._sub is None:
            self._open()

    @property
    def start_revision(self) -> int | None:
        """Where this stream starts, as a revision (a cluster time: seconds << 32 | increment)."""
        if self._start is None:
            return None
        return (int(self._start.time) << 32) | int(self._start.inc)

    @property
    def shared(self) -> bool:
        """True while the events come from the process's shared stream (not one of its own)."""
        return self._sub is not None

    def focus(self, ids: list[Any] | None) -> None:
        """Only updates and deletes of these path documents from now on (None: all).

        A stream of its own is reopened from where it is with the new filter,
        so the server drops other documents' changes instead of sending them
        to every watcher; inserts into the environment always come through.
        """
        if ids is not None and self._last_key is not None and self._last_key not in ids:
            # Resuming needs the event the token names to pass the new filter.
            ids = [*ids, self._last_key]
        if ids == self._ids:
            return
        self._ids = None if ids is None else list(ids)
        if self._sub is not None:
            self._sub.focus(self._ids)
            return
        if self._stream is not None:
            with contextlib.suppress(PyMongoError):
                self._stream.close()
            self._stream = None
        self._open()

    def _pipeline(self) -> list[dict[str, Any]]:
        paths, catalog = self._paths, self._catalog
        ids = {} if self._ids is None else {"documentKey._id": {"$in": self._ids}}
        wanted: list[dict[str, Any]] = [
            {"ns.coll": paths, "operationType": {"$in": ["update", "delete"]}, **ids},
            {
                "ns.coll": paths,
                "operationType": {"$in": ["insert", "replace"]},
                "fullDocument.env": self._env,
            },
            {"operationType": {"$in": sorted(_ENDING)}},
        ]
        if self._content:
            wanted.append(
                {"ns.coll": catalog, "operationType": "insert", "fullDocument.path": INLINE}
            )
        return [{"$match": {"$or": wanted}}, {"$project": changehub.projection()}]

    def _open(self) -> None:
        kwargs: dict[str, Any] = {}
        if self._token is not None:
            kwargs["resume_after"] = self._token
        elif self._start is not None:
            kwargs["start_at_operation_time"] = self._start
        self._stream = self._db.watch(self._pipeline(), max_await_time_ms=self._await_ms, **kwargs)
        self._remember()

    def _remember(self) -> None:
        if self._stream is not None:
            token = self._stream.resume_token
            if token is not None:
                self._token = token

    def next(self) -> dict[str, Any] | None:
        """The next event, or None once the stream has waited ~await_seconds with nothing new.

        The event's nested parts (fullDocument, updateDescription) may be shared
        with other watchers of the process: read them, do not change them.
        """
        if self._closed:
            raise CatalogError("the change stream is closed")
        if self.ended:
            return None
        if self._sub is not None:
            item = self._sub.take(self._await_seconds)
            if item is None:
                return None
            if item is changehub.END:
                self.ended = True
                self._leave()
                return None
            if isinstance(item, changehub.Failure):
                self._leave()  # a later next() tries again on a stream of its own
                raise CatalogError(item.message)
            if item is not changehub.BEHIND:
                return self._returned(item)
            self._leave()  # let go by the hub: resumes on its own after the last event
        return self._next_own()

    def _returned(self, event: dict[str, Any]) -> dict[str, Any]:
        key = None
        if event.get("ns", {}).get("coll") == self._paths and event.get("operationType") in (
            "update",
            "delete",
        ):
            key = (event.get("documentKey") or {}).get("_id")
        self._last_key = key
        self._last_token = event.get("_id")
        return dict(event)

    def _leave(self) -> None:
        """Off the shared stream; a stream of its own would resume after the last event returned."""
        if self._sub is not None:
            self._sub.hub.detach(self._sub)
            self._sub = None
            self._token = self._last_token

    def _next_own(self) -> dict[str, Any] | None:
        started = time.monotonic()
        delay = 0.05
        while True:
            try:
                if self._stream is None:
                    self._open()
                assert self._stream is not None
                event = self._stream.try_next()
            except PyMongoError as exc:
                verdict = changehub.failure(exc, time.monotonic() - started)
                if verdict is changehub.ENDED:
                    self.ended = True
                    self._drop(0)
                    return None
                if verdict is not None:
                    raise CatalogError(verdict) from exc
                log.warning("change stream broke (%s); resuming from its token", exc)
                self._drop(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._remember()
            if event is None and not self._stream.alive:  # closed under us: resume
                log.warning("change stream closed; resuming from its token")
                self._drop(0)
                continue
            if event is None:
                return None
            if event.get("operationType") in _ENDING:
                self.ended = True  # the database was dropped
                self._drop(0)
                return None
            return self._returned(event)

    def _drop(self, delay: float) -> None:
        """Forget a broken stream; the next read reopens it from the resume token."""
        if self._stream is not None:
            with contextlib.suppress(PyMongoError):
                self._stream.close()
            self._stream = None
        time.sleep(delay)

    def break_for_test(self) -> None:
        """Close the underlying stream as a failure would (tests of resumption).

        On the shared stream that is the hub's: it resumes for every subscriber.
        """
        if self._sub is not None:
            self._sub.hub.break_stream()
        elif self._stream is not None:
            self._stream.close()

    def close(self) -> None:
        self._closed = True
        self._leave()
        if self._stream is not None:
            with contextlib.suppress(PyMongoError):
                self._stream.close()
            self._stream = None

    def __enter__(self) -> PathChanges:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._sub is not None:  # dropped unclosed: stop queueing events for it
                self._sub.hub.detach(self._sub)
