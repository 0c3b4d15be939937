"""Expired TTL keys deleted as they expire, as etcd deletes a lease's keys.

Reads already treat an expired key as absent, but an expiry is no write: a
watcher of the change stream (the SSE watch, another language's client) sees
nothing until something deletes the document, and before this that was gc.
An etcd user expects the delete event within about a second of the lease
running out, with a revision of its own. Every `rescat serve` therefore runs a
reaper thread that deletes what has expired every `interval` seconds.

Each deletion is conditional (`ManagedStorage.delete_expired`: still at the
revision read, still expired), so instances reaping the same database at once
delete each key exactly once, and a key renewed or rewritten meanwhile stays.
When nothing has expired a pass is one index probe (`paths.expires_at`, an
index holding TTL keys only).
"""

from __future__ import annotations

import logging
import threading

from pymongo.errors import PyMongoError

from catalog.kv import reclaim_expired
from catalog.managed import ManagedStorage

log = logging.getLogger("rescat.reaper")
DEFAULT_REAP_INTERVAL = 1.0


class ExpiryReaper:
    """A daemon thread deleting expired TTL keys every `interval` seconds."""

    def __init__(self, managed: ManagedStorage, interval: float = DEFAULT_REAP_INTERVAL) -> None:
        if interval <= 0:
            raise ValueError(f"the reap interval must be > 0 seconds, not {interval}")
        self.managed = managed
        self.interval = interval
        self.reaped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rescat-reaper", daemon=True)

    def start(self) -> ExpiryReaper:
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def __enter__(self) -> ExpiryReaper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_once(self) -> int:
        """Delete what has expired now; how many keys went."""
        count = reclaim_expired(self.managed)
        self.reaped += count
        return count

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except PyMongoError as exc:  # a failover, say: the next pass retries
                log.warning("reaping expired keys failed: %s", exc)
