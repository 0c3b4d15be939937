"""Reader helpers for uploads: hashing passes and a reader that reports progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, BinaryIO

import blake3

HASH_BLOCK = 4 * 1024 * 1024


def is_seekable(reader: Any) -> bool:
    try:
        return bool(reader.seekable()) and reader.tell() >= 0
    except (AttributeError, OSError, ValueError):
        return False


def hash_stream(reader: BinaryIO, length: int = -1) -> tuple[str, int]:
    """BLAKE3 hex and byte count of the next `length` bytes (< 0: to EOF)."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    total = 0
    while length < 0 or total < length:
        want = HASH_BLOCK if length < 0 else min(HASH_BLOCK, length - total)
        data = reader.read(want)
        if not data:
            break
        hasher.update(data)
        total += len(data)
    return hasher.hexdigest(), total


class WatchedReader:
    """Counts the bytes read through it and calls `tick` at most every `every` seconds.

    The upload path uses it to renew its lease while the storage pulls bytes,
    without the storage layer knowing leases exist.
    """

    def __init__(
        self, inner: BinaryIO, tick: Callable[[], None] | None = None, every: float = 10.0
    ) -> None:
        self._inner = inner
        self._tick = tick
        self._every = every
        self._last = time.monotonic()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if data:
            self.count += len(data)
        if self._tick is not None and time.monotonic() - self._last >= self._every:
            self._last = time.monotonic()
            self._tick()
        return data if data is not None else b""

    def readable(self) -> bool:
        return True
