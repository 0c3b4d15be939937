"""One change stream per database (two: with and without new content), shared in the process.

Every open change stream is an oplog cursor on mongod that looks at every
oplog entry. With a stream per watcher, 16 watchers cost mongod 16 such
cursors: measured here (16 threads writing and watching, raw pymongo) that
halved write throughput and doubled put-to-event latency against one stream
fanned out in Python. So the watchers of one database (catalog.changes.
PathChanges) subscribe to a `ChangeHub`: one stream of every change any
watcher could want, filtered per subscriber in Python the way each watcher's
own stream filtered on the server (path inserts by environment, path updates
and deletes by the documents the watcher follows, the rest to everyone).
New inline content matters only to watchers that show values (KV key
watches): they share a hub of their own whose stream carries it, and that hub
keeps it (RECENT_BYTES) and hands it on with the change that points a path at
it (under CONTENT in that event), so no watcher gets an event of content
alone. The other watchers' hub never asks the server for it, so a put of new
content is one event for them, not two.

Gap-free attach. A watcher takes its start time T before its read, and must
get every event from T on (startAtOperationTime is inclusive). The hub's
stream starts at T0, taken before the first subscriber's T, and keeps its
recent events (at most BUFFER_EVENTS or BUFFER_BYTES, none older than
BUFFER_SECONDS). It
covers T when T0 <= T and every event it has let go is strictly older than T
(events of one transaction share a clusterTime, so equal is not enough). A
subscriber that attaches gets the kept events from T on and then the live
ones, under the lock the fan-out holds, so nothing slips in between; live
events older than T are dropped for it, as its own stream would never have
sent them. A watcher whose T the hub cannot cover opens a stream of its own.

Failures. The hub resumes its stream from its last resume token (with backoff,
for up to REOPEN_FOR seconds), so subscribers see nothing lost or repeated.
Lost history, a resume that keeps failing, or a closed client is put in every
subscriber's queue after the events before it; the hub is dropped and the
next watcher makes a new one. An ending event (invalidate, dropDatabase) is
queued the same way and ends every subscriber. A subscriber that lets more
than QUEUE_MAX events or QUEUE_BYTES pile up (a stuck consumer) is detached
rather than let grow without bound (its own stream would have left them in the
oplog); its watcher then continues on a stream of its own, resumed
after the last event it returned, so it still loses nothing while the oplog
holds it.

Lifetime. The hub's daemon thread ("rescat-changes") starts with the first
subscriber and stops, closing the stream, once it has had none for
IDLE_SECONDS.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from typing import Any

from bson import Timestamp
from pymongo.change_stream import ChangeStream
from pymongo.errors import InvalidOperation, OperationFailure, PyMongoError

from catalog.lru import SizedLRU
from catalog.resources import INLINE

log = logging.getLogger("rescat.changes")

# Server codes after which a stream cannot resume (the oplog moved past it).
HISTORY_LOST = frozenset({136, 280, 286})
# Events after which a stream can never resume.
ENDING = frozenset({"invalidate", "dropDatabase"})
# How long a broken stream keeps trying to reopen before its watchers give up.
REOPEN_FOR = 60.0
# The hub keeps this many recent events (none older than BUFFER_SECONDS) for late attachers.
BUFFER_EVENTS = 10_000
BUFFER_BYTES = 32 << 20
BUFFER_SECONDS = 30.0
# A subscriber with more than this waiting is detached (see the module docstring).
QUEUE_MAX = 100_000
QUEUE_BYTES = 64 << 20
# New inline content the hub has seen, kept until a change points a path at it (a put
# inserts the entry, then links the path); the change's event then carries it under
# CONTENT. Queued to every subscriber as events of their own, every small put of
# the database woke every watcher's thread: more work than the put once 16 watched.
RECENT_BYTES = 32 << 20
CONTENT = "rescatContent"
# A hub without subscribers for this long closes its stream and ends its thread.
IDLE_SECONDS = 5.0
# How long one getMore of the hub waits for events: how soon it notices it is idle or broken.
AWAIT_MS = 200

PATH_FIELDS = ("env", "path", "rev", "hash", "resource_id", "length", "expires_at", "owner")


def operation_time(db: Any) -> Timestamp | None:
    """The server's latest operation time: a stream opened there misses nothing after it."""
    reply = db.command("ping")
    value = reply.get("operationTime")
    return value if isinstance(value, Timestamp) else None


