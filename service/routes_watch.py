"""The watch route: a Server-Sent Events stream of an environment's path changes.

`GET /v1/environments/{env}/watch?prefix=P` (or `?key=K`) sends one event per
change after the connection opened, as `catalog.pathevents.PathEvents` makes
them; `?since=R` (or a reconnecting EventSource's `Last-Event-ID`) first
replays the changes after revision R. The stream opens with the comment
`: open` and `id:` the revision it starts after. Each event is

    id: <revision>
    event: put | delete
    data: {"type", "path", "hash", "length", "revision"}   (a delete: type, path, revision)

and a comment line (`: keep-alive`) goes every HEARTBEAT seconds so that
proxies keep an idle stream open. `timeout` (seconds) and `max_events` end the
stream early (bounded examples, tests, one-shot polls).

The change stream is read by a blocking loop on a thread of its own (one per
watch), which hands each event to the response on the event loop without
waiting for it there (`_Handoff`): BUFFER slots bound what is in flight, so a
slow client holds the loop back (backpressure) instead of filling memory. The
response listens for the client's disconnect; then, or when the stream ends,
the loop is told to stop, ends within the change stream's await time (0.25 s)
and closes its change stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from catalog.errors import BadRequestError, ForbiddenError, UnauthorizedError
from catalog.names import check_path, check_prefix
from catalog.pathevents import PathEvents
from service.routing import Answer, Ctx, Endpoint, Param, query_params
from service.schemas import PATH_SCHEMA, PREFIX_SCHEMA

__all__ = ["WATCH_ROUTES", "end_watches", "open_watches"]

HEARTBEAT = 15.0  # seconds between keep-alive comments on an idle stream
RECHECK = 1.0  # seconds a stream's token is trusted before it is looked up again
BUFFER = 64  # events between the change-stream loop and the response
MAX_TIMEOUT = 86400.0

_open = 0
_open_lock = threading.Lock()
# The cancel scopes of the streams being sent, so that a server shutting down ends them.
_streams: set[anyio.CancelScope] = set()


def open_watches() -> int:
    """Watches whose change-stream loop is running in this process (for tests and metrics)."""
    return _open


def end_watches() -> None:
    """End every watch stream of this process cleanly (call on the event loop at shutdown).

    A server waits for open responses before it stops; an SSE stream never
    ends by itself, so `rescat serve` calls this when it begins to shut down:
    each stream ends, and its client reconnects (to another instance, or to
    this one once it is back) from the last revision it received.
    """
    for scope in list(_streams):
        scope.cancel()


def _count(delta: int) -> None:
    global _open
    with _open_lock:
        _open += delta


class EventStream(Response):
    """An SSE response fed by a PathEvents on a thread of its own; ends on disconnect."""

    media_type = "text/event-stream"

    def __init__(
        self,
        events: PathEvents,
        *,
        timeout: float | None,
        max_events: int | None,
        authorized: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """authorized: raises UnauthorizedError once the request's token is revoked; asked
        again before an event or keep-alive goes out more than RECHECK seconds after the
        last time, so a revoked token's stream ends (with an `error` event) within that."""
        super().__init__(
            status_code=200,
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
            media_type=self.media_type,
        )
        # A stream: no Content-Length (the base class sets one for its empty body).
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.events = events
        self.timeout = timeout
        self.max_events = max_events
        self.authorized = authorized
        self._checked = anyio.current_time() if authorized is not None else 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handoff = _Handoff(asyncio.get_running_loop())
        stop = threading.Event()
        _count(1)
        thread = threading.Thread(
            target=_pump, args=(self.events, handoff, stop), name="rescat-watch", daemon=True
        )
        try:
            thread.start()
        except BaseException:
            _count(-1)
            self.events.close()
            raise
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            # A comment first: the client knows the watch is open (its read is done). The
            # id is where it starts: a reconnect before any event resumes from there.
            opened = self.events.opened_at
            start = b"" if opened is None else b"id: %d\n" % opened
            await send(_body(b": open\n" + start + b"\n"))
            try:
                async with anyio.create_task_group() as group:
                    _streams.add(group.cancel_scope)
                    try:
                        group.start_soon(_until_disconnect, receive, group.cancel_scope)
                        group.start_soon(_heartbeat, handoff)
                        if self.authorized is not None:
                            group.start_soon(self._token_watch, send, group.cancel_scope)
                        with anyio.move_on_after(
                            math.inf if self.timeout is None else self.timeout
                        ):
                            await self._forward(handoff, send)
                        group.cancel_scope.cancel()
                    finally:
                        _streams.discard(group.cancel_scope)
            except Exception as failed:  # a task group's ExceptionGroup: unwrap its one failure
                inner = getattr(failed, "exceptions", None)
                if inner and len(inner) == 1 and isinstance(inner[0], Exception):
                    # The client gone, or the stream broken: the app classifies it.
                    raise inner[0] from None
                raise
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            stop.set()

    async def _forward(self, handoff: _Handoff, send: Send) -> None:
        sent = 0
        while self.max_events is None or sent < self.max_events:
            item = await handoff.get()
            if item is _END:
                return
            if not await self._still_authorized(send):
                return
            if item is _IDLE:
                await send(_body(b": keep-alive\n\n"))
                continue
            if isinstance(item, BaseException):
                raise item
            await send(_body(frame(item)))
            handoff.sent_at = anyio.current_time()
            sent += 1

    async def _token_watch(self, send: Send, scope: anyio.CancelScope) -> None:
        """An idle stream's token is looked up every RECHECK seconds too."""
        while True:
            await anyio.sleep(RECHECK)
            if not await self._still_authorized(send):
                scope.cancel()
                return

    async def _still_authorized(self, send: Send) -> bool:
        if self.authorized is None or anyio.current_time() - self._checked < RECHECK:
            return True
        try:
            await self.authorized()
        except (UnauthorizedError, ForbiddenError) as exc:
            error = {"error": {"code": exc.code, "message": str(exc)}}
            data = json.dumps(error, separators=(",", ":"))
            await send(_body(f"event: error\ndata: {data}\n\n".encode()))
            return False
        self._checked = anyio.current_time()
        return True


