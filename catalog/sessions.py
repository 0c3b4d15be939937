"""Upload sessions: content written piece by piece, invisible until one commit.

Shared machinery of the registry driver's writers and of the HTTP resumable
uploads. A session is one document in `upload_sessions` plus GridFS chunks under
a files_id of its own, written as the bytes arrive (no temporary file, never the
whole content in memory: a writer buffers at most the one chunk it is filling).

* `offset` (the document's `size`) is what is durable: it moves at checkpoints
  (a writer's close or commit, the end of an HTTP append), each a majority write
  of the document followed by a majority read that finds exactly the chunks of
  that length (the durability rule of `GridFSStorage.put_file`). Bytes written
  after the last checkpoint by a writer that died are cut off when the session
  is next opened.
* One writer at a time: opening a writer claims the session (`owner`, with a
  lease its heartbeat renews); a claim whose lease ran out may be taken over, so
  a session left by a killed process is resumed from any other process.
* `commit` hashes (in memory when this process wrote every byte, else by reading
  the chunks back) and makes the path point at the content in one step. New
  content keeps the session's chunks: they get a files document at a fresh
  storage path, no copy. Known content drops them and takes a reference. Small
  content goes inline in its catalog entry like any small put.
* Until commit nothing is visible: no path is created or changed.
* `reclaim_sessions` (gc) deletes sessions idle for longer than a maximum age;
  `live_session_file_ids` lists the files_ids whose chunks belong to a session,
  so gc and fsck never take them for orphans.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import math
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

import blake3
from bson import ObjectId
from pymongo import ASCENDING, ReturnDocument, WriteConcern
from pymongo.errors import DuplicateKeyError

from catalog.clock import aware, utcnow
from catalog.errors import (
    BadRequestError,
    CatalogError,
    HashMismatchError,
    InvalidOffsetError,
    NotFoundError,
    OffsetMismatchError,
    PreconditionFailedError,
    UploadPendingError,
)
from catalog.managed import PLAIN, WriteOptions
from catalog.names import check_env, check_path, parse_hash
from catalog.pathdocs import revision
from catalog.streams import Heartbeat
from storage.errors import StaleWriteError
from storage.reader import NotDurableError

if TYPE_CHECKING:
    from catalog.managed import ManagedStorage, PathInfo

COLLECTION = "upload_sessions"
DRIVER = "driver"  # one per path: the registry driver's writer of that path
UPLOAD = "upload"  # HTTP resumable uploads: any number per path
OPEN = "open"
COMMITTING = "committing"
DEFAULT_MAX_AGE = 7 * 24 * 3600.0
COPY_BLOCK = 1024 * 1024
# Chunk inserts in flight per writer while it hashes and cuts the next ones (the
# server is the bottleneck: this keeps it busy without holding more in memory).
IN_FLIGHT = 2
# A writer trusts its claim for this share of the lease after the claim or renewal was
# sent; past it, it renews (conditional on still owning the session) before writing a chunk.
LEASE_TRUST = 0.75
_POOL_LOCK = threading.Lock()
_POOL: list[ThreadPoolExecutor] = []


def _insert_pool() -> ThreadPoolExecutor:
    """Worker threads shared by every writer of the process (none started per writer)."""
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(8, thread_name_prefix="rescat-session"))
        return _POOL[0]


class SessionLostError(UploadPendingError):
    """The session changed under this writer (taken over, cancelled or reclaimed)."""


@dataclass(frozen=True)
class Session:
    """What a session is: `offset` bytes durable so far."""

    id: str
    env_uuid: str
    path: str
    kind: str
    offset: int
    created_at: datetime.datetime
    updated_at: datetime.datetime
    file_id: Any = None


def _session(doc: dict[str, Any]) -> Session:
    return Session(
        id=str(doc["_id"]),
        env_uuid=doc["env"],
        path=doc["path"],
        kind=doc.get("kind", UPLOAD),
        offset=int(doc["size"]),
        created_at=aware(doc["created_at"]),
        updated_at=aware(doc["updated_at"]),
        file_id=doc["file_id"],
    )


class _HasherCache:
    """BLAKE3 states of sessions this process wrote, keyed by their checkpoint.

    A BLAKE3 state cannot be stored in MongoDB; a writer reopened in the process
    that wrote the bytes so far picks its state up here (only if no other writer
    checkpointed since: the checkpoint token says so), else commit re-reads.
    """

    def __init__(self, size: int = 256, tail_bytes: int = 16 * 1024 * 1024) -> None:
        self._items: OrderedDict[str, tuple[str, int, Any, bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self._size = size
        self._tail_budget = tail_bytes  # partial chunks kept, all sessions together
        self._tails = 0

    def put(self, session_id: str, ckpt: str, length: int, hasher: Any, tail: bytes) -> None:
        with self._lock:
            old = self._items.pop(session_id, None)
            if old is not None:
                self._tails -= len(old[3])
            self._items[session_id] = (ckpt, length, hasher, tail)
            self._tails += len(tail)
            while len(self._items) > self._size or self._tails > self._tail_budget:
                _, evicted = self._items.popitem(last=False)
                self._tails -= len(evicted[3])

    def take(self, session_id: str, ckpt: str, length: int) -> tuple[Any, bytes] | None:
        """(hasher, partial tail chunk) if this process wrote the session's last checkpoint."""
        with self._lock:
            item = self._items.pop(session_id, None)
            if item is not None:
                self._tails -= len(item[3])
        if item is None or item[0] != ckpt or item[1] != length:
            return None
        return item[2], item[3]


