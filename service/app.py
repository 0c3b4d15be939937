"""The rescat HTTP service: a small ASGI app over ManagedStorage.

Built on Starlette's request and response primitives, with its own dispatch on
the raw (still percent-encoded) request path: a router that matches the
decoded path would send `%2F` in an environment id, or `%0A` in a path, to a
404 or to the wrong route, where the contract wants 400 invalid_path whatever
the encoding. Each segment is decoded and validated on its own.

The core is blocking (pymongo); every call into it runs in a worker thread.
Bodies stream both ways and move >= 1 MiB per thread hop (see service.body).
Nothing lives in process memory that another instance needs: put requests and
tokens are in MongoDB, so several instances on one database are one service.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote_to_bytes

import anyio
import anyio.to_thread
from pymongo.errors import ConnectionFailure, PyMongoError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from catalog.errors import (
    BadRequestError,
    CatalogError,
    HashMismatchError,
    InvalidPathError,
    LengthMismatchError,
    NotFoundError,
    PreconditionFailedError,
    RequestExpiredError,
    ResourceDeletedError,
    ResponseMismatchError,
    TooLargeError,
    UnauthorizedError,
)
from catalog.managed import ManagedStorage
from catalog.names import check_env, check_path, check_prefix, parse_hash
from catalog.tokens import TokenInfo, TokenStore
from service.body import HOP_BYTES, OUT_HOP_BYTES, BodyReader, ClientGone, iter_content
from service.errors import MethodNotAllowedError, RangeNotSatisfiableError, error_body, status_for
from service.metrics import Metrics
from service.openapi import openapi_document
from service.ranges import (
    Unsatisfiable,
    etag_for,
    if_range_holds,
    match_fails,
    none_match,
    parse_range,
)

T = TypeVar("T")
log = logging.getLogger("rescat.access")

ROUTE_OBJECT = "/v1/environments/{env}/resources/{path}"
ROUTE_LIST = "/v1/environments/{env}/resources"
ROUTE_PUT_REQUESTS = "/v1/environments/{env}/put-requests"
ROUTE_RESPONSE = "/v1/environments/{env}/put-requests/{request_id}/response"
MAX_JSON_BODY = 64 * 1024
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
CLIENT_CLOSED = 499  # logged (never sent) when the client went away


@dataclass
class _Call:
    """What one request did, for its log line and metrics."""

    method: str
    route: str = "unmatched"
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    env: str | None = None
    token_id: str | None = None
    error: str | None = None


def _segment(raw: bytes) -> str:
    """One path segment, percent-decoded and UTF-8 checked."""
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPathError("a path segment is not valid UTF-8") from None


def _error_response(exc: CatalogError, status: int | None = None) -> Response:
    response = Response(
        error_body(exc.code, str(exc) or exc.code),
        status_code=status or status_for(exc),
        media_type="application/json",
    )
    response.headers["x-rescat-error"] = exc.code  # for HEAD, whose errors have no body
    for key, value in getattr(exc, "headers", {}).items():
        response.headers[key] = value
    return response


def _rfc3339(value: Any) -> str:
    return str(value.isoformat(timespec="milliseconds").replace("+00:00", "Z"))


class ServiceApp:
    """The ASGI application serving `managed` (`create_app` is this class).

    auth: require a bearer token on every /v1 route; max_size: largest body
    accepted (413 beyond); read_timeout: seconds an upload may stall;
    upload_threads / io_threads: worker threads for uploads and for the rest.
    """

    def __init__(
        self,
        managed: ManagedStorage,
        *,
        auth: bool = True,
        max_size: int | None = None,
        read_timeout: float | None = 300.0,
        upload_threads: int = 64,
        io_threads: int = 64,
        tokens: TokenStore | None = None,
    ) -> None:
        self.managed = managed
        self.auth = auth
        self.max_size = max_size
        self.read_timeout = read_timeout
        self.tokens = tokens if tokens is not None else TokenStore(managed.db)
        self.metrics = Metrics()
        # Uploads hold a thread for as long as the client sends; give them their own
        # pool so that slow uploaders cannot starve reads and small calls.
        self._upload_threads = upload_threads
        self._io_threads = io_threads
        self._upload_limiter: anyio.CapacityLimiter | None = None
        self._io_limiter: anyio.CapacityLimiter | None = None
        self._openapi = json.dumps(openapi_document(max_size)).encode()
        # Read-ahead for GETs: the next block comes from MongoDB while one is sent.
        self._read_ahead = ThreadPoolExecutor(io_threads, thread_name_prefix="rescat-read")

    # -- ASGI -----------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        call = _Call(method=scope.get("method", ""))
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
                await _error_response(CatalogError("internal error"), 500)(
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
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._read_ahead.shutdown(wait=False)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _request_id(self, scope: Scope) -> str:
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                text = str(value.decode("latin-1"))
                if _REQUEST_ID_RE.fullmatch(text):
                    return text
        return secrets.token_hex(8)

    def _log(self, call: _Call, request_id: str, scope: Scope, seconds: float) -> None:
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
        if self._upload_limiter is None:
            self._upload_limiter = anyio.CapacityLimiter(self._upload_threads)
        return self._upload_limiter

    @property
    def io_limiter(self) -> anyio.CapacityLimiter:
        if self._io_limiter is None:
            self._io_limiter = anyio.CapacityLimiter(self._io_threads)
        return self._io_limiter

    async def _sync(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self.io_limiter)

    async def _respond(self, request: Request, call: _Call) -> Response:
        try:
            return await self._dispatch(request, call)
        except CatalogError as exc:
            call.error = f"{exc.code}: {exc}"
            return _error_response(exc)
        except (ClientDisconnect, ClientGone):
            raise
        except ConnectionFailure as exc:
            call.error = f"database unavailable: {exc}"
            return _error_response(CatalogError("the database is unavailable"), 503)
        except PyMongoError as exc:
            call.error = f"database error: {exc}"
            log.error("database error: %s", traceback.format_exc())
            return _error_response(CatalogError("database error"), 500)
        except Exception as exc:
            call.error = f"{type(exc).__name__}: {exc}"
            log.error("internal error: %s", traceback.format_exc())
            return _error_response(CatalogError("internal error"), 500)

    # -- routing ----------------------------------------------------------------
    async def _dispatch(self, request: Request, call: _Call) -> Response:
        scope = request.scope
        raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
        raw = raw.split(b"?", 1)[0]
        method = request.method
        parts = raw[1:].split(b"/") if raw.startswith(b"/") else [raw]
        if parts == [b"healthz"]:
            call.route = "/healthz"
            _allow(method, "GET", "HEAD")
            return await self._health(method)
        if parts == [b"metrics"]:
            call.route = "/metrics"
            _allow(method, "GET", "HEAD")
            return Response(self.metrics.render(), media_type=self.metrics.content_type)
        if parts == [b"openapi.json"]:
            call.route = "/openapi.json"
            _allow(method, "GET", "HEAD")
            return Response(self._openapi, media_type="application/json")
        if parts[0] != b"v1":
            raise NotFoundError("no such route")
        call.route = "/v1 (unmatched)"
        token = await self._authenticate(request)
        call.token_id = token.id if token is not None else None
        if len(parts) < 3 or parts[1] != b"environments":
            raise NotFoundError("no such route")
        env = check_env(_segment(parts[2]))
        call.env = env
        if token is not None:
            token.check_env(env)
        rest = parts[3:]
        if rest == [b"resources"]:
            call.route = ROUTE_LIST
            _allow(method, "GET", "HEAD")
            return await self._list(request, env)
        if rest and rest[0] == b"resources":
            call.route = ROUTE_OBJECT
            path = check_path("/".join(_segment(p) for p in rest[1:]))
            _allow(method, "GET", "HEAD", "PUT", "DELETE")
            if method in ("GET", "HEAD"):
                return await self._get(request, env, path, head=method == "HEAD")
            if method == "PUT":
                return await self._put(request, env, path, call)
            return await self._delete(request, env, path)
        if rest == [b"put-requests"]:
            call.route = ROUTE_PUT_REQUESTS
            _allow(method, "POST")
            return await self._create_put_request(request, env)
        if len(rest) == 3 and rest[0] == b"put-requests" and rest[2] == b"response":
            call.route = ROUTE_RESPONSE
            _allow(method, "POST")
            try:
                request_id = _segment(rest[1])
            except InvalidPathError:
                request_id = ""  # malformed: the core answers 410 request_expired
            return await self._answer_put_request(request, env, request_id)
        raise NotFoundError("no such route")

    async def _authenticate(self, request: Request) -> TokenInfo | None:
        if not self.auth:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        try:
            return await self._sync(self.tokens.check, token.strip())
        except UnauthorizedError as exc:
            raise _unauthorized(str(exc)) from None

    # -- handlers ----------------------------------------------------------------
    async def _health(self, method: str) -> Response:
        await self._sync(self.managed.ping)
        return JSONResponse({"status": "ok"})

    async def _list(self, request: Request, env: str) -> Response:
        prefix = check_prefix(_query(request).get("prefix", ""))

        def items() -> list[dict[str, Any]]:
            return [
                {"path": doc["path"], "hash": doc["hash"], "length": int(doc["length"])}
                for doc in self.managed.iter_paths(env, prefix)
            ]

        return JSONResponse({"items": await self._sync(items)})

    async def _get(self, request: Request, env: str, path: str, *, head: bool) -> Response:
        def open_object() -> tuple[Any, int, str]:
            reader, length = self.managed.get_for_environment(env, path)
            digest = getattr(reader, "blake3", None)
            if not digest:
                digest = self.managed.stat_for_environment(env, path).hash
            return reader, length, str(digest)

        reader, size, digest = await self._sync(open_object)
        etag = etag_for(digest)
        headers = {"etag": etag, "accept-ranges": "bytes"}
        try:
            if match_fails(request.headers.get("if-match"), etag):
                raise PreconditionFailedError("If-Match does not match the current content")
            if none_match(request.headers.get("if-none-match"), etag):
                reader.close()
                return Response(status_code=304, headers=headers)
            start, count, status = 0, size, 200
            range_header = request.headers.get("range")
            if range_header is not None and if_range_holds(request.headers.get("if-range"), etag):
                try:
                    selected = parse_range(range_header, size)
                except Unsatisfiable:
                    exc = RangeNotSatisfiableError(f"range {range_header!r}: content has {size} B")
                    exc.headers = {**headers, "content-range": f"bytes */{size}"}  # type: ignore[attr-defined]
                    raise exc from None
                if selected is not None:
                    start, end = selected
                    count, status = end - start + 1, 206
                    headers["content-range"] = f"bytes {start}-{end}/{size}"
            headers["content-length"] = str(count)
            if head or count == 0:
                reader.close()
                return Response(
                    status_code=status, headers=headers, media_type="application/octet-stream"
                )
        except BaseException:
            reader.close()
            raise
        return StreamingResponse(
            iter_content(
                reader,
                start,
                count,
                self.io_limiter,
                self._read_ahead if count > OUT_HOP_BYTES else None,
            ),
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )

    async def _check_preconditions(self, request: Request, env: str, path: str) -> None:
        if_match = request.headers.get("if-match")
        if_none_match = request.headers.get("if-none-match")
        if if_match is None and if_none_match is None:
            return
        try:
            current: str | None = etag_for(
                (await self._sync(self.managed.stat_for_environment, env, path)).hash
            )
        except NotFoundError:
            current = None
        if match_fails(if_match, current):
            raise PreconditionFailedError("If-Match does not match the current content")
        if none_match(if_none_match, current):
            raise PreconditionFailedError("If-None-Match matches the current content")

    async def _put(self, request: Request, env: str, path: str, call: _Call) -> Response:
        header = request.headers.get("x-content-hash")
        expected = parse_hash(header) if header is not None else None
        length = _content_length(request)
        if self.max_size is not None and length > self.max_size:
            raise TooLargeError(f"the body has {length} bytes; the limit is {self.max_size}")
        await self._check_preconditions(request, env, path)
        body = BodyReader(request.stream(), max_size=self.max_size, timeout=self.read_timeout)
        try:
            if 0 <= length <= HOP_BYTES:
                await body.fill(length)  # small bodies: no hop back from the worker
            res = await anyio.to_thread.run_sync(
                self.managed.put_for_environment_and_check_hash,
                env,
                path,
                cast(BinaryIO, body),
                length,
                expected,
                limiter=self.upload_limiter,
            )
        except LengthMismatchError as exc:
            if expected is not None:  # the declared hash is for content of another length
                raise HashMismatchError(f"the body does not hash to {expected}: {exc}") from None
            raise
        finally:
            call.bytes_in = body.count
        location = f"/v1/environments/{env}/resources/{quote(path)}"
        return JSONResponse(
            {"path": path, "hash": res.hash, "length": res.length},
            status_code=201,
            headers={"etag": etag_for(res.hash), "location": location},
        )

    async def _delete(self, request: Request, env: str, path: str) -> Response:
        await self._check_preconditions(request, env, path)
        await self._sync(self.managed.remove_for_environment, env, path)
        return Response(status_code=204)

    async def _create_put_request(self, request: Request, env: str) -> Response:
        doc = await _json_object(request)
        path = check_path(_field(doc, "path"))
        digest = parse_hash(_field(doc, "hash"))
        rr = await self._sync(self.managed.put_for_environment_request, env, path, digest)
        return JSONResponse(
            {
                "request_id": rr.request_id,
                "ranges": [[start, size] for start, size in rr.ranges],
                "expires_at": _rfc3339(rr.expires_at),
            },
            status_code=201,
        )

    async def _answer_put_request(self, request: Request, env: str, request_id: str) -> Response:
        doc = await _json_object(request)
        checksum = _field(doc, "checksum")

        try:
            info = await self._sync(self.managed.prove_for_environment, env, request_id, checksum)
        except (RequestExpiredError, ResponseMismatchError, ResourceDeletedError) as exc:
            self.metrics.proof_failures.labels(exc.code).inc()
            raise
        self.metrics.dedup_hits.inc()
        self.metrics.dedup_bytes.inc(info.length)
        return JSONResponse(
            {"path": info.path, "hash": info.hash, "length": info.length},
            status_code=201,
            headers={"etag": etag_for(info.hash)},
        )


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        exc = MethodNotAllowedError(f"{method} is not allowed here (allowed: {', '.join(allowed)})")
        exc.headers = {"allow": ", ".join(allowed)}  # type: ignore[attr-defined]
        raise exc


def _unauthorized(message: str) -> UnauthorizedError:
    exc = UnauthorizedError(message)
    exc.headers = {"www-authenticate": 'Bearer realm="rescat"'}  # type: ignore[attr-defined]
    return exc


def _content_length(request: Request) -> int:
    """The declared body length, or -1 for a chunked body."""
    value = request.headers.get("content-length")
    if value is None:
        te = request.headers.get("transfer-encoding", "")
        return -1 if "chunked" in te.lower() else 0
    if not value.isdigit() or len(value) > 19:
        raise BadRequestError(f"invalid Content-Length: {value!r}")
    return int(value)


def _query(request: Request) -> dict[str, str]:
    raw: bytes = request.scope.get("query_string", b"")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise InvalidPathError("the query string is not valid UTF-8") from None
    return dict(pairs)


async def _json_object(request: Request) -> dict[str, Any]:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BODY:
            raise TooLargeError(f"a JSON body may have at most {MAX_JSON_BODY} bytes")
        chunks.append(chunk)
    try:
        doc = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError("the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequestError("the body must be a JSON object")
    return doc


def _field(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise BadRequestError(f"the JSON body needs a string field {name!r}")
    return value


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
