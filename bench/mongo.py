"""A throwaway mongod for a benchmark run (fresh dbpath, deleted afterwards)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from catalog.mongod import free_port, start_mongod, stop_process, uri_for, wait_primary


@contextlib.contextmanager
def throwaway_mongod() -> Iterator[str]:
    """Yield a URI: $RESCAT_BENCH_MONGO_URI if set, else a fresh local replica set."""
    external = os.environ.get("RESCAT_BENCH_MONGO_URI")
    if external:
        yield external
        return
    dbpath = Path(tempfile.mkdtemp(prefix="rescat-bench-"))
    port = free_port()
    proc = start_mongod(dbpath, port)
    try:
        wait_primary(port, proc)
        yield uri_for(port)
    finally:
        stop_process(proc)
        shutil.rmtree(dbpath, ignore_errors=True)
