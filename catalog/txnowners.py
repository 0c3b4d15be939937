"""Transactions a killed process left open, aborted within seconds instead of a minute.

bolt's file lock goes with a process that dies; a MongoDB transaction does
not. Its writes stay locked until the server's transaction lifetime limit (60
s, then the next sweep: 85 s measured): every transaction writing the same
snapshots loses write conflicts meanwhile, and a plain write of a document it
touched (a lock's waiter taking a lock whose holder died inside a fenced
write) waits inside the server as long.

So each process that runs transactions (snapshot ones, and content ones:
deletes, moves, fenced lock writes) keeps an owner document in `txn_owners`:
the server session ids (lsids) it ran transactions on, and a beat counter
that a daemon thread raises every `BEAT` seconds. That thread (started too
by processes that only wait, see `watch`) and a transaction that loses a
write conflict ask `reap()` to look (at most once per BEAT): an owner whose
counter has not moved for `STALE` seconds of the asker's own clock is dead,
so its sessions are killed (`killSessions` aborts their transactions at once
and frees their writes) and its document deleted.

Liveness is judged by a counter seen to stand still, never by comparing
clocks, so machines with skewed clocks do not kill each other's transactions.
pymongo pools server sessions, so a process registers each lsid once (one
write, the first time it starts a transaction on it), not per transaction.
A live process whose beats stop for STALE seconds (stopped with SIGSTOP, say)
has its open transactions aborted; they fail as lost conflicts, as they would
at the server's limit.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
import weakref
from typing import Any

from pymongo import ReturnDocument, WriteConcern
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import InvalidOperation, PyMongoError

BEAT = 1.0
# Long enough for processes that a hung primary held to come back: each finds
# the new primary on its own driver's schedule, seconds apart (a review froze a
# primary 40 s with SIGSTOP: at 5 s, a process back first killed the
# transactions of live ones still on their way back).
STALE = 15.0


class TxnOwners:
    """This process's owner document in one database's `txn_owners`."""

    def __init__(self, db: Database[Any]) -> None:
        self.collection = db["txn_owners"].with_options(write_concern=WriteConcern("majority"))
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._lsids: set[Any] = set()
        self._lock = threading.Lock()
        self._next_reap = 0.0
        self._watch_until = 0.0
        # Others' documents: token -> (beat seen, when first seen at it (monotonic),
        # how many reads of ours have seen it there)
        self._seen: dict[str, tuple[int, float, int]] = {}
        # Beats at w=1: a beat waiting for a majority (a lagging secondary) must not
        # make a live process look dead; the primary's reads see them at once.
        self._beats = db["txn_owners"].with_options(write_concern=WriteConcern(w=1))

    def register(self, session: ClientSession) -> None:
        """Record the session's lsid before its transaction writes anything (once per lsid)."""
        lsid = session.session_id["id"]
        with self._lock:
            if lsid in self._lsids:
                return
        self.collection.update_one(
            {"_id": self.token},
            {"$addToSet": {"lsids": lsid}, "$setOnInsert": {"beat": 0}},
            upsert=True,
        )
        with self._lock:
            self._lsids.add(lsid)
        _beater.add(self)

    def watch(self, seconds: float = 60.0) -> None:
        """Reap dead owners every BEAT for `seconds`, though this process runs no transaction.

        For processes that wait on what others' transactions hold (a lock's
        waiters) without writing in transactions themselves.
        """
        with self._lock:
            self._watch_until = max(self._watch_until, time.monotonic() + seconds)
        _beater.add(self)

    def wanted(self) -> bool:
        """Whether the beat thread should keep this one: it holds lsids, or is watched."""
        return bool(self._lsids) or time.monotonic() < self._watch_until

    def beat(self) -> bool:
        """Raise the counter; False when the document is gone (reaped, or its database dropped)."""
        if not self._lsids:
            return True
        done = self._beats.find_one_and_update(
            {"_id": self.token},
            {"$inc": {"beat": 1}},
            projection={"_id": 1},
            return_document=ReturnDocument.AFTER,
        )
        if done is None:
            with self._lock:  # register again before the next transaction
                self._lsids.clear()
            return False
        return True

    def reap(self) -> int:
        """Abort the transactions of owners seen dead; how many owners went (0 if too soon)."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_reap:
                return 0
            self._next_reap = now + BEAT
        gone = 0
        alive: dict[str, tuple[int, float, int]] = {}
        for doc in self.collection.find({"_id": {"$ne": self.token}}):
            token, beat = doc["_id"], int(doc.get("beat", 0))
            seen = self._seen.get(token)
            if seen is None or seen[0] != beat:
                alive[token] = (beat, now, 1)
                continue
            looks = (beat, seen[1], seen[2] + 1)
            # Dead only if seen standing still by reads of ours spread over STALE
            # seconds (at most one per BEAT): time this process could not look (a
            # stalled server, a paused process) proves nothing.
            if now - seen[1] < STALE or looks[2] < STALE / BEAT:
                alive[token] = looks
            elif self._kill(doc):
                gone += 1
        self._seen = alive
        return gone

    def _kill(self, doc: dict[str, Any]) -> bool:
        lsids = doc.get("lsids") or []
        if lsids:
            self.collection.database.client.admin.command(
                "killSessions", [{"id": lsid} for lsid in lsids]
            )
        # Only if it has not beaten since: a stalled owner that woke keeps its document.
        deleted = self.collection.delete_one({"_id": doc["_id"], "beat": doc.get("beat", 0)})
        return deleted.deleted_count == 1


class _Beater:
    """One daemon thread per process beating every owner document it holds."""

    def __init__(self) -> None:
        self._owners: weakref.WeakSet[TxnOwners] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, owners: TxnOwners) -> None:
        with self._lock:
            self._owners.add(owners)
            if self._thread is None or self._pid != os.getpid():  # none yet, or forked since
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="rescat-txn-beat")
                self._thread.daemon = True
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(BEAT)
            with self._lock:
                owners = list(self._owners)
            for one in owners:
                try:
                    one.beat()  # its document gone (reaped, dropped): it holds no lsid now
                    if not one.wanted():
                        self._owners.discard(one)
                        continue
                    one.reap()  # any process that runs or waits on transactions looks
                except InvalidOperation:
                    self._owners.discard(one)  # its client was closed
                except PyMongoError:
                    pass  # a failover, say: the next beat is in time unless it lasts STALE s


_beater = _Beater()
# id(client) -> (the client, weakly; its owners by database name), for this process
_registry: dict[int, tuple[weakref.ref[Any], dict[str, TxnOwners]]] = {}
_registry_lock = threading.Lock()
_registry_pid = os.getpid()


def owners_of(db: Database[Any]) -> TxnOwners:
    """This process's owner document in `db`, one per client and database.

    Per client because pymongo pools lsids per client: two owners holding the
    same lsid could see one reaped while the other uses it.
    """
    global _registry_pid
    client = db.client
    with _registry_lock:
        if _registry_pid != os.getpid():  # forked: the parent's owners are not ours
            _registry.clear()
            _registry_pid = os.getpid()
        entry = _registry.get(id(client))
        if entry is None or entry[0]() is not client:  # new, or an id reused
            entry = _registry[id(client)] = (weakref.ref(client), {})
        owners = entry[1].get(db.name)
        if owners is None:
            owners = entry[1][db.name] = TxnOwners(db)
        return owners
