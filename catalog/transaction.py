"""Content transactions: several puts, removes and moves that land together or not at all.

Bytes cannot go through a MongoDB transaction (it is killed after 60 s and
capped in size), so each `put` stores its bytes and takes its reference at
once, outside it; what the transaction holds back is only the linking. When
the block ends, one MongoDB transaction links every put and applies every
remove and move in the order called; if it fails, or the block raised, the
puts' references are released again, so their bytes go (at once when nobody
else holds them, or by gc after its grace if this process dies first).

While the block runs, those references are held by no path: as an uploader's
in-flight reference is, they are kept by a lease this process renews until the
block ends (gc recounts an entry only once its lease has run out, however long
the block takes). Should one be lost all the same (this process stalled past
the lease), the commit fails rather than link a path to content that is gone.

A `remove` or `move` checks its path at the call against what the paths will be
by then: as committed, changed by this transaction's earlier calls (a path it
put or moved in exists, one it removed or moved away does not). A call that
raised NotFoundError dooms the transaction even when the caller catches it:
nothing takes effect, and its end raises that error again.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from pymongo.client_session import ClientSession

from catalog.errors import NotFoundError, NoTransactionError, ResourceDeletedError
from catalog.managed import PLAIN, WriteOptions, outcome_unknown
from catalog.names import check_env, check_path
from catalog.resources import READY, Resource, object_id
from catalog.streams import binary_source

if TYPE_CHECKING:
    from catalog.managed import ManagedStorage

Step = Callable[[ClientSession | None, list[str]], Any]


class ContentTransaction:
    """`with managed.transaction() as tx:` — tx.put, tx.remove, tx.move."""

    def __init__(self, managed: ManagedStorage) -> None:
        self._managed = managed
        self._steps: list[Step] = []
        self._held: list[Resource] = []
        self._open = True
        self._paths: dict[tuple[str, str], bool] = {}  # what earlier calls made exist or not
        self._failed: NotFoundError | None = None
        self._beat: tuple[threading.Event, threading.Thread] | None = None

    def put(
        self,
        env_uuid: str,
        path: str,
        reader: BinaryIO | bytes | bytearray | memoryview,
        length: int = -1,
        check_hash: str | None = None,
    ) -> Resource:
        """Store the bytes now (a binary reader, or the bytes themselves, as Environment.put
        takes them); the path points at them when the block ends."""
        self._check_open()
        check_env(env_uuid)
        check_path(path)
        reader, length = binary_source(reader, length)
        staged = WriteOptions(link=False)
        res, _ = self._managed._put(env_uuid, path, reader, length, check_hash or None, staged)
        self._held.append(res)
        self._hold()
        self._paths[(env_uuid, path)] = True
        target = {"resource_id": object_id(res.id), "hash": res.hash, "length": res.length}

        def link(session: ClientSession | None, doomed: list[str]) -> Any:
            held = {"_id": target["resource_id"], "state": READY}
            if self._managed.catalog.collection.find_one(held, {"_id": 1}, session=session) is None:
                raise ResourceDeletedError(f"the content put at {env_uuid}: {path!r} was lost")
            return self._managed._link_in(env_uuid, path, target, PLAIN, session, doomed)

        self._steps.append(link)
        return res

    def remove(self, env_uuid: str, path: str) -> None:
        self._check_open()
        check_env(env_uuid)
        check_path(path)
        self._require(env_uuid, path)  # NotFoundError at the call
        self._paths[(env_uuid, path)] = False
        self._steps.append(lambda s, d: self._managed._unlink_in(env_uuid, path, None, s, d))

    def move(self, env_uuid: str, src: str, dst: str) -> None:
        self._check_open()
        check_env(env_uuid)
        check_path(src)
        check_path(dst)
        self._require(env_uuid, src)
        if src != dst:
            self._paths[(env_uuid, src)], self._paths[(env_uuid, dst)] = False, True
            self._steps.append(lambda s, d: self._managed._move_in(env_uuid, src, dst, s, d))

    def commit(self) -> None:
        """Apply everything in one MongoDB transaction; on failure nothing changed."""
        self._check_open()
        self._open = False
        if self._failed is not None:  # a call failed (and was caught): nothing takes effect
            self._release_held()
            raise self._failed
        try:
            self._managed.transact(self._apply)
        except BaseException as exc:
            if not outcome_unknown(exc):  # else the paths may hold them now: gc recounts
                self._release_held()
            raise
        finally:
            self._unhold()
        self._held.clear()  # each reference now belongs to the path it was linked to

    def rollback(self) -> None:
        self._check_open()
        self._open = False
        self._unhold()
        self._release_held()

    def __enter__(self) -> ContentTransaction:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._open:
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def _hold(self) -> None:
        """Renew the leases of the held references until the block ends (see the module doc).

        The renewing thread holds this transaction weakly: one never ended stops
        renewing once it is dropped.
        """
        if self._beat is not None:
            return
        me = weakref.ref(self)
        stop = threading.Event()
        every = max(self._managed.catalog.lease / 4, 0.01)

        def run() -> None:
            while not stop.wait(every):
                tx = me()
                if tx is None:
                    return
                catalog, ids = tx._managed.catalog, [res.id for res in tx._held]
                del tx
                for rid in ids:
                    with contextlib.suppress(Exception):  # a missed beat is retried
                        catalog.renew_lease(rid)

        thread = threading.Thread(target=run, name="rescat-tx-lease", daemon=True)
        self._beat = (stop, thread)
        thread.start()

    def _unhold(self) -> None:
        beat, self._beat = self._beat, None
        if beat is not None:
            beat[0].set()
            beat[1].join()

    def __del__(self) -> None:
        beat = getattr(self, "_beat", None)
        if beat is not None:
            beat[0].set()  # never joined here: this may run on that very thread

    def _apply(self, session: ClientSession | None, doomed: list[str]) -> None:
        for step in self._steps:
            step(session, doomed)

    def _release_held(self) -> None:
        for res in self._held:
            self._managed._release(res.id)
        self._held.clear()

    def _require(self, env_uuid: str, path: str) -> None:
        """NotFoundError, dooming the transaction, if the path will not exist at this call."""
        exists = self._paths.get((env_uuid, path))
        if exists is None:
            try:
                self._managed.stat_for_environment(env_uuid, path)
                exists = True
            except NotFoundError:
                exists = False
        if not exists:
            self._failed = NotFoundError(f"{env_uuid}: no such path {path!r}", path=path)
            raise self._failed

    def _check_open(self) -> None:
        if not self._open:
            raise NoTransactionError("the transaction has ended")