class _Handoff:
    """Events from a watch's thread to its response, without a round trip per event.

    The thread posts each event to the event loop and goes on (a blocking call
    into the loop per event cost a task, a future and two more thread switches:
    measured, a third of the service's work per event). BUFFER slots, taken by
    the thread and given back as events are sent, bound what is in flight.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.slots = threading.Semaphore(BUFFER)
        self.sent_at = anyio.current_time()  # when the client last got something

    def post(self, item: Any, stop: threading.Event) -> bool:
        """(On the thread) Queue an event once a slot is free; False if stopped first."""
        while not self.slots.acquire(timeout=0.25):
            if stop.is_set():
                return False
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)  # RuntimeError: loop gone
        return True

    def end(self, item: Any = None) -> None:
        """(On the thread) Queue the end of the stream, or its failure; needs no slot."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, _END if item is None else item)

    async def get(self) -> Any:
        item = await self.queue.get()
        if isinstance(item, dict):  # an event: it came through post(), with a slot
            self.slots.release()
        return item


_END = object()  # the stream ended
_IDLE = object()  # nothing sent for HEARTBEAT seconds: a keep-alive comment is due


async def _heartbeat(handoff: _Handoff) -> None:
    """A keep-alive comment on a stream idle for HEARTBEAT seconds (none while events flow)."""
    while True:
        due = handoff.sent_at + HEARTBEAT
        now = anyio.current_time()
        if now >= due:
            handoff.sent_at = now
            handoff.queue.put_nowait(_IDLE)
            due = now + HEARTBEAT
        await anyio.sleep(due - now)


def frame(event: dict[str, Any]) -> bytes:
    """One SSE event: the revision as its id, the type as its name, the JSON as its data."""
    data = json.dumps(event, separators=(",", ":"))
    return f"id: {event['revision']}\nevent: {event['type']}\ndata: {data}\n\n".encode()


async def _until_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def _pump(events: PathEvents, handoff: _Handoff, stop: threading.Event) -> None:
    """The change-stream loop: events to the response until stop is set or the loop is gone."""
    failed: Exception | None = None
    try:
        with events:
            while not stop.is_set() and not events.ended:
                item = events.next()
                if item is not None and not handoff.post(item, stop):
                    return
    except RuntimeError:
        return  # the event loop stopped
    except Exception as exc:  # the stream broke for good: the response reports it
        failed = exc
    finally:
        _count(-1)
        if not stop.is_set():
            with contextlib.suppress(RuntimeError):
                handoff.end(failed)


