"""The rescat HTTP service: an ASGI app over ManagedStorage, routed by one table.

The routes are `service.routes.ROUTES`: each declares its template, methods,
handler, token, parameters, bodies and answers once, and the dispatcher here,
the OpenAPI document, /docs and the metrics labels are all derived from it.
Dispatch matches the *raw*, still percent-encoded path (see service.routing),
so every invalid environment id or path answers 400 invalid_path however it
is encoded. Starlette provides the request and response primitives and the
template syntax; the app keeps its own outer layer for the one JSON log line
and the metrics of every request, and for mapping errors to the contract's
`{"error": {"code", "message"}}` bodies.

The core is blocking (pymongo); every call into it runs in a worker thread.
Bodies stream both ways and move >= 1 MiB per thread hop (see service.body).
Nothing lives in process memory that another instance needs: put requests and
tokens are in MongoDB, so several instances on one database are one service.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import re
import secrets
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import pymongo
from pydantic import BaseModel, ValidationError
from pymongo.errors import ConnectionFailure, PyMongoError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from catalog.errors import (
    BadRequestError,
    CatalogError,
    NotFoundError,
    PreconditionFailedError,
    TooLargeError,
    UnauthorizedError,
)
from catalog.managed import ManagedStorage
from catalog.reaper import DEFAULT_REAP_INTERVAL, ExpiryReaper
from catalog.tokens import TokenInfo, TokenStore, token_digest
from service.body import FILL_BYTES, FIRST_BLOCK_WAIT, BodyReader, ClientGone
from service.errors import (
    STATUS_BY_CODE,
    InternalError,
    MethodNotAllowedError,
    UnavailableError,
    error_body,
    headers_of,
    status_for,
    with_headers,
)
from service.metrics import Metrics
from service.openapi import openapi_document
from service.routes import ROUTES
from service.routing import Ctx, Endpoint, Router, decode_params

T = TypeVar("T")
log = logging.getLogger("rescat.access")

MAX_JSON_BODY = 64 * 1024
MAX_BODY = 2**63 - 1  # lengths are BSON int64 everywhere below
HEALTH_TIMEOUT = 1.9  # seconds: /healthz answers 503 within 2 s while the database is down
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
CLIENT_CLOSED = 499  # logged (never sent) when the client went away


@dataclass
class CallRecord:
    """What one request did, for its log line and metrics."""

    method: str
    route: str = "unmatched"
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    env: str | None = None
    token_id: str | None = None
    error: str | None = None


def _error_response(exc: CatalogError, status: int | None = None) -> Response:
    response = Response(
        error_body(exc.code, str(exc) or exc.code),
        status_code=status or status_for(exc),
        media_type="application/json",
    )
    response.headers["x-rescat-error"] = exc.code  # for HEAD, whose errors have no body
    for key, value in headers_of(exc).items():
        response.headers[key] = value
    retry_after = getattr(exc, "retry_after", None)  # a budget ran out (429)
    if isinstance(retry_after, int) and "retry-after" not in response.headers:
        response.headers["retry-after"] = str(retry_after)
    return response


class ServiceApp:
    """The ASGI application serving `managed` (`create_app` is this class).

    auth: require a bearer token on every /v1 route; max_size: largest body
    accepted (413 beyond); read_timeout: seconds a request body may pause, and
    the grace period before min_rate (bytes/s a body must average) applies;
    upload_threads: uploads that work on the core at once (a slot is given back
    while an upload waits for its client, see `upload`); max_uploads: uploads in
    progress, waiting or working; io_threads: worker threads for the rest;
    token_cache_seconds: how long a known token is trusted without a lookup (0:
    every request looks its token up, so revocation takes effect at once);
    reap_interval: seconds between deletions of expired TTL keys while the app
    runs (catalog.reaper: watchers see an expiry as a delete event; None: off).
    """

    def __init__(
        self,
        managed: ManagedStorage,
        *,
        auth: bool = True,
        max_size: int | None = None,
        read_timeout: float | None = 60.0,
        min_rate: float = 1024.0,
        upload_threads: int = 64,
        max_uploads: int = 1024,
        io_threads: int = 64,
        tokens: TokenStore | None = None,
        token_cache_seconds: float = 0.0,
        routes: Sequence[Endpoint[Any]] = ROUTES,
        reap_interval: float | None = DEFAULT_REAP_INTERVAL,
    ) -> None:
        self.managed = managed
        self.reaper = ExpiryReaper(managed, reap_interval) if reap_interval else None
        self.auth = auth
        self.max_size = max_size
        self.read_timeout = read_timeout
        self.min_rate = min_rate
        self.tokens = tokens if tokens is not None else TokenStore(managed.db)
        # token digest -> (valid until, info): known tokens only, for at most this long,
        # so a revocation takes up to this long to reach this instance (0: look up each time)
        self.token_cache_seconds = token_cache_seconds
        self._token_cache: dict[str, tuple[float, TokenInfo]] = {}
        self.metrics = Metrics()
        self._id_prefix = secrets.token_hex(4)
        self._id_count = itertools.count(secrets.randbelow(2**32))
        # Uploads hold a thread for as long as the client sends; give them their own
        # pool so that slow uploaders cannot starve reads and small calls.
        self._upload_threads = upload_threads
        self._max_uploads = max_uploads
        self._io_threads = io_threads
        self._upload_limiter: anyio.CapacityLimiter | None = None
        self._upload_slots: anyio.Semaphore | None = None
        self._io_limiter: anyio.CapacityLimiter | None = None
        self._health_limiter: anyio.CapacityLimiter | None = None
        self.router = Router(routes)
        self.openapi = openapi_document(routes, auth=auth, max_size=max_size)
        self.openapi_json = json.dumps(self.openapi).encode()
        # Read-ahead for GETs: the next block comes from MongoDB while one is sent.
        self.read_ahead = ThreadPoolExecutor(io_threads, thread_name_prefix="rescat-read")
        self.executor = ThreadPoolExecutor(io_threads, thread_name_prefix="rescat-io")
        # Uploads whose whole body has arrived (small ones) never wait for their client.
        self.upload_executor = ThreadPoolExecutor(upload_threads, thread_name_prefix="rescat-put")

    # -- ASGI -----------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        call = CallRecord(method=scope.get("method", ""))
        request_id = self._request_id(scope)
        started = time.perf_counter()
        response_started = False

        async def counting_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                call.status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                call.bytes_out += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            request = Request(scope, receive)
            response = await self._respond(request, call)
            await response(scope, receive, counting_send)
        except (ClientDisconnect, ClientGone, OSError) as exc:
            call.status = call.status if response_started else CLIENT_CLOSED
            call.error = call.error or f"client gone: {type(exc).__name__}"
        except Exception as exc:  # a failure while streaming a response
            call.error = f"{type(exc).__name__}: {exc}"
            log.error("response failed: %s", traceback.format_exc())
            if not response_started:
                call.status = 500
                await _error_response(InternalError("internal error"), 500)(
                    scope, receive, counting_send
                )
            # else: returning with the body incomplete makes the server close the
            # connection; the client sees fewer bytes than Content-Length.
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - started
            self.metrics.observe(
                call.method, call.route, call.status, seconds, call.bytes_in, call.bytes_out
            )
            self._log(call, request_id, scope, seconds)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.reaper is not None:
                    self.reaper.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.reaper is not None:
                    await anyio.to_thread.run_sync(self.reaper.stop)
                for pool in (self.read_ahead, self.executor, self.upload_executor):
                    pool.shutdown(wait=False)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _request_id(self, scope: Scope) -> str:
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                text = str(value.decode("latin-1"))
                if _REQUEST_ID_RE.fullmatch(text):
                    return text
        # 16 hex digits, as random ones would be: this instance's random prefix and a
        # count (unique without asking the OS for randomness on every request).
        return f"{self._id_prefix}{next(self._id_count) & 0xFFFFFFFF:08x}"

    def _log(self, call: CallRecord, request_id: str, scope: Scope, seconds: float) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        raw = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "replace")
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "event": "http_request",
            "request_id": request_id,
            "method": call.method,
            "route": call.route,
            "path": raw.decode("latin-1")[:2048],
            "status": call.status,
            "duration_ms": round(seconds * 1000, 2),
            "bytes_in": call.bytes_in,
            "bytes_out": call.bytes_out,
            "env": call.env,
            "token_id": call.token_id,
            "client": (scope.get("client") or [None])[0],
        }
        if call.error:
            line["error"] = call.error
        log.info(json.dumps(line, separators=(",", ":")))

    # -- helpers --------------------------------------------------------------
    @property
    def upload_limiter(self) -> anyio.CapacityLimiter:
        """Threads of uploads in progress (working, or parked waiting for their client)."""
        if self._upload_limiter is None:
            self._upload_limiter = anyio.CapacityLimiter(self._max_uploads)
        return self._upload_limiter

    @property
    def upload_slots(self) -> anyio.Semaphore:
        """Uploads working on the core at once (not waiting for their client)."""
        if self._upload_slots is None:
            self._upload_slots = anyio.Semaphore(self._upload_threads)
        return self._upload_slots

    def body_reader(self, request: Request, max_size: int | None = None) -> BodyReader:
        """The request body as a blocking reader, with the service's deadlines."""
        return BodyReader(
            request.stream(),
            max_size=self.max_size if max_size is None else max_size,
            timeout=self.read_timeout,
            min_rate=self.min_rate,
        )

    async def upload(
        self,
        body: BodyReader,
        length: int,
        fn: Callable[[Any], T],
        *,
        abandoned: Callable[[Any], object] | None = None,
        started: Callable[[], Any] | None = None,
        renew: Callable[[Any], object] | None = None,
    ) -> T:
        """Run a core call that reads `body` on a worker thread, holding a slot only to work.

        The first block (the whole body when it is small) is received on the
        event loop, before any thread or slot is taken; later, the worker gives
        its slot back whenever it waits for the client (`BodyReader.refill`). So
        clients that trickle their bodies hold parked threads, never the slots
        of uploads that have data, and the body deadlines drop them.

        fn(pending) is the core call. `started()` writes the upload's pending
        history item when that first block does not arrive at once (a slow
        client: the upload is visibly running while it sends), `renew(pending)`
        keeps it alive meanwhile, and fn gets it to end (else None).
        `abandoned(pending)` runs (on a worker thread) if that first block
        fails to arrive: the core call, which records its own failures, never ran.
        """
        if length > MAX_BODY:
            raise TooLargeError(
                f"the body has {length} bytes; no object can have more than {MAX_BODY}"
            )
        pending: Any = None
        loop = asyncio.get_running_loop()
        filled = asyncio.Event()
        marking: list[asyncio.Future[Any]] = []  # the pending item's writer, once it starts
        timer = None
        if started is not None:  # a timer, not a task: a body already here costs nothing more
            timer = loop.call_later(
                FIRST_BLOCK_WAIT,
                lambda: marking.append(
                    asyncio.ensure_future(self._mark_pending(started, renew, filled))
                ),
            )
        try:
            try:
                await body.fill(FILL_BYTES if length < 0 else min(length, FILL_BYTES))
            finally:
                if timer is not None:
                    timer.cancel()
                filled.set()
            if marking:
                pending = await marking[0]
        except Exception as exc:
            if marking and pending is None:
                with contextlib.suppress(Exception):  # it may have written the item
                    pending = await marking[0]
            if abandoned is not None and not isinstance(exc, PreconditionFailedError):
                try:
                    await self.sync(abandoned, pending)
                except Exception:  # the upload's own error is the one to answer with
                    log.warning("recording an abandoned upload failed", exc_info=True)
            raise
        if 0 <= length <= body.count:
            body.end()  # all declared bytes are here: the core will not wait for more
        call = functools.partial(fn, pending)
        if body.complete:  # the whole body is buffered: one plain hop, nothing to wait for
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.upload_executor, call)
        slots = self.upload_slots
        await slots.acquire()
        body.gate, body.holding = slots, True
        try:
            return await anyio.to_thread.run_sync(call, limiter=self.upload_limiter)
        finally:
            if body.holding:
                body.holding = False
                slots.release()

    async def _mark_pending(
        self,
        started: Callable[[], Any],
        renew: Callable[[Any], object] | None,
        filled: asyncio.Event,
    ) -> Any:
        """Write the upload's pending item, renew it every lease / 4 until the block is in."""
        pending = await self.sync(started)
        every = self.managed.upload_lease / 4
        while not filled.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(filled.wait(), every)
                break
            if renew is not None:
                try:
                    await self.sync(renew, pending)
                except Exception:  # a failover, say: the next renewal may make it
                    log.warning("renewing a pending upload failed", exc_info=True)
        return pending

    @property
    def io_limiter(self) -> anyio.CapacityLimiter:
        if self._io_limiter is None:
            self._io_limiter = anyio.CapacityLimiter(self._io_threads)
        return self._io_limiter

    @property
    def health_limiter(self) -> anyio.CapacityLimiter:
        if self._health_limiter is None:
            self._health_limiter = anyio.CapacityLimiter(4)
        return self._health_limiter

    async def sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking core call on a worker thread.

        A plain executor hop (`loop.run_in_executor`): it costs a fraction of
        anyio's `to_thread.run_sync` (no limiter or cancel-scope bookkeeping),
        which matters for small requests, whose thread hops are most of what the
        service itself spends on them. The pool's size bounds the calls at once.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    async def _respond(self, request: Request, call: CallRecord) -> Response:
        try:
            return await self._dispatch(request, call)
        except CatalogError as exc:
            call.error = f"{exc.code}: {exc}"
            if exc.code not in STATUS_BY_CODE:
                # A catalog error without a code of its own (CatalogError itself: e.g. a
                # body shorter than declared) is about what the request asked for: 400,
                # never an undocumented code or a 5xx.
                log.warning("catalog error without a code: %s", traceback.format_exc())
                return _error_response(BadRequestError(str(exc) or "bad request"))
            return _error_response(exc)
        except (ClientDisconnect, ClientGone):
            raise
        except ConnectionFailure as exc:
            call.error = f"database unavailable: {exc}"
            return _error_response(UnavailableError("the database is unavailable"))
        except PyMongoError as exc:
            call.error = f"database error: {exc}"
            log.error("database error: %s", traceback.format_exc())
            return _error_response(InternalError("database error"))
        except Exception as exc:
            call.error = f"{type(exc).__name__}: {exc}"
            log.error("internal error: %s", traceback.format_exc())
            return _error_response(InternalError("internal error"))

    # -- dispatch ---------------------------------------------------------------
    async def _dispatch(self, request: Request, call: CallRecord) -> Response:
        """Route by the table, in the order the contract's answers need.

        A token is checked first (an unknown /v1 route is 401 without one),
        then the ids the path names (400 invalid_path before 404, also for an
        unknown route under a valid prefix), then the token's environment, the
        route, its other parameters, the method and the JSON body.
        """
        scope = request.scope
        raw_bytes: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        raw = raw_bytes.split(b"?", 1)[0].decode("latin-1")
        match = self.router.match(raw)
        if match is not None:
            call.route = match.path_format
        elif raw.startswith("/v1/") or raw == "/v1":
            call.route = "/v1 (unmatched)"
        needs_token = self.router.needs_auth(raw, match, request.method)
        token = await self._authenticate(request) if needs_token else None
        call.token_id = token.id if token is not None else None
        params = self.router.guarded(raw)
        call.env = params.get("env")
        if token is not None and call.env is not None:
            token.check_env(call.env)
        if match is None:
            raise NotFoundError("no such route")
        params = decode_params(match, params)
        endpoint = match.endpoint(request.method)
        if endpoint is None:
            allowed = ", ".join(match.allowed())
            raise with_headers(
                MethodNotAllowedError(f"{request.method} is not allowed here (allowed: {allowed})"),
                {"allow": allowed},
            )
        body = None
        if endpoint.body is not None:
            body = _validated(endpoint.body, await self._json_object(request, endpoint.body_max))
        return await endpoint.handler(Ctx(self, request, params, body, call))

    async def _authenticate(self, request: Request) -> TokenInfo | None:
        if not self.auth:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        token = token.strip()
        ttl = self.token_cache_seconds
        if ttl <= 0:
            try:
                return await self.sync(self.tokens.check, token)
            except UnauthorizedError as exc:
                raise _unauthorized(str(exc)) from None
        key = token_digest(token)
        now = time.monotonic()
        hit = self._token_cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            info = await self.sync(self.tokens.check, token)
        except UnauthorizedError as exc:  # unknown tokens are never cached
            self._token_cache.pop(key, None)
            raise _unauthorized(str(exc)) from None
        if len(self._token_cache) >= 10_000:
            self._token_cache.clear()
        self._token_cache[key] = (now + ttl, info)
        return info

    async def _json_object(self, request: Request, limit: int = MAX_JSON_BODY) -> Any:
        """The JSON request body (at most `limit` bytes, within the body deadlines)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLargeError(f"a JSON body may have at most {limit} bytes")
        body = BodyReader(
            request.stream(),
            max_size=limit,
            timeout=self.read_timeout,
            min_rate=self.min_rate,
        )
        try:
            await body.fill(limit + 1)
        except TooLargeError:
            raise TooLargeError(f"a JSON body may have at most {limit} bytes") from None
        return _parse_json(body.read_buffered())

    async def ping(self) -> None:
        """Check the database within HEALTH_TIMEOUT seconds, else raise UnavailableError.

        The ping itself is bounded by pymongo's client-side timeout (server
        selection included, which otherwise waits 30 s); the outer bound holds
        even if it did not, and the health checks have threads of their own so
        a busy service still answers them.
        """

        def ping() -> None:
            with pymongo.timeout(HEALTH_TIMEOUT * 0.75):
                self.managed.ping()

        try:
            with anyio.fail_after(HEALTH_TIMEOUT):
                await anyio.to_thread.run_sync(
                    ping, limiter=self.health_limiter, abandon_on_cancel=True
                )
        except (TimeoutError, PyMongoError) as exc:
            # Its text names database hosts and driver internals: the log has it, not
            # the answer (this route needs no token).
            log.warning("health check: the database does not answer: %s", exc)
            raise UnavailableError("the database does not answer") from None


def _unauthorized(message: str) -> UnauthorizedError:
    return with_headers(UnauthorizedError(message), {"www-authenticate": 'Bearer realm="rescat"'})


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError("the body is not valid JSON") from None
    except RecursionError:
        raise BadRequestError("the JSON body is nested too deeply") from None


def _validated(model: type[BaseModel], doc: Any) -> BaseModel:
    """The JSON body as its declared model; a wrong shape is 400 bad_request."""
    if not isinstance(doc, dict):
        raise BadRequestError("the body must be a JSON object")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise BadRequestError(f"the JSON body's field {field!r}: {first['msg']}") from None


# The app factory: `create_app(managed, auth=..., max_size=..., ...)`.
create_app = ServiceApp


def app_from_env() -> ServiceApp:
    """Factory for `uvicorn --factory service.app:app_from_env` (configured by env vars).

    RESCAT_MONGO_URI, RESCAT_DATABASE, RESCAT_NO_AUTH=1, RESCAT_MAX_SIZE (bytes).
    """
    import os

    from catalog import connect

    managed = connect(
        os.environ.get("RESCAT_MONGO_URI"), os.environ.get("RESCAT_DATABASE", "rescat")
    )
    max_size = os.environ.get("RESCAT_MAX_SIZE")
    return create_app(
        managed,
        auth=os.environ.get("RESCAT_NO_AUTH", "") not in ("1", "true", "yes"),
        max_size=int(max_size) if max_size else None,
    )
