"""The benchmarks' MongoDB: $RESCAT_BENCH_MONGO_URI, else a throwaway local replica set."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from catalog.mongod import throwaway


@contextlib.contextmanager
def throwaway_mongod() -> Iterator[str]:
    with throwaway("RESCAT_BENCH_MONGO_URI") as uri:
        yield uri