_HASHERS = _HasherCache()


class SessionStore:
    """Upload sessions over a ManagedStorage whose resource storage is a GridFSStorage."""

    def __init__(self, managed: ManagedStorage) -> None:
        self.managed = managed
        self.storage = managed.resource_storage
        if not hasattr(self.storage, "write_session_chunks"):
            raise CatalogError("upload sessions need a GridFSStorage resource storage")
        self.lease = managed.catalog.lease
        self.sessions = managed.db[COLLECTION].with_options(write_concern=WriteConcern("majority"))
        # Claims and lease renewals: a claim rolled back by a failover only makes the
        # writer's next checkpoint (majority, conditional on the claim) fail.
        self._fast = self.sessions.with_options(write_concern=WriteConcern(w=1))
        self.sessions.create_index(
            [("env", ASCENDING), ("path", ASCENDING)],
            unique=True,
            partialFilterExpression={"kind": DRIVER},
            name="driver_path",
        )
        self.sessions.create_index([("updated_at", ASCENDING)])

    # -- sessions by id ---------------------------------------------------------
    def create(
        self, env_uuid: str, path: str, *, kind: str = UPLOAD, base_rev: int | None = None
    ) -> Session:
        """A new empty session for `path`.

        base_rev: the revision of the path whose bytes the session starts with (a
        driver writer appending to committed content); a writer that resumes the
        session later does so only while the path still holds that revision.

        kind DRIVER: the path's previous driver session, if any, is discarded
        (a writer opened without append starts over), unless a live writer is
        committing it: its chunks are becoming the path's content, so this
        waits for that commit to end (UploadPendingError after a lease). A
        writer that dies mid-commit leaves a session whose lease runs out; that
        one is discarded (its chunks only if no stored file took them).
        """
        check_env(env_uuid)
        check_path(path)
        if kind not in (DRIVER, UPLOAD):
            raise BadRequestError(f"invalid session kind: {kind!r}")
        deadline = time.monotonic() + self.lease + 5.0
        while True:
            if kind == DRIVER:
                now = utcnow()
                not_committing = [{"state": {"$ne": COMMITTING}}, {"lease_until": {"$lte": now}}]
                old = self.sessions.find_one_and_delete(
                    {"env": env_uuid, "path": path, "kind": DRIVER, "$or": not_committing}
                )
                if old is not None:
                    self.storage.discard_session_chunks(old["file_id"])
                    _abandoned(self.managed, old)
            now = utcnow()
            doc = {
                "_id": secrets.token_urlsafe(18),
                "env": env_uuid,
                "path": path,
                "kind": kind,
                "file_id": ObjectId(),
                "chunk_size": self.storage.chunk_size,
                "size": 0,
                "state": OPEN,
                "owner": None,
                "lease_until": now,
                "ckpt": secrets.token_hex(8),
                "created_at": now,
                "updated_at": now,
            }
            if base_rev is not None:
                doc["base_rev"] = base_rev
            try:
                # The document comes before any chunk, so gc always sees whose they are.
                self.sessions.insert_one(doc)
            except DuplicateKeyError:
                # Another writer of this path created one meanwhile (replace it), or one
                # is committing (wait for it).
                if time.monotonic() > deadline:
                    raise UploadPendingError(
                        f"{env_uuid}: {path!r} is being committed by another writer"
                    ) from None
                time.sleep(0.01)
                continue
            return _session(doc)

    def get(self, env_uuid: str, session_id: str) -> Session:
        check_env(env_uuid)
        return _session(self._doc(env_uuid, session_id))

    def find(self, env_uuid: str, path: str) -> Session | None:
        """The driver session of `path`, if there is one."""
        check_env(env_uuid)
        check_path(path)
        doc = self.sessions.find_one({"env": env_uuid, "path": path, "kind": DRIVER})
        return _session(doc) if doc is not None else None

    def open(self, env_uuid: str, session_id: str) -> SessionWriter:
        """Claim a session and return its writer, positioned at the session's end.

        UploadPendingError while another live writer holds it; NotFoundError when
        it does not exist (never did, cancelled, committed or reclaimed).
        """
        check_env(env_uuid)
        writer = self._claim({"_id": _sid(session_id), "env": env_uuid})
        if writer is None:
            raise self._held(env_uuid, session_id)
        if isinstance(writer, RolledForward):
            raise _ended(env_uuid, session_id, writer)
        return writer

    def _held(self, env_uuid: str, session_id: str) -> UploadPendingError:
        """The error for a session another writer holds; NotFoundError if it is gone.

        It says when that writer's lease runs out (`retry_after`, whole seconds,
        the service's Retry-After): a writer that died (a killed instance, a
        dropped request whose thread still holds it) lets go only then, and a
        client resuming the upload can wait for exactly that long.
        """
        doc = self._doc(env_uuid, session_id)
        left = (aware(doc["lease_until"]) - utcnow()).total_seconds()
        exc = UploadPendingError(
            f"upload session {session_id} is held by another writer "
            f"(for at most {max(left, 0):.0f} s more, unless it renews its lease)"
        )
        exc.retry_after = max(1, math.ceil(left))  # type: ignore[attr-defined]
        return exc

    def open_path(self, env_uuid: str, path: str) -> SessionWriter | None:
        """Claim the driver session of `path` (one query); None when it has none."""
        check_env(env_uuid)
        check_path(path)
        key = {"env": env_uuid, "path": path, "kind": DRIVER}
        writer = self._claim(key)
        if writer is None and self.sessions.find_one(key, {"_id": 1}) is not None:
            raise UploadPendingError(f"{env_uuid}: the session of {path!r} is held by a writer")
        if isinstance(writer, RolledForward):
            return None  # committed now: an append goes on from the file
        return writer

    def _claim(self, key: dict[str, Any]) -> SessionWriter | RolledForward | None:
        owner = secrets.token_hex(12)
        sent = time.monotonic()
        now = utcnow()
        doc = self._fast.find_one_and_update(
            {
                **key,
                "state": {"$in": [OPEN, COMMITTING]},
                "$or": [{"owner": None}, {"lease_until": {"$lte": now}}],
            },
            {
                "$set": {
                    "owner": owner,
                    "lease_until": self._lease_end(now),
                    "updated_at": now,
                    "tidy": False,
                    "state": OPEN,
                }
            },
            return_document=ReturnDocument.BEFORE,
        )
        if doc is None:
            return None
        if doc.get("state") == COMMITTING:
            ended = self._after_dead_commit(doc, owner)
            if ended is not None:
                return ended
        size = int(doc["size"])
        cached = _HASHERS.take(str(doc["_id"]), doc["ckpt"], size)
        tidy = bool(doc.get("tidy"))
        try:
            if tidy and cached is not None:
                hasher, tail = cached
            else:
                hasher = cached[0] if cached is not None else None
                tail = self.storage.truncate_session_chunks(doc["file_id"], size, tidy=tidy)
        except BaseException:
            self._release(str(doc["_id"]), owner)
            raise
        return SessionWriter(self, doc, owner, tail, hasher, claimed_at=sent)

    def append(
        self, env_uuid: str, session_id: str, offset: int, reader: BinaryIO, length: int = -1
    ) -> int:
        """Append the reader's bytes (`length` of them, or to EOF) at `offset`; the new offset.

        An offset other than the session's current one raises OffsetMismatchError
        and changes nothing. If the reader fails midway, what arrived is kept
        (checkpointed) and the error propagates: the client resumes from the
        offset it then reads back.
        """
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise InvalidOffsetError(
                f"invalid offset: {offset!r}", offset=offset if isinstance(offset, int) else -1
            )
        writer = self.open(env_uuid, session_id)
        try:
            if offset != writer.size():
                raise OffsetMismatchError(
                    f"upload session {session_id} is at offset {writer.size()}, not {offset}",
                    offset=offset,
                    expected=writer.size(),
                )
            writer.copy_from(reader, length)
        except BaseException:
            writer.close()
            raise
        writer.close()
        return writer.size()

    def commit(self, env_uuid: str, session_id: str, expected_hash: str | None = None) -> PathInfo:
        """Make the session's path point at its content; HashMismatchError keeps the session.

        A retry of a commit whose writer died after storing the bytes finishes
        it and answers as the commit would have (`_after_dead_commit`).
        """
        check_env(env_uuid)
        claimed = self._claim({"_id": _sid(session_id), "env": env_uuid})
        if claimed is None:
            raise self._held(env_uuid, session_id)
        if isinstance(claimed, RolledForward):
            if claimed.info is None:
                raise _ended(env_uuid, session_id, claimed)
            if expected_hash and parse_hash(expected_hash) != claimed.info.hash:
                raise HashMismatchError(
                    f"content hashes to {claimed.info.hash}, not {parse_hash(expected_hash)}"
                )
            return claimed.info
        writer = claimed
        try:
            return writer.commit(expected_hash)
        finally:
            writer.close()

    def cancel(self, env_uuid: str, session_id: str) -> None:
        """Discard a session and its bytes (UploadPendingError while a writer holds it)."""
        check_env(env_uuid)
        now = utcnow()
        doc = self.sessions.find_one_and_delete(
            {
                "_id": _sid(session_id),
                "env": env_uuid,
                "$or": [{"owner": None}, {"lease_until": {"$lte": now}}],
            }
        )
        if doc is None:
            raise self._held(env_uuid, session_id)
        self.storage.discard_session_chunks(doc["file_id"])
        _abandoned(self.managed, doc)

    def discard_under(self, env_uuid: str, path: str) -> int:
        """Discard the driver sessions of `path` and of the paths under it; how many.

        For a delete of a directory: its unfinished writes must not come back
        through a later writer(append=True). A session a live writer holds is
        left to that writer (as `cancel` leaves it); its bytes only appear if
        it commits, after the delete, as a new file would.
        """
        check_env(env_uuid)
        check_path(path)
        under = {"$regex": "^" + re.escape(path + "/")}
        unheld = {"$or": [{"owner": None}, {"lease_until": {"$lte": utcnow()}}]}
        query = {
            "env": env_uuid,
            "kind": DRIVER,
            "$and": [{"$or": [{"path": path}, {"path": under}]}, unheld],
        }
        discarded = 0
        for doc in list(self.sessions.find(query, {"_id": 1})):
            gone = self.sessions.find_one_and_delete({"_id": doc["_id"], **unheld})
            if gone is not None:
                self.storage.discard_session_chunks(gone["file_id"])
                _abandoned(self.managed, gone)
                discarded += 1
        return discarded

    # -- internals --------------------------------------------------------------
    def _after_dead_commit(self, doc: dict[str, Any], owner: str) -> RolledForward | None:
        """A writer died while committing: resume (None), or end the session with its outcome.

        The commit recorded the path's revision when it began (`commit_rev`).
        If the path is no longer there, the commit linked already (its last
        step, deleting the session, is what died) or a newer write came: the
        session just ends, and a retry is answered with the path as it is when
        it holds this commit's content. Else: bytes still the session's chunks
        resume; bytes that became a stored file (whole and durable by then)
        roll the commit forward (`ManagedStorage.adopt_stored`), on the
        condition that the path is still as the commit found it, so a write
        acknowledged since is never undone.
        """
        file_id, size = doc["file_id"], int(doc["size"])
        env, path = doc["env"], doc["path"]
        marked = "commit_rev" in doc
        changed = marked and _revision_now(self.managed, env, path) != doc["commit_rev"]
        stored = self.storage.session_file(file_id)
        if not changed and stored is None and self.storage.session_chunks_durable(file_id, size):
            return None
        info: PathInfo | None = None
        if not changed and stored is not None and stored.length == size and stored.blake3:
            try:
                info = self.managed.adopt_stored(
                    env, path, stored.blake3, size, stored.path, _roll_options(doc)
                )
            except PreconditionFailedError:
                info = None  # the path changed meanwhile: the commit would have failed
        digest = stored.blake3 if stored is not None else None
        if digest is None and changed and size <= self.managed.inline_max:
            # Small content is put whole, then its chunks go: they may still be here.
            data = b"".join(self.storage.iter_session_chunks(file_id))
            digest = blake3.blake3(data).hexdigest() if len(data) == size else None
        self.sessions.delete_one({"_id": doc["_id"], "owner": owner})
        if stored is None:
            self.storage.discard_session_chunks(file_id)
        if info is None and digest is not None:
            with contextlib.suppress(NotFoundError):
                now = self.managed.stat_for_environment(env, path)
                if now.hash == digest:
                    info = now  # it committed before its writer died
        return RolledForward(info)

    def _doc(self, env_uuid: str, session_id: str) -> dict[str, Any]:
        doc = self.sessions.find_one({"_id": _sid(session_id), "env": env_uuid})
        if doc is None:
            raise NotFoundError(f"{env_uuid}: no upload session {session_id!r}")
        return dict(doc)

    def _lease_end(self, now: datetime.datetime) -> datetime.datetime:
        return now + datetime.timedelta(seconds=self.lease)

    def _renew(self, session_id: str, owner: str) -> bool:
        """Extend the lease; False when `owner` no longer holds the session."""
        now = utcnow()
        result = self._fast.update_one(
            {"_id": session_id, "owner": owner},
            {"$set": {"lease_until": self._lease_end(now), "updated_at": now}},
        )
        return result.matched_count == 1

    def _release(self, session_id: str, owner: str) -> None:
        self.sessions.update_one(
            {"_id": session_id, "owner": owner}, {"$set": {"owner": None, "state": OPEN}}
        )