# What `failure` says of an error after which the database is gone: no more events.
ENDED = "the database was dropped"


def failure(exc: PyMongoError, failing_for: float) -> str | None:
    """What a stream's error means, for the hub's stream and a watcher's own alike.

    ENDED: resuming after an invalidate, the database went. A message: the
    stream cannot go on (the oplog moved past its token, or it has failed for
    REOPEN_FOR seconds). None: reopen it from its resume token.
    """
    if isinstance(exc, OperationFailure) and exc.code == 260:
        return ENDED
    if isinstance(exc, OperationFailure) and exc.code in HISTORY_LOST:
        return f"the change history was lost: {exc}"
    if failing_for >= REOPEN_FOR:
        return f"the change stream broke: {exc}"
    return None


def weight(item: Any) -> int:
    """Roughly the memory an event holds: inline content can make it up to 64 KiB."""
    if not isinstance(item, dict):
        return 0
    data = item.get(CONTENT)
    if data is None:
        data = (item.get("fullDocument") or {}).get("data")
    return 512 + (len(data) if isinstance(data, bytes) else 0)


def projection() -> dict[str, Any]:
    """The fields of a change event watchers read; the rest (the event list) stays on the server."""
    project: dict[str, Any] = {
        "operationType": 1,
        "documentKey": 1,
        "ns": 1,
        "updateDescription.removedFields": 1,
        "fullDocument.data": 1,
    }
    for name in PATH_FIELDS:
        project[f"fullDocument.{name}"] = 1
        project[f"updateDescription.updatedFields.{name}"] = 1
    return project


class Failure:
    """Queued to every subscriber when the hub's stream fails for good."""

    def __init__(self, message: str) -> None:
        self.message = message


# Queued to every subscriber after an ending event: no more events.
END = object()
# Returned by `Subscriber.take` to a subscriber the hub let go of (it fell behind, or the hub
# ended before the subscriber's start): its watcher continues on a stream of its own.
BEHIND = object()


class Subscriber:
    """One watcher's place at a hub: its filter, its start and its queue (under the hub's lock)."""

    def __init__(self, hub: ChangeHub, env: str, start: Timestamp) -> None:
        self.hub = hub
        self.env = env
        self.start = start
        self.ids: frozenset[Any] | list[Any] | None = None
        self.queue: collections.deque[Any] = collections.deque()
        self.bytes = 0  # the weight of what is queued
        self.ready = threading.Condition(hub.lock)
        self.behind = False
        self.caught_up = False  # an event at or after `start` has come: so will every later one
        # Path documents inserted (into its environment) since the watcher last focused,
        # or still in its queue: it may follow them once it has read their insert, so
        # their updates come until it says (a stream of its own would reopen from the
        # insert with the new filter and get them too).
        self.provisional: set[Any] = set()
        self._taken: Any = None  # the insert taken last: decided on by the next take

    def push(self, item: Any) -> None:
        self.queue.append(item)
        self.bytes += weight(item)

    def clear(self) -> None:
        self.queue.clear()
        self.bytes = 0

    def offer(self, event: dict[str, Any], kind: str, value: Any) -> bool:
        """Queue the event if it passes the filter; True if it was queued."""
        if not self.passes(kind, value):
            return False
        if kind == "env" and self.ids is not None:
            self.provisional.add((event.get("documentKey") or {}).get("_id"))
        self.push(event)
        return True

    def passes(self, kind: str, value: Any) -> bool:
        if kind == "id":
            return self.ids is None or value in self.ids or value in self.provisional
        if kind == "env":
            return bool(value == self.env)
        return kind != "content"

    def take(self, timeout: float) -> Any:
        """The next queued item; None after `timeout` with nothing; BEHIND once detached."""
        deadline = time.monotonic() + timeout
        with self.ready:
            if self._taken is not None:  # its watcher has read it and focused (or not) since
                self._decided(self._taken)
                self._taken = None
            while not self.queue:
                if self.behind:
                    return BEHIND
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.ready.wait(left)
            item = self.queue.popleft()
            self.bytes -= weight(item)
            if self.provisional and isinstance(item, dict) and self.hub.route(item)[0] == "env":
                self._taken = (item.get("documentKey") or {}).get("_id")
            return item

    def _decided(self, doc_id: Any) -> None:
        """Its watcher read the insert of doc_id: unless it follows it now, no more of it.

        As a stream of its own would: reopened from that insert with the new filter.
        """
        self.provisional.discard(doc_id)
        if self.ids is None or doc_id in self.ids:
            return
        kept = collections.deque(
            item
            for item in self.queue
            if not isinstance(item, dict) or self.hub.route(item) != ("id", doc_id)
        )
        if len(kept) != len(self.queue):
            self.queue = kept
            self.bytes = sum(weight(item) for item in kept)

    def focus(self, ids: list[Any] | None) -> None:
        """Change the filter, and apply it to what is queued, as a reopened stream would."""
        with self.ready:
            self.ids = _idset(ids)
            routed = [
                (item, self.hub.route(item) if isinstance(item, dict) else None)
                for item in self.queue
            ]
            self.provisional = {  # the inserts it has not read yet
                (item.get("documentKey") or {}).get("_id")
                for item, route in routed
                if route is not None and route[0] == "env"
            }
            if self.ids is not None and self.queue:
                self.queue = collections.deque(
                    item for item, route in routed if route is None or self.passes(*route)
                )
                self.bytes = sum(weight(item) for item in self.queue)


