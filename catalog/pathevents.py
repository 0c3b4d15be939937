"""Put and delete events of an environment's paths: replayed from history, then live.

The HTTP watch (`GET /v1/environments/{env}/watch`) sends these. An event is
`{"type": "put", "path", "hash", "length", "revision"}` or
`{"type": "delete", "path", "revision"}`.

Like the KV watches (catalog.kv), `PathEvents` takes the server's operation
time before its first read and opens its change stream there
(catalog.changes.PathChanges), so nothing is lost between the read and the
stream; a change the read already covers is dropped by revision: per path, an
event is sent only if its revision is above every revision already sent or
read for that path (dedupe by path and revision).

* `since=None`: only changes after the read.
* `since=R`: first the changes with a revision above R, from the history
  (the path documents' `events`, `path_history` and `path_archive`, which
  outlive the oplog),
  in revision order; then live. 410 `request_expired` (RequestExpiredError)
  when events above R may have been trimmed: R is below the environment's
  history floor (the largest revision that retention by age has removed,
  recorded by `catalog.history.trim`), or (should archiving have failed for
  long) a path whose history document was cut starts above R.

A deletion's revision is the `path_history` entry that closed the path: the
first closing entry (`delete`, or `move` away) above the deleted document's
last revision. A TTL key that expires is sent as a delete when it is deleted
(gc's `reclaim_expired`), not at the moment it stops being readable.

Across different paths, events come in the order their changes committed,
which for concurrent writers can differ from revision order; for one path they
are always in revision order. So a watcher that resumes must not ask for
`since=<the last revision it got>`: a change that committed later with a
smaller revision would be skipped. It asks for `resume_since(newest, floor)`
and drops what it has already had by (path, revision), as
`service.client.CatalogClient.watch` does.
"""

from __future__ import annotations

import collections
import re
from typing import Any

from catalog import history
from catalog.archive import buckets_since
from catalog.changes import PathChanges
from catalog.errors import RequestExpiredError
from catalog.pathdocs import (
    EVENTS_CAP,
    EVENTS_SHOWN,
    HISTORY_CUT_TO,
    HISTORY_SHOWN,
    path_events,
    revision,
)

# A watch following at most this many path documents has the server filter their changes.
FOCUS_MAX = 1000
# A change's revision is the cluster time when its write ran; its event comes when it
# commits. A write runs at most a transaction's life (MongoDB's
# transactionLifetimeLimitSeconds, 60 s), plus slack, so every change a watcher has
# not had yet is above (the newest revision it had) - this.
RESUME_WINDOW = 61 << 32
_CLOSING = {"$or": [{"event": "delete"}, {"event": "move", "to": {"$exists": True}}]}


def _closing(event: dict[str, Any]) -> bool:
    kind = event.get("event")
    return kind == "delete" or (kind == "move" and "to" in event)


def resume_since(newest: int, floor: int = 0) -> int:
    """The `since` that resumes a watch whose newest event had revision `newest`.

    floor: the watch's own start (its first `since`, or where it opened):
    nothing at or below it was asked for. Events between the result and
    `newest` may come again; a resuming watcher drops those it has had.
    """
    return max(floor, newest - RESUME_WINDOW)


def put_event(path: str, hash: str, length: int, revision: int) -> dict[str, Any]:
    return {"type": "put", "path": path, "hash": hash, "length": length, "revision": revision}


def delete_event(path: str, revision: int) -> dict[str, Any]:
    return {"type": "delete", "path": path, "revision": revision}


