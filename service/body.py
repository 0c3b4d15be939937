"""Bridges between the async HTTP side and the blocking core.

`BodyReader` is a blocking `read(n)` over an ASGI request body for the core,
which runs in a worker thread: each refill is one hop to the event loop that
gathers at least 1 MiB (or what the core asked for), so the hop cost stays
small, and the body is pulled only as fast as the core writes it
(backpressure end to end). A client that disconnects, stalls past the read
timeout, falls below the minimum rate or sends more than the size limit makes
`read` raise, so the core deletes what it wrote and nothing becomes visible.

Deadlines: a body may pause at most `timeout` seconds between two pieces, and
`grace` seconds after it started it must have averaged `min_rate` bytes/s
(checked continuously: byte n is due at start + grace + n / min_rate), so a
body of known length has a whole-request deadline, and a trickle of one byte
every few seconds is dropped after the grace period whatever its length.

While the core waits for body bytes it gives back its `gate` (an upload slot,
see `ServiceApp.upload`): a slow client holds a parked thread, never a slot
that a client with data could use.

`iter_content` is the reverse: an async iterator over a blocking reader,
moving several chunks per hop.
"""

from __future__ import annotations

import asyncio
import io
import math
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Executor, Future
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from starlette.requests import ClientDisconnect

from catalog.errors import BadRequestError, TooLargeError
from service.errors import RequestTimeoutError

HOP_BYTES = 1024 * 1024
FILL_BYTES = 4 * 1024 * 1024
# Seconds the first block of a body may take before its upload shows as pending
# (ServiceApp.upload): a small body sent with its headers never pays the write.
FIRST_BLOCK_WAIT = 0.05
MAX_HOP_BYTES = 8 * 1024 * 1024
OUT_HOP_BYTES = 4 * 1024 * 1024


if sys.version_info >= (3, 11):

    def _deadline(seconds: float) -> AbstractAsyncContextManager[Any]:
        """TimeoutError after `seconds` (inf: never): asyncio's own, a third of anyio's cost.

        Every request body passes here at least once, so this is per-request overhead.
        """
        return asyncio.timeout(None if seconds == math.inf else seconds)

else:  # pragma: no cover - Python 3.10

    @asynccontextmanager
    async def _deadline(seconds: float) -> AsyncIterator[None]:
        with anyio.fail_after(None if seconds == math.inf else seconds):
            yield


def declared_length(headers: Any) -> int:
    """The request body's declared length, or -1 for a chunked body (RFC 9112 §6).

    A Transfer-Encoding other than exactly `chunked` (gzip, identity, a list)
    is refused, not read as "no body": uvicorn hands the request over before
    its parser rejects such a framing, and a body taken as empty would
    replace the object with zero bytes while the client is told 400.
    """
    te = headers.get("transfer-encoding")
    value = headers.get("content-length")
    if te is not None:
        if value is not None:
            raise BadRequestError("a request has Content-Length or Transfer-Encoding, not both")
        if te.strip().lower() != "chunked":
            raise BadRequestError(f"unsupported Transfer-Encoding {te!r}: only chunked")
        return -1
    if value is None:
        return 0
    if not value.isascii() or not value.isdigit() or len(value) > 19:
        raise BadRequestError(f"invalid Content-Length: {value!r}")
    return int(value)


class ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class BodyReader:
    """A blocking reader over an async iterator of body chunks (use from a worker thread)."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        max_size: int | None = None,
        timeout: float | None = None,
        min_rate: float = 0.0,
        grace: float | None = None,
    ) -> None:
        self._chunks = chunks
        self._max_size = max_size
        self._timeout = timeout
        self._min_rate = min_rate
        self._grace = grace if grace is not None else (timeout or 0.0)
        self._started = time.monotonic()
        self._loop = asyncio.get_running_loop()  # made on the event loop, read from threads
        self.gate: anyio.Semaphore | None = None  # held while the core works, see refill
        self.holding = False
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._gone: ClientGone | None = None  # raised once what arrived before it is read
        self.count = 0  # bytes received from the client so far
        self.delivered = 0  # bytes handed to the core so far

    # -- async side ------------------------------------------------------------
    async def fill(self, target: int) -> None:
        """Receive until `target` bytes are buffered or the body ends."""
        while self._buffered < target and not self._eof:
            idle = self._timeout if self._timeout else math.inf
            wait = idle
            if self._min_rate > 0:
                due = self._started + self._grace + (self.count + 1) / self._min_rate
                wait = min(idle, max(due - time.monotonic(), 0.0))
            try:
                async with _deadline(wait):
                    piece = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._eof = True
                break
            except ClientDisconnect:
                raise ClientGone("the client disconnected during the upload") from None
            except TimeoutError:
                if wait < idle:
                    raise RequestTimeoutError(
                        f"the request body arrives slower than {self._min_rate:g} bytes/s"
                    ) from None
                raise RequestTimeoutError(
                    f"no request body data for {self._timeout:g} seconds"
                ) from None
            if not piece:
                continue
            self.count += len(piece)
            if self._max_size is not None and self.count > self._max_size:
                raise TooLargeError(f"the body is larger than {self._max_size} bytes")
            self._pieces.append(piece)
            self._buffered += len(piece)

    # -- blocking side (worker thread) ---------------------------------------
    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts: list[bytes] = []
            while True:
                part = self.read(MAX_HOP_BYTES)
                if not part:
                    return b"".join(parts)
                parts.append(part)
        if size == 0:
            return b""
        if self._buffered < size and not self._eof and self._gone is None:
            target = min(max(size, FILL_BYTES), MAX_HOP_BYTES)
            try:
                # From any worker thread (anyio's or a plain executor's) to the loop.
                asyncio.run_coroutine_threadsafe(self.refill(target), self._loop).result()
            except ClientGone as gone:
                # What arrived before the client went is handed on first (a resumable
                # append keeps it); the next read raises. Never b"": that is the end.
                self._gone = gone
        if self._gone is not None and not self._buffered:
            raise self._gone
        return self._take(size)

    def end(self) -> None:
        """The body is complete (all declared bytes are buffered): read no more."""
        self._eof = True

    async def refill(self, target: int) -> None:
        """`fill`, giving the upload slot back while waiting for the client."""
        gate = self.gate
        if gate is None or not self.holding:
            await self.fill(target)
            return
        self.holding = False
        gate.release()
        await self.fill(target)  # on failure the slot stays given back
        await gate.acquire()
        self.holding = True

    def read_buffered(self) -> bytes:
        """Everything buffered so far (no hop: for the event loop)."""
        return self._take(self._buffered)

    @property
    def complete(self) -> bool:
        """Everything the client sent is buffered (the body ended)."""
        return self._eof

    def _take(self, size: int) -> bytes:
        if not self._pieces:
            return b""
        first = self._pieces[0]
        if len(first) >= size:
            if len(first) == size:
                self._pieces.popleft()
                out = first
            else:
                out = first[:size]
                self._pieces[0] = first[size:]
        else:
            parts: list[bytes] = []
            got = 0
            while self._pieces and got < size:
                piece = self._pieces.popleft()
                if got + len(piece) > size:
                    keep = size - got
                    self._pieces.appendleft(piece[keep:])
                    piece = piece[:keep]
                parts.append(piece)
                got += len(piece)
            out = b"".join(parts)
        self._buffered -= len(out)
        self.delivered += len(out)
        return out

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


def _read_pieces(reader: Any, want: int) -> list[bytes]:
    """Up to `want` bytes from `reader`, as the pieces it yields (chunk-wise when it can)."""
    pieces: list[bytes] = []
    got = 0
    readchunk = getattr(reader, "readchunk", None)
    while got < want:
        piece = readchunk(want - got) if readchunk is not None else reader.read(want - got)
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return pieces


async def iter_content(
    reader: Any,
    start: int,
    length: int,
    limiter: anyio.CapacityLimiter | None = None,
    executor: Executor | None = None,
) -> AsyncIterator[bytes]:
    """Yield `length` bytes of `reader` from `start`; raise if the content ends early.

    With an `executor`, the next block is read from the database while the
    current one is being sent (one block of read-ahead, so memory stays at
    two blocks); without, reads and sends alternate.
    """
    if isinstance(reader, io.BytesIO):  # content held in memory (inline): no thread hops
        try:
            data = reader.getbuffer()[start : start + length].tobytes()
        finally:
            reader.close()
        if len(data) < length:
            raise OSError(f"stored content ended {length - len(data)} bytes early")
        if data:
            yield data
        return
    pending: Future[list[bytes]] | None = None
    try:
        if start:
            await anyio.to_thread.run_sync(reader.seek, start, limiter=limiter)
        left = length
        ahead = left
        if executor is not None and left > 0:
            pending = executor.submit(_read_pieces, reader, min(ahead, OUT_HOP_BYTES))
            ahead -= min(ahead, OUT_HOP_BYTES)
        while left > 0:
            if pending is not None:
                pieces = await anyio.to_thread.run_sync(pending.result, limiter=limiter)
                pending = None
                if executor is not None and ahead > 0:
                    pending = executor.submit(_read_pieces, reader, min(ahead, OUT_HOP_BYTES))
                    ahead -= min(ahead, OUT_HOP_BYTES)
            else:
                pieces = await anyio.to_thread.run_sync(
                    _read_pieces, reader, min(left, OUT_HOP_BYTES), limiter=limiter
                )
            if not pieces:
                raise OSError(f"stored content ended {left} bytes early")
            for piece in pieces:
                left -= len(piece)
                yield piece
    finally:
        with anyio.CancelScope(shield=True):
            if pending is not None:
                await anyio.to_thread.run_sync(_settle, pending, limiter=limiter)
            await anyio.to_thread.run_sync(reader.close, limiter=limiter)


def _settle(future: Future[Any]) -> None:
    """Wait for a read-ahead to finish (its result is not needed any more)."""
    future.exception()