def _idset(ids: list[Any] | None) -> frozenset[Any] | list[Any] | None:
    if ids is None:
        return None
    try:
        return frozenset(ids)
    except TypeError:  # unhashable ids: compared one by one, as $in would
        return list(ids)


class ChangeHub:
    """One change stream of one database, fanned out to subscribers by a daemon thread."""

    def __init__(
        self, db: Any, paths: str, catalog: str, start: Timestamp, content: bool = True
    ) -> None:
        self.db = db
        self.paths = paths
        self.catalog = catalog
        self.content = content  # whether its stream carries new inline content
        self._recent: SizedLRU[str, bytes] = SizedLRU(RECENT_BYTES, len)
        self.start = start
        self.lock = threading.Lock()
        self._subs: list[Subscriber] = []
        # (arrival, clusterTime, event, weight) of the events kept for late attachers
        self._buffer: collections.deque[tuple[float, Timestamp | None, dict[str, Any], int]] = (
            collections.deque()
        )
        self._buffer_bytes = 0
        self._evicted: Timestamp | None = None  # clusterTime of the newest event let go
        self._last_time: Timestamp | None = None
        self._holds = 0  # subscribers on their way in: the hub must not stop under them
        self._idle_since = time.monotonic()
        self._closed = False
        self._token: Any = None
        self._stream: ChangeStream[Any] | None = None
        self._break = threading.Event()
        self._broken = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rescat-changes", daemon=True)

    # -- subscribers (any thread) ------------------------------------------------------------
    def route(self, event: dict[str, Any]) -> tuple[str, Any]:
        """What decides who gets an event: a path document's id, an environment, or nothing.

        "content" (new inline content) goes to no one: it travels with its change.
        """
        op = event.get("operationType")
        coll = (event.get("ns") or {}).get("coll")
        if coll == self.paths:
            if op in ("update", "delete"):
                return "id", (event.get("documentKey") or {}).get("_id")
            if op in ("insert", "replace"):
                return "env", (event.get("fullDocument") or {}).get("env")
        if coll == self.catalog and op == "insert":
            return "content", None
        return "all", None

    def hold(self, db: Any) -> bool:
        """Keep the hub from stopping until `release`; False if it cannot serve `db`."""
        with self.lock:
            if self._closed or db.codec_options != self.db.codec_options:
                return False
            self._holds += 1
            return True

    def release(self) -> None:
        with self.lock:
            self._holds -= 1
            self._idle_since = time.monotonic()

    def attach(self, sub: Subscriber) -> bool:
        """Queue the kept events from sub.start on and subscribe; False if they are not all kept."""
        with self.lock:
            start = sub.start
            if self._closed or start < self.start:
                return False
            if self._evicted is not None and not self._evicted < start:
                return False
            replay: list[dict[str, Any]] = []
            for _, when, event, _ in reversed(self._buffer):
                if when is not None and when < start:
                    break
                replay.append(event)
            for event in reversed(replay):
                sub.offer(event, *self.route(event))
            self._subs.append(sub)
            return True

    def detach(self, sub: Subscriber) -> None:
        with self.lock:
            if sub in self._subs:
                self._subs.remove(sub)
                if not self._subs:
                    self._idle_since = time.monotonic()
            sub.clear()
            sub.ready.notify_all()

    def break_stream(self) -> None:
        """Have the thread close its stream as a failure would (tests of resumption)."""
        self._broken.clear()
        self._break.set()
        self._broken.wait(timeout=5 + AWAIT_MS / 1000)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the stream (the hub's thread) -------------------------------------------------------
    def open(self) -> None:
        """Open the stream here (so a failure shows in the caller) and start the thread."""
        self._stream = self._watch()
        self._thread.start()

    def _pipeline(self) -> list[dict[str, Any]]:
        wanted: list[dict[str, Any]] = [
            {
                "ns.coll": self.paths,
                "operationType": {"$in": ["insert", "replace", "update", "delete"]},
            },
            {"operationType": {"$in": sorted(ENDING)}},
        ]
        if self.content:
            wanted.append(
                {"ns.coll": self.catalog, "operationType": "insert", "fullDocument.path": INLINE}
            )
        return [{"$match": {"$or": wanted}}, {"$project": {**projection(), "clusterTime": 1}}]

    def _watch(self) -> ChangeStream[Any]:
        kwargs: dict[str, Any] = {}
        if self._token is not None:
            kwargs["resume_after"] = self._token
        else:
            kwargs["start_at_operation_time"] = self.start
        stream: ChangeStream[Any] = self.db.watch(
            self._pipeline(), max_await_time_ms=AWAIT_MS, **kwargs
        )
        self._remember(stream)
        return stream

    def _remember(self, stream: ChangeStream[Any]) -> None:
        token = stream.resume_token
        if token is not None:
            self._token = token

    def _drop(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(PyMongoError):
                self._stream.close()
            self._stream = None

    def _run(self) -> None:
        delay = 0.05
        failing_since: float | None = None
        try:
            while not self._stop_if_idle():
                if self._break.is_set():
                    if self._stream is not None:  # closed, not forgotten: found so below
                        with contextlib.suppress(PyMongoError):
                            self._stream.close()
                    self._break.clear()
                    self._broken.set()
                try:
                    if self._stream is None:
                        self._stream = self._watch()
                    event = self._stream.try_next()
                except InvalidOperation as exc:  # the client was closed: end quietly
                    self._finish(Failure(f"the change stream broke: {exc}"))
                    return
                except PyMongoError as exc:
                    now = time.monotonic()
                    failing_since = now if failing_since is None else failing_since
                    verdict = failure(exc, now - failing_since)
                    if verdict is not None:
                        self._finish(END if verdict is ENDED else Failure(verdict))
                        return
                    log.warning("change stream broke (%s); resuming from its token", exc)
                    self._drop()
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                self._remember(self._stream)
                if event is None and not self._stream.alive:  # closed under us: resume
                    log.warning("change stream closed; resuming from its token")
                    self._drop()
                    continue
                failing_since, delay = None, 0.05
                if event is None:
                    with self.lock:
                        self._evict(time.monotonic())
                elif event.get("operationType") in ENDING:
                    self._finish(END, event.get("clusterTime"))  # the database was dropped
                    return
                else:
                    self._fan_out(event)
        except BaseException as exc:  # a bug: subscribers must not wait forever
            log.exception("change hub failed")
            self._finish(Failure(f"the change stream broke: {exc!r}"))
            raise

    def _carry(self, event: dict[str, Any]) -> bool:
        """Keep new content; put it in the change pointing a path at it. False: not for anyone."""
        if (event.get("ns") or {}).get("coll") == self.catalog:
            full = event.get("fullDocument") or {}
            data = full.get("data")
            if isinstance(data, bytes) and full.get("hash"):
                self._recent.add(str(full["hash"]), data)
            return False
        if self.content:
            changed = event.get("fullDocument") or (event.get("updateDescription") or {}).get(
                "updatedFields"
            )
            digest = (changed or {}).get("hash")
            data = self._recent.get(digest) if isinstance(digest, str) else None
            if data is not None:
                event[CONTENT] = data
        return True

    def _fan_out(self, event: dict[str, Any]) -> None:
        if not self._carry(event):
            return
        when = event.get("clusterTime")
        if isinstance(when, Timestamp):
            self._last_time = when
        else:  # never seen; ordered as the event before it
            when = self._last_time
        kind, value = self.route(event)
        now, size = time.monotonic(), weight(event)
        with self.lock:
            self._buffer.append((now, when, event, size))
            self._buffer_bytes += size
            self._evict(now)
            behind: list[Subscriber] = []
            for sub in self._subs:
                if not sub.caught_up and when is not None:
                    if when < sub.start:
                        continue  # before this subscriber's start: its own stream would not have it
                    sub.caught_up = True  # stream order: no later event is before it either
                if not sub.offer(event, kind, value):
                    continue
                if len(sub.queue) > QUEUE_MAX or sub.bytes > QUEUE_BYTES:
                    behind.append(sub)
                else:
                    sub.ready.notify()
            for sub in behind:
                log.warning(
                    "a watcher fell %d events (%d bytes) behind; it continues on its own",
                    len(sub.queue),
                    sub.bytes,
                )
                self._subs.remove(sub)
                sub.clear()
                sub.behind = True
                sub.ready.notify_all()
            if behind and not self._subs:
                self._idle_since = now

    def _evict(self, now: float) -> None:
        """Let go of the oldest kept events beyond the bounds (under the lock)."""
        buffer, oldest = self._buffer, now - BUFFER_SECONDS
        while buffer and (
            len(buffer) > BUFFER_EVENTS
            or self._buffer_bytes > BUFFER_BYTES
            or buffer[0][0] < oldest
        ):
            _, when, _, size = buffer.popleft()
            self._buffer_bytes -= size
            if when is not None:
                self._evicted = when

    def _stop_if_idle(self) -> bool:
        if self._subs or self._holds:
            return False  # a racy look that spares the registry's lock on every event
        with _hubs_lock, self.lock:
            if self._subs or self._holds or self._closed:
                return self._closed
            if time.monotonic() - self._idle_since < IDLE_SECONDS:
                return False
            self._close()
        self._drop()
        return True

    def _finish(self, item: Any, when: Any = None) -> None:
        """Queue `item` (END or a Failure) to every subscriber, after their events; drop the hub.

        An ending event older than a subscriber's start is not its end: that
        subscriber (which cannot have had an event yet) goes on its own.
        """
        with _hubs_lock, self.lock:
            for sub in self._subs:
                if item is END and isinstance(when, Timestamp) and when < sub.start:
                    sub.behind = True
                else:
                    sub.push(item)
                sub.ready.notify_all()
            self._subs.clear()
            self._close()
        self._drop()

    def _close(self) -> None:
        """No more subscribers, and out of the registry (under both locks)."""
        self._closed = True
        self._buffer.clear()
        self._buffer_bytes = 0
        key = _key(self.db, self.paths, self.catalog, self.content)
        if _hubs.get(key) is self:
            del _hubs[key]


# The live hubs, by client, database and collections. A hub leaves when it stops, so
# hubs of closed clients (whose streams fail with InvalidOperation) do not stay.
_hubs: dict[tuple[int, str, str, str, bool], ChangeHub] = {}
_hubs_lock = threading.Lock()


def _key(db: Any, paths: str, catalog: str, content: bool) -> tuple[int, str, str, str, bool]:
    return (id(db.client), db.name, paths, catalog, content)


def subscribe(
    db: Any, paths: str, catalog: str, env: str, content: bool = True
) -> tuple[Timestamp | None, Subscriber | None]:
    """A new watcher's start time, and its subscription (None: it needs a stream of its own).

    Without a hub for the database, one is made, its stream opened at an
    operation time taken before the watcher's own: so it covers the watcher.
    Without cluster times (mongomock, a standalone mongod) there are no
    streams to share.
    """
    with _hubs_lock:
        hub = _hubs.get(_key(db, paths, catalog, content))
        if hub is not None and not hub.alive:
            hub = None  # its thread is not in this process (a fork): make another
        if hub is not None:
            if not hub.hold(db):
                return operation_time(db), None  # another codec: its events would differ
        else:
            hub_start = operation_time(db)
            if hub_start is None:
                return None, None
            hub = ChangeHub(db, paths, catalog, hub_start, content)
            hub.hold(db)
            try:
                hub.open()
            except PyMongoError as exc:  # the watcher's own stream will say why
                log.debug("no shared change stream: %s", exc)
                return hub_start, None
            _hubs[_key(db, paths, catalog, content)] = hub
    try:
        start = operation_time(db)
        if start is None:
            return None, None
        sub = Subscriber(hub, env, start)
        return start, (sub if hub.attach(sub) else None)
    finally:
        hub.release()