class PathEvents:
    """Events of the paths of `env_uuid` equal to `key`, or starting with `prefix`.

    `next()` returns the next event, or None after ~await_seconds with nothing
    new (so a caller can check whether to stop). `close()` ends the change stream.
    """

    def __init__(
        self,
        managed: Any,
        env_uuid: str,
        *,
        prefix: str = "",
        key: str | None = None,
        since: int | None = None,
        await_seconds: float = 0.25,
    ) -> None:
        self._managed = managed
        self._env = env_uuid
        self._key = key
        self._prefix = prefix
        self._since = since
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._docs: dict[Any, dict[str, Any]] = {}  # path document id -> path, hash, length, rev
        self._seen: dict[str, int] = {}  # path -> the largest revision sent or read
        self._changes = PathChanges(
            managed, env_uuid, await_seconds=await_seconds, defer=True, content=False
        )
        try:
            self._start(since)
        except BaseException:
            self._changes.close()
            raise

    # -- the first read (and the replay) ---------------------------------------------------
    def _match(self) -> dict[str, Any]:
        if self._key is not None:
            return {"path": self._key}
        if self._prefix:
            return {"path": {"$regex": "^" + re.escape(self._prefix)}}
        return {}

    def _follows(self, path: str) -> bool:
        if self._key is not None:
            return path == self._key
        return path.startswith(self._prefix)

    def _start(self, since: int | None) -> None:
        managed = self._managed
        if since is not None:
            floor = history.floor(managed.db, self._env)
            if since < floor:
                raise RequestExpiredError(
                    f"{self._env}: the history kept starts after revision {floor}; "
                    f"changes since {since} are no longer known"
                )
        query = {"env": self._env, **self._match()}
        fields: dict[str, Any] = {"path": 1, "hash": 1, "length": 1, "rev": 1}
        if since is not None:
            fields.update(events=EVENTS_SHOWN, created_at=1)  # created_at: see path_events
        replay: list[dict[str, Any]] = []
        for doc in managed.paths.find(query, fields):
            rev = revision(doc.get("rev"))
            self._docs[doc["_id"]] = {
                "path": doc["path"],
                "hash": doc.get("hash", ""),
                "length": int(doc.get("length", 0)),
                "rev": rev,
            }
            self._saw(doc["path"], rev)
            if since is not None:
                replay.extend(self._replayed(doc, since, EVENTS_CAP))
        if since is not None:
            gone = {**query, "events.revision": {"$gt": since}}
            for doc in managed.history.find(gone, {"path": 1, "events": HISTORY_SHOWN}):
                replay.extend(self._replayed(doc, since, HISTORY_CUT_TO))
            for doc in buckets_since(managed.archive, query, since):
                replay.extend(self._replayed(doc, since, None))
            # A delete first where a put that came back as it committed has its revision
            # (see _emit): such a put's writer raised it since, unless another write
            # changed the path first.
            replay.sort(key=lambda e: (e["revision"], e["type"] != "delete"))
            sent: set[tuple[str, int, str]] = set()
            for event in replay:
                mark = (event["path"], event["revision"], event["type"])
                if mark not in sent:
                    sent.add(mark)
                    self._queue.append(event)
                    self._saw(event["path"], event["revision"])
        self._focus()

    def _replayed(self, doc: dict[str, Any], since: int, cap: int | None) -> list[dict[str, Any]]:
        """The events of one path, history or archive document above `since`.

        410 if the document holds `cap` events or more, so that a cut may have
        taken some above `since` (an archive bucket, cap None, is never cut).
        """
        kept = path_events(doc)
        events = [e for e in kept if int(e.get("revision") or 0) > 0]
        if cap is not None and len(kept) >= cap and events:
            oldest = min(int(e["revision"]) for e in events)
            if oldest > since:
                raise RequestExpiredError(
                    f"{self._env}: {doc['path']!r} kept only its last {cap} events; "
                    f"changes since {since} are no longer known"
                )
        out: list[dict[str, Any]] = []
        for e in events:
            rev = int(e["revision"])
            if rev <= since or e.get("event") == "upload":
                continue
            if _closing(e):
                out.append(delete_event(doc["path"], rev))
            else:
                out.append(put_event(doc["path"], str(e.get("hash", "")), int(e["length"]), rev))
        return out

    def _saw(self, path: str, rev: int) -> None:
        if rev > self._seen.get(path, 0):
            self._seen[path] = rev

    def _focus(self) -> None:
        ids = sorted(self._docs)
        self._changes.focus(ids if len(ids) <= FOCUS_MAX else None)

    @property
    def opened_at(self) -> int | None:
        """The revision this watch starts after: its `since`, or where its stream opened."""
        return self._since if self._since is not None else self._changes.start_revision

    # -- live --------------------------------------------------------------------------------
    @property
    def ended(self) -> bool:
        """True once the environment's database is gone: no more events will come."""
        return self._changes.ended and not self._queue

    def next(self) -> dict[str, Any] | None:
        if self._queue:
            return self._queue.popleft()
        event = self._changes.next()
        if event is not None:
            self._apply(event)
        return self._queue.popleft() if self._queue else None

    def _emit(self, event: dict[str, Any]) -> None:
        """Queue an event newer than what was sent or read of its path.

        The insert of a path that came back while its delete committed can be
        no newer: it took its revision before it waited for that commit. Its
        writer then raises it above the delete's (pathdocs.settle_created), and
        that update is the put sent; had another writer changed the path
        first, that change is.
        """
        path, rev = event["path"], event["revision"]
        if rev > self._seen.get(path, 0):
            self._seen[path] = rev
            self._queue.append(event)

    def _apply(self, event: dict[str, Any]) -> None:
        if event.get("ns", {}).get("coll") != self._managed.paths.name:
            return  # not asked for (content=False), but the stream's ending events pass
        op = event.get("operationType")
        doc_id = (event.get("documentKey") or {}).get("_id")
        if op in ("insert", "replace"):
            full = event.get("fullDocument") or {}
            path = str(full.get("path", ""))
            if full.get("env") != self._env or not self._follows(path):
                return
            doc: dict[str, Any] = {
                "path": path,
                "hash": str(full.get("hash", "")),
                "length": int(full.get("length", 0)),
                "rev": revision(full.get("rev")),
            }
            known = doc_id in self._docs
            self._docs[doc_id] = doc
            if not known:
                self._focus()
            self._emit(put_event(path, doc["hash"], doc["length"], doc["rev"]))
        elif op == "update":
            current = self._docs.get(doc_id)
            if current is None:
                return
            updated = (event.get("updateDescription") or {}).get("updatedFields") or {}
            for name in ("hash", "length", "rev"):
                if name in updated:
                    current[name] = updated[name]
            if "rev" in updated:
                rev = int(updated["rev"])
                self._emit(
                    put_event(current["path"], str(current["hash"]), int(current["length"]), rev)
                )
        elif op == "delete":
            gone = self._docs.pop(doc_id, None)
            if gone is None:
                return
            self._focus()
            self._emit(delete_event(gone["path"], self._deletion(gone["path"], int(gone["rev"]))))

    def _deletion(self, path: str, rev: int) -> int:
        """The revision of the deletion of `path` at revision `rev` (its history's entry)."""
        found = self._managed.history.find_one(
            {"env": self._env, "path": path},
            {"events": {"$elemMatch": {"revision": {"$gt": rev}, **_CLOSING}}, "last_rev": 1},
        )
        if found is None:
            return rev + 1  # the history went (trimmed): still after the last put
        events = found.get("events") or []
        if events:
            return int(events[0]["revision"])
        return max(int(found.get("last_rev", 0)), rev + 1)

    def close(self) -> None:
        self._changes.close()

    def __enter__(self) -> PathEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