def _body(data: bytes) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": True}


# -- the route -------------------------------------------------------------------------------
def _revision(value: str, name: str) -> int:
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 20 or int(text) >= 2**63:
        raise BadRequestError(
            f"{name} must be a revision (an integer from 0 to 2^63-1), not {value!r}"
        )
    return int(text)


def _number(value: str, name: str, *, integer: bool, top: float) -> float:
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        raise BadRequestError(f"{name} must be a number, not {value!r}") from None
    if not (0 < number <= top):
        raise BadRequestError(f"{name} must be above 0 and at most {top:g}, not {value!r}")
    return number


async def watch(ctx: Ctx[None]) -> Response:
    env = ctx.params["env"]
    query = query_params(ctx.request)
    key = query.get("key")
    prefix = query.get("prefix")
    if key is not None and prefix is not None:
        raise BadRequestError("give key or prefix, not both")
    key = check_path(key) if key is not None else None
    prefix = check_prefix(prefix or "")
    since: int | None = None
    if "since" in query:
        since = _revision(query["since"], "since")
    elif ctx.request.headers.get("last-event-id"):
        since = _revision(ctx.request.headers["last-event-id"], "Last-Event-ID")
    timeout = (
        _number(query["timeout"], "timeout", integer=False, top=MAX_TIMEOUT)
        if "timeout" in query
        else None
    )
    max_events = (
        int(_number(query["max_events"], "max_events", integer=True, top=2**31))
        if "max_events" in query
        else None
    )
    events = await ctx.app.sync(
        lambda: PathEvents(ctx.app.managed, env, prefix=prefix, key=key, since=since)
    )
    if ctx.method == "HEAD":
        events.close()
        return Response(status_code=200, media_type=EventStream.media_type)
    app, request = ctx.app, ctx.request
    authorized = (lambda: app._authenticate(request)) if app.auth else None
    return EventStream(events, timeout=timeout, max_events=max_events, authorized=authorized)


KEY = Param(
    "key",
    "query",
    "Watch this one path (exactly); not with `prefix`.",
    PATH_SCHEMA,
    error="invalid_path",
)
WATCH_PREFIX = Param(
    "prefix",
    "query",
    "Watch the paths that start with this plain string (as the list's prefix).",
    PREFIX_SCHEMA,
    error="invalid_path",
)
SINCE = Param(
    "since",
    "query",
    "First replay the changes after this revision, from the kept history (410 "
    "request_expired when it is older than what is kept), then go on live.",
    {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    error="bad_request",
)
TIMEOUT = Param(
    "timeout",
    "query",
    "End the stream after this many seconds (default: never).",
    {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": MAX_TIMEOUT},
    error="bad_request",
)
MAX_EVENTS = Param(
    "max_events",
    "query",
    "End the stream after this many events (default: never).",
    {"type": "integer", "minimum": 1, "maximum": 2**31},
    error="bad_request",
)
LAST_EVENT_ID = Param(
    "Last-Event-ID",
    "header",
    "A reconnecting EventSource's last event id (a revision): like `since` when "
    "`since` is not given.",
    {"type": "string", "pattern": "^[0-9]{1,19}$"},
    error="bad_request",
)

WATCH_ROUTES: tuple[Endpoint[Any], ...] = (
    Endpoint(
        ("GET",),
        "/v1/environments/{env}/watch",
        watch,
        "Watch changes of paths (Server-Sent Events): puts and deletes with their revisions",
        (
            Answer(
                200,
                "A text/event-stream of `put` and `delete` events; each event's id is its "
                'revision and its data `{"type","path","hash","length","revision"}` (a '
                "delete: type, path, revision). A comment every 15 s keeps it alive.",
                media=("text/event-stream",),
            ),
        ),
        errors=("bad_request", "request_expired"),
        query=(KEY, WATCH_PREFIX, SINCE, TIMEOUT, MAX_EVENTS),
        headers=(LAST_EVENT_ID,),
        tag="kv",
    ),
)
