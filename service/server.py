"""How `rescat serve` runs the app: uvicorn, plus the deadlines uvicorn lacks.

uvicorn closes idle keep-alive connections, but it has no deadline for a
request's line and headers (a client that sends one header byte a second keeps
its socket forever) and no cap on the connections one client may hold. Both
live here, in a subclass of uvicorn's HTTP protocol (h11, or httptools when it
is installed) handed to `uvicorn.Config(http=...)`; it works below ASGI, so the
app never sees a request that did not arrive in time. Body deadlines (a
minimum rate, and a longest pause) are the app's (`service.body.BodyReader`),
because only the app knows when it is waiting for body bytes.

* Header deadline: from the moment a connection opens, and again from the end
  of each response (keep-alive), the next request's line and headers must be
  complete within `header_timeout` seconds, else the connection is closed.
  uvicorn's own keep-alive timeout (5 s) still closes a connection that sends
  nothing at all after a response.
* Per-client cap: at most `max_conns_per_client` open connections per peer IP
  address; a connection beyond it gets `429 too_many_requests` and is closed.
  (Behind a reverse proxy every client has the proxy's address: raise or
  disable the cap there, and cap at the proxy.)
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string


@dataclass
class Limits:
    """Per-connection limits of the server (0 disables one)."""

    header_timeout: float = 10.0
    max_conns_per_client: int = 64
    # A request line and headers larger than this are refused (431) and the
    # connection closed: the parser keeps them all in memory until they end.
    max_header_bytes: int = 64 * 1024
    # peer address -> open connections (shared by every connection of one server)
    open_by_client: dict[str, int] = field(default_factory=dict)


TOO_MANY = (
    b"HTTP/1.1 429 Too Many Requests\r\n"
    b"content-type: application/json\r\n"
    b"x-rescat-error: too_many_requests\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)


BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"content-type: application/json\r\n"
    b"x-rescat-error: bad_request\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)


HEADERS_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"x-rescat-error: bad_request\r\n"
    b"connection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)


def _headers_too_large_response(limit: int) -> bytes:
    message = f"the request line and headers are larger than {limit} bytes"
    body = json.dumps({"error": {"code": "bad_request", "message": message}}).encode()
    return HEADERS_TOO_LARGE % (len(body), body)


def _bad_request_response(message: str) -> bytes:
    """What the HTTP parser's refusals answer: the contract's JSON error, not plain text."""
    body = json.dumps({"error": {"code": "bad_request", "message": message}}).encode()
    return BAD_REQUEST % (len(body), body)


def _too_many_response(limit: int) -> bytes:
    body = json.dumps(
        {
            "error": {
                "code": "too_many_requests",
                "message": f"at most {limit} connections per client",
            }
        }
    ).encode()
    return TOO_MANY % (len(body), body)


def base_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol class: httptools when installed, else h11."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return import_from_string(HTTP_PROTOCOLS["h11"])  # type: ignore[no-any-return]
    return import_from_string(HTTP_PROTOCOLS["httptools"])  # type: ignore[no-any-return]


class _Coalescing:
    """A transport whose small writes in one event-loop step leave in one send.

    uvicorn writes a response's status line and headers, then its body, each
    with its own `send` system call; on loopback each is also a wake-up of the
    client. For a small answer that is two of everything. Writes below
    COALESCE_BYTES are gathered and sent together at the end of the current
    loop step (or before a larger write, or on close); larger ones go at once.
    """

    __slots__ = ("_loop", "_pending", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) >= COALESCE_BYTES:
            self.flush()
            self._transport.write(data)
            return
        if data:
            self._pending.append(bytes(data))
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self.flush)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._scheduled = False
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


COALESCE_BYTES = 64 * 1024


@functools.lru_cache(maxsize=4)
def _date_header(second: int) -> tuple[bytes, bytes]:
    return b"date", email.utils.formatdate(second, usegmt=True).encode()


def protocol_class(limits: Limits, base: type[asyncio.Protocol] | None = None) -> type[Any]:
    """A subclass of uvicorn's HTTP protocol that enforces `limits`."""
    parent: Any = base if base is not None else base_protocol()

    class DeadlineProtocol(parent):  # type: ignore[misc,valid-type]
        _limits = limits
        # httptools' protocol calls back when a head and a message end, and its parser
        # keeps what a head holds; h11 has no such callbacks and its own limit (uvicorn's
        # h11_max_incomplete_event_size).
        _counts_heads = hasattr(parent, "on_headers_complete")

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._header_timer: asyncio.TimerHandle | None = None
            self._counted: str | None = None
            self._timed_cycle: Any = None
            peer = transport.get_extra_info("peername")
            host = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else None
            cap = self._limits.max_conns_per_client
            if host is not None and cap > 0:
                open_now = self._limits.open_by_client.get(host, 0)
                if open_now >= cap:
                    transport.write(_too_many_response(cap))
                    transport.close()
                    self._refused = True
                    return
                self._limits.open_by_client[host] = open_now + 1
                self._counted = host
            self._refused = False
            self._in_head, self._head_bytes, self._oversized = True, 0, False
            self._heads = 0  # heads completed on this connection
            # Of the message being read: body bytes handed on (and in how many pieces),
            # and what else came meanwhile (chunk sizes, extensions, trailer fields).
            self._body_bytes, self._body_pieces, self._frame_bytes = 0, 0, 0
            super().connection_made(_Coalescing(transport, self.loop))  # type: ignore[arg-type]
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._cancel_header_timer()
            if self._counted is not None:
                left = self._limits.open_by_client.get(self._counted, 1) - 1
                if left > 0:
                    self._limits.open_by_client[self._counted] = left
                else:
                    self._limits.open_by_client.pop(self._counted, None)
                self._counted = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused or self._oversized:
                return
            in_head, heads, body = self._in_head, self._heads, self._body_bytes
            super().data_received(data)
            cap = self._limits.max_header_bytes
            if self._counts_heads and cap > 0 and self._heads == heads:
                # Counted only when no head completed in it (one that did may have been
                # followed by its whole body, and the next head).
                if in_head and self._in_head:  # all of it went to an unfinished head
                    self._head_bytes += len(data)
                elif not in_head and not self._in_head:  # a body being read: the rest
                    self._frame_bytes += len(data) - (self._body_bytes - body)
                # Chunk framing is a few bytes a piece; trailers are a head of their own.
                framing = cap + 32 * self._body_pieces
                if self._head_bytes > cap or self._frame_bytes > framing:
                    if not self.transport.is_closing():
                        self.transport.write(_headers_too_large_response(cap))
                        self.transport.close()
                    self._oversized = True  # what else arrives is not parsed
                    return
            self._check_headers_done()

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._in_head:  # a trailer field (after the body) is dropped, never kept
                super().on_header(name, value)

        def on_body(self, body: bytes) -> None:
            self._body_bytes += len(body)
            self._body_pieces += 1
            super().on_body(body)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_bytes = True, 0  # what comes next is a request's head

        def send_400_response(self, msg: str) -> None:
            """A request the parser refused (framing, a malformed header, a huge line).

            If the app already answered it (it was handed the request before its
            body failed to parse), the connection just closes.
            """
            cycle = self.cycle
            if cycle is None or not cycle.response_started or cycle.response_complete:
                detail = "the request is not valid HTTP/1.1 (its framing, a header or its length)"
                self.transport.write(_bad_request_response(f"{msg.rstrip('.')}: {detail}"))
            self.transport.close()

        def on_headers_complete(self) -> None:
            """The request's headers are complete: what comes later is no header of it.

            uvicorn's httptools protocol hands the request the list it appends
            header fields to, and a chunked body's trailer fields are appended
            too; a trailer parsed before the app reads its headers would act
            as a header (an `Authorization` or `X-Content-Hash` that no proxy
            in front saw). RFC 9110 §6.5.1: trailers are not merged in.

            Its `Date` is taken now: uvicorn's own is renewed once a second by a
            timer, so it lags by up to a second (more on a busy loop), and a
            `Last-Modified` of a change just made came out later than the `Date`
            of its answer (RFC 9110 §8.8.2.1: must not). The app reads the same
            second as `scope["rescat.date"]` and keeps its dates at or below it.
            """
            now = int(time.time())
            state = self.server_state
            dated = _date_header(now)
            if not state.default_headers or state.default_headers[0] != dated:
                kept = [h for h in state.default_headers if h[0] != b"date"]
                state.default_headers = [dated, *kept]
            self.scope["rescat.date"] = now
            self._in_head = False
            self._heads += 1
            self._body_pieces, self._frame_bytes = 0, 0
            super().on_headers_complete()
            self.headers: list[tuple[bytes, bytes]] = list(getattr(self, "headers", []))

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()
                self._check_headers_done()  # a pipelined request already parsed

        # -- the header deadline ------------------------------------------------------
        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            timeout = self._limits.header_timeout
            if timeout > 0:
                self._header_timer = self.loop.call_later(timeout, self._header_deadline)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _check_headers_done(self) -> None:
            """A new request cycle means its line and headers are complete."""
            cycle = self.cycle
            if cycle is not None and cycle is not self._timed_cycle:
                self._timed_cycle = cycle
                if not cycle.response_complete:
                    self._cancel_header_timer()

        def _header_deadline(self) -> None:
            self._header_timer = None
            cycle = self.cycle
            if cycle is not None and cycle is not self._timed_cycle:
                return  # the headers were just completed
            if cycle is not None and not cycle.response_complete:
                return  # a request is being served
            if not self.transport.is_closing():
                self.transport.close()

    DeadlineProtocol.__name__ = f"Deadline{parent.__name__}"
    DeadlineProtocol.__qualname__ = DeadlineProtocol.__name__
    return DeadlineProtocol


def config(
    app: Any,
    limits: Limits | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    log_level: str = "warning",
    base: type[asyncio.Protocol] | None = None,
) -> uvicorn.Config:
    """The uvicorn configuration `rescat serve` runs `app` with (`base`: see protocol_class)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol_class(limits if limits is not None else Limits(), base),
        access_log=False,  # the app logs one structured line per request
        log_config=None,
        # uvicorn's startup lines repeat what the banner says; its errors still show.
        log_level=log_level if log_level == "debug" else "warning",
        lifespan="on",
        timeout_graceful_shutdown=15,
    )


def run(app: Any, sock: socket.socket, limits: Limits, *, log_level: str = "info") -> None:
    """Serve `app` on the bound socket `sock` until interrupted."""
    host, port = sock.getsockname()[:2]
    _Server(config(app, limits, host=host, port=port, log_level=log_level)).run(sockets=[sock])


class _Server(uvicorn.Server):
    """uvicorn, ending the never-ending watch streams when it begins to shut down.

    Without this, uvicorn waits out its graceful timeout for every open SSE watch.
    """

    async def shutdown(self, sockets: Any = None) -> None:
        from service.routes_watch import end_watches

        end_watches()
        await super().shutdown(sockets)
