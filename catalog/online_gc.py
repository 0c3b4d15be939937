"""gc run online by the service, one instance at a time across a database.

Every instance started with `rescat serve --gc-interval S` wakes every S
seconds and tries to take the lease document `service_leases/_id: "gc"` with
one atomic update: it succeeds when the lease is free, run out, or already its
own. The holder renews it while gc runs and keeps it between runs (so the same
instance keeps the job); another instance takes over once a holder that died
or stopped lets it run out, and at once when a holder shuts down cleanly.

Lease times are the instances' own clocks: the lease outlasts the interval by
`LEASE_MARGIN` seconds, far more than the clock skew of machines that share a
database.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import secrets
import socket
import threading
from typing import Any

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from catalog.clock import utcnow
from catalog.gc import DEFAULT_GC_GRACE, GcReport, gc
from catalog.history import DEFAULT_HISTORY_DAYS
from catalog.managed import ManagedStorage
from catalog.streams import Heartbeat

log = logging.getLogger("rescat.gc")
LEASE_MARGIN = 60.0


class Lease:
    """A named lease in `service_leases`: at most one live holder at a time."""

    def __init__(self, db: Database[Any], name: str, holder: str | None = None) -> None:
        self.collection = db["service_leases"]
        self.name = name
        self.holder = holder or f"{socket.gethostname()}:{secrets.token_hex(6)}"

    def take(self, seconds: float) -> bool:
        """Hold the lease for `seconds` from now if it is free, run out or ours (one update)."""
        now = utcnow()
        until = now + datetime.timedelta(seconds=seconds)
        try:
            doc = self.collection.find_one_and_update(
                {"_id": self.name, "$or": [{"until": {"$lte": now}}, {"holder": self.holder}]},
                {"$set": {"holder": self.holder, "until": until, "taken_at": now}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            return False  # held by another: the upsert's insert collided with its document
        return doc is not None and doc.get("holder") == self.holder

    def release(self) -> None:
        """Let the next instance take it at once (only if we still hold it)."""
        self.collection.update_one(
            {"_id": self.name, "holder": self.holder}, {"$set": {"until": utcnow()}}
        )

    def current(self) -> dict[str, Any] | None:
        return self.collection.find_one({"_id": self.name})


class OnlineGc:
    """A daemon thread running gc every `interval` seconds while it holds the gc lease."""

    def __init__(
        self,
        managed: ManagedStorage,
        interval: float,
        *,
        grace: float = DEFAULT_GC_GRACE,
        history_days: float = DEFAULT_HISTORY_DAYS,
        holder: str | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"the gc interval must be > 0 seconds, not {interval}")
        self.managed = managed
        self.interval = interval
        self.grace = grace
        self.history_days = history_days
        self.lease = Lease(managed.db, "gc", holder)
        self.runs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rescat-gc", daemon=True)

    def start(self) -> OnlineGc:
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        with contextlib.suppress(PyMongoError):  # else it runs out by itself
            self.lease.release()

    def __enter__(self) -> OnlineGc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run_once(self) -> GcReport | None:
        """One gc pass if this instance holds (or can take) the lease; None otherwise."""
        ttl = self.interval + LEASE_MARGIN
        if not self.lease.take(ttl):
            return None
        with Heartbeat(lambda: self._renew(ttl), LEASE_MARGIN / 4):
            report = gc(self.managed, grace=self.grace, history_days=self.history_days)
        self.runs += 1
        if report.changed:
            line = {"event": "gc", "holder": self.lease.holder, **report.to_dict()}
            line.pop("actions", None)
            log.info(json.dumps(line, separators=(",", ":"), default=str))
        return report

    def _renew(self, ttl: float) -> None:
        self.lease.take(ttl)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception as exc:  # the service goes on; the next tick tries again
                log.warning("online gc failed: %s: %s", type(exc).__name__, exc)
