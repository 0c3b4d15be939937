"""Leases: TTL paths kept alive by the process that owns them.

A leased path is an ordinary path written with `expires_at` and an `owner`;
reads treat it as absent once `expires_at` has passed. Its owner renews it
from one `Renewer` thread (one per store, whatever the number of keys), every
ttl/3, to now + ttl, with one update per group of paths sharing an owner and
a ttl. Renewal changes no revision and no content. A path that expired,
was deleted or was written by anyone else meanwhile is not renewed, and the
lease is dropped (`on_lost` is called: that is how a lock learns it is lost).

When the owner's process dies, renewals stop, and the path is gone from every
read at most ttl seconds after the last renewal.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from catalog.clock import utcnow

log = logging.getLogger("rescat.leases")

_LONGEST_WAIT = 3600.0  # seconds the thread sleeps at most before looking again


@dataclass
class Lease:
    path: str
    owner: str
    ttl: float
    revision: int
    on_lost: Callable[[], None] | None
    deadline: float  # monotonic time at which the path expires unless renewed
    due: float  # next renewal (monotonic)


class Renewer:
    """One daemon thread renewing every lease of one environment's store."""

    def __init__(self, managed: Any, env_uuid: str) -> None:
        self._managed = managed
        self._env = env_uuid
        self._leases: dict[tuple[str, str], Lease] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._paused = False

    def add(
        self,
        path: str,
        owner: str,
        ttl: float,
        revision: int,
        *,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """Renew `path` (written by `owner` with this ttl at `revision`) until removed."""
        now = time.monotonic()
        lease = Lease(path, owner, ttl, revision, on_lost, now + ttl, now + ttl / 3)
        with self._cond:
            if self._closed:
                raise RuntimeError("renewer closed")
            self._leases[(path, owner)] = lease
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"rescat-renew-{self._env}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def remove(self, path: str, owner: str) -> Lease | None:
        with self._cond:
            return self._leases.pop((path, owner), None)

    def leases(self) -> list[Lease]:
        with self._cond:
            return list(self._leases.values())

    def pause(self, paused: bool = True) -> None:
        """Stop (or resume) renewing, as a stalled owner would (for tests)."""
        with self._cond:
            self._paused = paused
            self._cond.notify_all()

    def close(self) -> list[Lease]:
        """Stop the thread; return the leases it held."""
        with self._cond:
            self._closed = True
            leases = list(self._leases.values())
            self._leases.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        return leases

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                lost = [lease for lease in self._leases.values() if lease.deadline <= now]
                for lease in lost:
                    del self._leases[(lease.path, lease.owner)]
                due = [] if self._paused else [x for x in self._leases.values() if x.due <= now]
                if not lost and not due:
                    times = [x.deadline for x in self._leases.values()]
                    if not self._paused:
                        times += [x.due for x in self._leases.values()]
                    wake = min(times, default=now + 1.0) - now
                    # Capped: a wait past threading.TIMEOUT_MAX raises and would end
                    # this thread, and with it the renewal of every lease it holds.
                    self._cond.wait(timeout=min(max(wake, 0.005), _LONGEST_WAIT))
                    continue
            for lease in lost:
                log.info("lease on %s/%s ran out before renewal", self._env, lease.path)
                _notify(lease)
            if due:
                self._renew(due)

    def _renew(self, due: list[Lease]) -> None:
        groups: dict[tuple[str, float], list[Lease]] = {}
        for lease in due:
            groups.setdefault((lease.owner, lease.ttl), []).append(lease)
        for (owner, ttl), leases in groups.items():
            started = time.monotonic()
            expires_at = utcnow() + datetime.timedelta(seconds=ttl)
            try:
                renewed = self._managed.renew_expiry(
                    self._env, [x.path for x in leases], owner, expires_at
                )
            except Exception as exc:  # the database is away: retry soon, deadline stands
                log.warning("lease renewal failed: %s", exc)
                with self._cond:
                    for lease in leases:
                        lease.due = time.monotonic() + min(ttl / 6, 1.0)
                continue
            gone: list[Lease] = []
            with self._cond:
                for lease in leases:
                    key = (lease.path, lease.owner)
                    if self._leases.get(key) is not lease:
                        continue  # removed meanwhile
                    if lease.path in renewed:
                        lease.deadline = started + ttl
                        lease.due = started + ttl / 3
                    else:
                        del self._leases[key]
                        gone.append(lease)
            for lease in gone:
                _notify(lease)


def _notify(lease: Lease) -> None:
    if lease.on_lost is not None:
        try:
            lease.on_lost()
        except Exception:  # pragma: no cover - a callback must not stop renewals
            log.exception("on_lost callback failed")