@dataclass(frozen=True)
class RolledForward:
    """A claimed session that ended instead: its dead writer's commit, finished or not.

    info: the path holding the commit's content (rolled forward now, or linked
    before its writer died); None when the commit did not take effect.
    """

    info: PathInfo | None


class SessionWriter:
    """The one writer of a claimed session: write(), size(), close(), commit(), cancel()."""

    def __init__(
        self,
        store: SessionStore,
        doc: dict[str, Any],
        owner: str,
        tail: bytes,
        hasher: Any,
        *,
        claimed_at: float,
    ) -> None:
        self._store = store
        self.session_id = str(doc["_id"])
        self.env_uuid: str = doc["env"]
        self.path: str = doc["path"]
        self.file_id = doc["file_id"]
        # The path's revision whose bytes this session began with (an append), or None.
        self.base_rev: int | None = doc.get("base_rev")
        self._owner = owner
        self._chunk_size = int(doc["chunk_size"])
        if self._chunk_size != store.storage.chunk_size:
            raise CatalogError(f"upload session {self.session_id}: chunk size changed")
        self._size = int(doc["size"])
        self._verified = self._size  # confirmed durable by the last checkpoint
        self._n = self._size // self._chunk_size  # index of the chunk being filled
        self._buf = bytearray(tail)
        # Chunk _n as stored (a partial tail), which the next write of it replaces.
        self._stored_tail: bytes | None = bytes(tail) if tail else None
        self._hasher = hasher if hasher is not None or self._size else blake3.blake3()
        self._state = OPEN
        self._in_flight: deque[Future[None]] = deque()
        self._trusted_until = claimed_at + store.lease * LEASE_TRUST
        self._lost = False
        self._heartbeat = Heartbeat(self._beat, store.lease / 4)
        self._heartbeat.__enter__()

    # -- the writer -------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._check_open("write to")
        view = memoryview(data).cast("B")
        count = len(view)
        if not count:
            return 0
        if self._hasher is not None:
            self._hasher.update(view)
        cs = self._chunk_size
        chunks: list[bytes] = []
        first_n = self._n
        stored: bytes | None = None
        if self._buf:
            take = min(cs - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == cs:
                chunks.append(bytes(self._buf))
                stored, self._stored_tail = self._stored_tail, None
                self._buf = bytearray()
        while len(view) >= cs:
            chunks.append(bytes(view[:cs]))
            view = view[cs:]
        if len(view):
            self._buf += view
        if chunks:
            self._submit(first_n, chunks, stored)
            self._n += len(chunks)
        self._size += count
        return count

    def _submit(self, first_n: int, chunks: list[bytes], stored: bytes | None) -> None:
        """Insert chunks on a worker thread; at most IN_FLIGHT inserts outstanding."""
        if len(self._in_flight) >= IN_FLIGHT:
            self._wait(self._in_flight.popleft())
        self._in_flight.append(_insert_pool().submit(self._write_chunks, first_n, chunks, stored))

    def _write_chunks(self, first_n: int, chunks: list[bytes], stored: bytes | None) -> None:
        """Write chunks of the session file, only while this writer still holds the session.

        A writer stalled past its lease (a stopped process, a paused VM) may have
        been taken over, and the new writer may have rewritten or committed these
        chunk positions: a write then would change bytes that are not this
        writer's any more (a committed file's, read through every path to its hash).
        `stored`: what chunk `first_n` holds now, if it exists; it is replaced only
        if it still does, which also covers a stall between the fence and the write.
        """
        self._fence()
        try:
            self._store.storage.write_session_chunks(
                self.file_id,
                first_n,
                chunks,
                replace_first=stored is not None,
                expect_first=stored,
            )
        except StaleWriteError:
            self._lost = True
            raise SessionLostError(
                f"upload session {self.session_id} was taken over (its chunks changed)"
            ) from None

    def _beat(self) -> None:
        sent = time.monotonic()
        if self._store._renew(self.session_id, self._owner):
            self._trusted_until = max(self._trusted_until, sent + self._store.lease * LEASE_TRUST)
        else:
            self._lost = True

    def _fence(self) -> None:
        """SessionLostError unless this writer's claim is known to hold (renewed if in doubt)."""
        if not self._lost and time.monotonic() < self._trusted_until:
            return
        if not self._lost:
            self._beat()  # late heartbeat, or back from a stall: ask the database
            if not self._lost:
                return
        raise SessionLostError(f"upload session {self.session_id} was taken over or removed")

    def _wait(self, future: Future[None]) -> None:
        try:
            future.result()
        except BaseException:
            self._drain(raise_errors=False)
            self._end("failed")  # the next writer cuts the session back to its checkpoint
            with contextlib.suppress(Exception):
                self._store._release(self.session_id, self._owner)
            raise

    def _drain(self, *, raise_errors: bool = True) -> None:
        """Wait for every chunk insert in flight (so cleanup and checkpoints see them all)."""
        while self._in_flight:
            future = self._in_flight.popleft()
            if raise_errors:
                self._wait(future)
            else:
                future.exception()

    def copy_from(self, reader: BinaryIO, length: int = -1) -> int:
        """Write the reader's next `length` bytes (< 0: to EOF); how many there were."""
        done = 0
        while length < 0 or done < length:
            want = COPY_BLOCK if length < 0 else min(COPY_BLOCK, length - done)
            data = reader.read(want)
            if not data:
                break
            self.write(data)
            done += len(data)
        return done

    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._state != OPEN

    def close(self) -> None:
        """Keep the session (checkpointed) for a later writer; no-op once ended."""
        if self._state != OPEN:
            return
        try:
            ckpt = self._checkpoint(release=True)
        finally:
            self._end("closed")
        if self._hasher is not None:
            _HASHERS.put(self.session_id, ckpt, self._size, self._hasher, bytes(self._buf))

    def cancel(self) -> None:
        """Discard the session and its bytes."""
        if self._state == "cancelled":
            return
        self._check_open("cancel")
        self._drain(raise_errors=False)
        try:
            doc = self._store.sessions.find_one_and_delete(
                {"_id": self.session_id, "owner": self._owner}
            )
            if doc is not None:
                self._store.storage.discard_session_chunks(self.file_id)
                _abandoned(self._store.managed, doc)
        finally:
            self._end("cancelled")
        if doc is None:
            raise SessionLostError(f"upload session {self.session_id} was taken over")

    def commit(self, expected_hash: str | None = None) -> PathInfo:
        """Point the path at what was written, in one step; the session ends.

        expected_hash: HashMismatchError if the content hashes otherwise, and the
        session is kept (this writer stays open).

        One majority write records the final length and the `committing` state
        (a writer that resumes after this one died mid-commit checks what became
        of the bytes); the durability of the chunks is checked where they are
        used: after the files document of new content (as every put does), by
        the majority read of small content; known content drops them.
        """
        self._check_open("commit")
        expected = parse_hash(expected_hash) if expected_hash else None
        self._check_base()
        store = self._store
        self._drain()
        if self._buf:
            self._write_tail()
        now = utcnow()
        # The path as this commit finds it: should this writer die, the commit is
        # finished only while the path is still so (sessions._after_dead_commit).
        found = self.base_now()
        claimed = store.sessions.find_one_and_update(
            {"_id": self.session_id, "owner": self._owner, "state": OPEN},
            {
                "$set": {
                    "size": self._size,
                    "ckpt": secrets.token_hex(8),
                    "state": COMMITTING,
                    "commit_rev": found,
                    "updated_at": now,
                    "lease_until": store._lease_end(now),
                }
            },
        )
        if claimed is None:
            self._end("lost")
            raise SessionLostError(f"upload session {self.session_id} was taken over")
        try:
            digest = self._digest()
            if expected is not None and digest != expected:
                raise HashMismatchError(f"content hashes to {digest}, not {expected}")
        except BaseException:
            store.sessions.update_one(
                {"_id": self.session_id, "owner": self._owner}, {"$set": {"state": OPEN}}
            )
            raise
        try:
            info = self._link(digest)
        except BaseException as exc:
            durable = self._after_failed_commit()
            if durable is not None and durable < self._size:
                raise NotDurableError(
                    f"upload session {self.session_id}: bytes after offset {durable} were lost "
                    f"(a failover?); resume from offset {durable}"
                ) from exc
            raise
        self._end("committed")
        # At w=1: if a failover loses this, the next opener finds a dead commit.
        store._fast.delete_one({"_id": self.session_id})
        return info

    # -- internals --------------------------------------------------------------
    def _write_tail(self) -> None:
        """Store the partial chunk being filled (fenced like every chunk write)."""
        try:
            self._write_chunks(self._n, [bytes(self._buf)], self._stored_tail)
        except SessionLostError:
            self._end("lost")
            raise
        self._stored_tail = bytes(self._buf)

    def _check_open(self, what: str) -> None:
        if self._state != OPEN:
            raise BadRequestError(f"cannot {what} upload session {self.session_id}: {self._state}")

    def _end(self, state: str) -> None:
        self._state = state
        self._drain(raise_errors=False)
        self._heartbeat.__exit__(None, None, None)

    def _checkpoint(self, *, release: bool) -> str:
        """Store the partial tail, record the length (majority), check the chunks are durable."""
        store = self._store
        self._drain()
        if self._buf:
            self._write_tail()
        ckpt = secrets.token_hex(8)
        now = utcnow()
        update: dict[str, Any] = {"size": self._size, "ckpt": ckpt, "updated_at": now}
        if release:
            update["owner"] = None
            update["tidy"] = True  # exactly `size` bytes are stored, nobody writes
        else:
            update["lease_until"] = store._lease_end(now)
        doc = store.sessions.find_one_and_update(
            {"_id": self.session_id, "owner": self._owner}, {"$set": update}
        )
        if doc is None:
            self._end("lost")
            raise SessionLostError(f"upload session {self.session_id} was taken over or removed")
        if not store.storage.session_chunks_durable(self.file_id, self._size, since=self._verified):
            durable = self._durable_length()
            store.sessions.update_one(
                {"_id": self.session_id}, {"$set": {"size": durable, "owner": None}}
            )
            self._end("lost")
            raise NotDurableError(
                f"upload session {self.session_id}: bytes after offset {durable} were lost "
                f"(a failover?); resume from offset {durable}"
            )
        self._verified = self._size
        return ckpt

    def _durable_length(self) -> int:
        """What a majority read finds, cut at the first missing or short chunk."""
        total = 0
        try:
            for data in self._store.storage.iter_session_chunks(self.file_id):
                total += len(data)
                if len(data) < self._chunk_size:
                    break
        except CatalogError:
            pass
        return min(total, self._size)

    def _digest(self) -> str:
        if self._hasher is not None:
            return str(self._hasher.hexdigest())
        # Written (partly) by another process: hash what is durable.
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        seen = 0
        for data in self._store.storage.iter_session_chunks(self.file_id):
            hasher.update(data)
            seen += len(data)
        if seen != self._size:
            raise CatalogError(
                f"upload session {self.session_id}: {seen} bytes stored, expected {self._size}"
            )
        self._hasher = hasher
        return str(hasher.hexdigest())

    def _link(self, digest: str) -> PathInfo:
        store = self._store
        managed = store.managed
        storage = store.storage
        size = self._size
        if size <= managed.inline_max:
            data = b"".join(storage.iter_session_chunks(self.file_id))
            if len(data) != size:
                raise CatalogError(
                    f"upload session {self.session_id}: {len(data)} bytes durable, expected {size}"
                )
            info = managed.put_path(
                self.env_uuid, self.path, io.BytesIO(data), size, check_hash=digest,
                options=self._options(),
            )  # fmt: skip
            storage.discard_session_chunks(self.file_id)
            return info
        file_id = self.file_id
        return managed.commit_stored(
            self.env_uuid,
            self.path,
            digest,
            size,
            store=lambda storage_path: storage.commit_session_file(
                file_id, storage_path, size, digest
            ),
            drop=lambda: storage.discard_session_chunks(file_id),
            options=self._options(),
        )

    def _options(self) -> WriteOptions:
        """An append commits only over the revision it began with (with the write)."""
        return WriteOptions(if_match=self.base_rev) if self.base_rev is not None else PLAIN

    def base_now(self) -> int | None:
        """The revision the path holds now (None if it is gone), for an append session:
        the session may go on only while that is still `base_rev`."""
        managed = self._store.managed
        doc = managed.paths.find_one(
            {"env": self.env_uuid, "path": self.path, "expires_at": {"$not": {"$lte": utcnow()}}},
            {"rev": 1},
        )
        return revision(doc.get("rev")) if doc is not None else None

    def _check_base(self) -> None:
        """PreconditionFailedError, before anything is changed, if the file an append began
        with has changed since: committing would bring its old bytes back over the new."""
        if self.base_rev is None:
            return
        now = self.base_now()
        if now != self.base_rev:
            what = "was deleted" if now is None else f"changed (revision {now})"
            raise PreconditionFailedError(
                f"{self.env_uuid}: {self.path!r} {what} since this append began "
                f"(revision {self.base_rev}): cancel and append again"
            )

    def _after_failed_commit(self) -> int | None:
        """Keep the session while its bytes are its own; the length it keeps, or None.

        Whole, it stays this writer's, to commit again. Cut short by a failover
        (the chunks since the last checkpoint rolled back), it keeps what a
        majority still has, released, to resume from there, as a failed
        checkpoint does: bytes a close() confirmed are never lost with a commit
        that failed. Only bytes that became a stored file meanwhile are no
        longer the session's: it is gone.
        """
        store = self._store
        storage = store.storage
        if storage.file_exists(self.file_id):
            store.sessions.delete_one({"_id": self.session_id})
            self._end("failed")
            return None
        if storage.session_chunks_durable(self.file_id, self._size):
            store.sessions.update_one(
                {"_id": self.session_id, "owner": self._owner}, {"$set": {"state": OPEN}}
            )
            return self._size
        durable = self._durable_length()
        store.sessions.update_one(
            {"_id": self.session_id, "owner": self._owner},
            {"$set": {"state": OPEN, "size": durable, "owner": None, "tidy": False}},
        )
        self._end("lost")
        return durable

    def __del__(self) -> None:
        if getattr(self, "_state", None) == OPEN:
            self._heartbeat.__exit__(None, None, None)


def _sid(session_id: object) -> str:
    if not isinstance(session_id, str) or not 1 <= len(session_id) <= 64:
        raise NotFoundError(f"no upload session {session_id!r}")
    return session_id


# -- gc's hooks -------------------------------------------------------------------
def reclaim_sessions(managed: ManagedStorage, max_age: float = DEFAULT_MAX_AGE) -> int:
    """Delete sessions untouched for `max_age` seconds (and no live writer); how many went.

    A session that was mid-commit when its process died keeps its bytes if they
    became a stored file (the catalog then owns them, or gc's orphan pass does).
    """
    if max_age < 0:
        raise BadRequestError(f"max_age must be >= 0 seconds, not {max_age}")
    storage = managed.resource_storage
    sessions = managed.db[COLLECTION].with_options(write_concern=WriteConcern("majority"))
    now = utcnow()
    cutoff = now - datetime.timedelta(seconds=max_age)
    # Untouched for max_age, and no live writer (closed, or its lease ran out).
    stale = {
        "updated_at": {"$lt": cutoff},
        "$or": [{"owner": None}, {"lease_until": {"$lte": now}}],
    }
    count = 0
    for doc in sessions.find(stale, {"_id": 1}):
        gone = sessions.find_one_and_delete({"_id": doc["_id"], **stale})
        if gone is None:
            continue  # resumed meanwhile
        storage.discard_session_chunks(gone["file_id"])
        _abandoned(managed, gone)
        count += 1
    return count


def _abandoned(managed: ManagedStorage, doc: dict[str, Any]) -> None:
    """A session that went without a commit is an abandoned upload of its path: its
    history says so (`upload`, `failed`), as it does of a PUT that broke off."""
    with contextlib.suppress(Exception):  # its going is what counts; the record is best effort
        managed.upload_abandoned(doc["env"], doc["path"])


def session_storage_paths(managed: ManagedStorage, file_ids: set[Any]) -> set[str]:
    """Storage paths of the sessions' bytes that became stored files (a commit under way)."""
    if not file_ids:
        return set()
    found = managed.resource_storage.session_files(list(file_ids))
    return {info.path for info in found}


def live_session_file_ids(managed: ManagedStorage) -> set[Any]:
    """The files_ids of every session's chunks: never orphans while the session exists."""
    sessions = managed.db[COLLECTION]
    return {doc["file_id"] for doc in sessions.find({}, {"file_id": 1})}


def _revision_now(managed: ManagedStorage, env_uuid: str, path: str) -> int | None:
    """The path's revision now, None when it is absent (or an expired TTL key)."""
    doc = managed.paths.find_one(
        {"env": env_uuid, "path": path, "expires_at": {"$not": {"$lte": utcnow()}}}, {"rev": 1}
    )
    return revision(doc.get("rev")) if doc is not None else None


def _roll_options(doc: dict[str, Any]) -> WriteOptions:
    """The condition a dead commit is finished on: the path as the commit found it."""
    if "commit_rev" in doc:
        if doc["commit_rev"] is None:
            return WriteOptions(if_none_match=True)
        return WriteOptions(if_match=int(doc["commit_rev"]))
    base = doc.get("base_rev")  # a session from before commit_rev was recorded
    return WriteOptions(if_match=int(base)) if base is not None else PLAIN


def _ended(env_uuid: str, session_id: str, ended: RolledForward) -> NotFoundError:
    """The error for a session whose writer died committing, as its opener sees it."""
    if ended.info is not None:
        return NotFoundError(
            f"{env_uuid}: upload session {session_id} was committed after its writer "
            f"died: {ended.info.path!r} holds it (revision {ended.info.revision})",
            path=ended.info.path,
        )
    return NotFoundError(
        f"{env_uuid}: upload session {session_id} ended in a commit that did not "
        "finish (or the path changed since); check the path and start over"
    )
