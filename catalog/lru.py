"""A thread-safe least-recently-used map bounded by the size of what it holds.

Why: content is addressed by its hash and never changes, so what a process has
read or written of it can be kept and served again without asking MongoDB (the
KV store's values, the inline entries behind small reads).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class SizedLRU(Generic[K, V]):
    """get(key) / add(key, value); the least recently used go first once past `limit`.

    A value larger than a quarter of the limit is not kept: one read must not
    push out everything else.
    """

    def __init__(self, limit: int, size: Callable[[V], int]) -> None:
        self._limit = limit
        self._size_of = size
        self._items: collections.OrderedDict[K, V] = collections.OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def add(self, key: K, value: V) -> None:
        size = self._size_of(value)
        if size > self._limit // 4:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= self._size_of(old)
            self._items[key] = value
            self._size += size
            while self._size > self._limit:
                _, gone = self._items.popitem(last=False)
                self._size -= self._size_of(gone)
