"""KVStore: the swarm store / libkv face of an environment.

A key is a path of the environment and its value that path's content, so every
value is also readable through `rescat get` and HTTP. `last_index` is the
path's revision (the cluster time of its last change): it grows on every change
and across the whole environment, with no counter document.

* Compare-and-swap is `put_path` / `delete_path` with a condition checked in
  the write's atomic step (`if_match` revision, `if_none_match`).
* Watches open a change stream at an operation time taken before their first
  read and drop what that read already reflects by revision (catalog.changes).
* TTL keys and locks are leased paths (catalog.leases): one renewal thread per
  store keeps them alive; when the store closes or its process dies they are
  gone from every read within ttl seconds, and `reclaim_expired` deletes them
  (releasing their content). Expiry is decided at read time.
* A lock is its key holding the lock's value with a lease owned by the
  acquisition; its fence is the revision of the acquiring write, so a later
  holder's fence is larger. `Lock.put` is a fenced write: the lock document is
  checked (and touched) in the same transaction as the write.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import io
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import blake3

from catalog import changehub
from catalog.changes import PathChanges
from catalog.clock import aware, utcnow
from catalog.errors import (
    AlreadyExistsError,
    CannotLockError,
    CatalogError,
    InvalidArgumentError,
    InvalidPathError,
    KeyModifiedError,
    NotFoundError,
    PreconditionFailedError,
)
from catalog.leases import Renewer
from catalog.lru import SizedLRU
from catalog.managed import ManagedStorage, WriteOptions
from catalog.names import check_env, check_path
from catalog.pathdocs import revision
from catalog.txnowners import owners_of

log = logging.getLogger("rescat.kv")

# A value is at most MAX_VALUE bytes, and each is kept inside its catalog entry
# (WriteOptions.inline_max), not only small ones: a watcher reads the bytes of a
# change from the change itself, and content kept in GridFS is deleted as soon
# as a later put replaces it, before a slow watcher has read it.
MAX_VALUE = 1024 * 1024
DEFAULT_LOCK_TTL = 15.0
MAX_TTL = 1e9  # seconds (~31 years), as etcd's longest lease
_FIELDS = {"path": 1, "rev": 1, "hash": 1, "resource_id": 1, "length": 1, "expires_at": 1}
# Bytes of new inline content a watcher keeps, to hand out values overwritten since.
_CACHE_BYTES = 32 * 1024 * 1024
# Bytes of content a store keeps by hash (content never changes: reads skip the catalog).
_STORE_CACHE_BYTES = 8 * 1024 * 1024
# A range watch over at most this many keys has the server filter their changes.
_FOCUS_MAX = 1000
# Keys delete_range removes in one transaction.
_DELETE_BATCH = 1000


@dataclass(frozen=True)
class KVPair:
    key: str
    value: bytes
    last_index: int


@dataclass(frozen=True)
class KeyInfo:
    """A key without its value: a key is a path, whose content may be any size.

    `hash` names the content, which never changes: `KVStore.open_value` reads
    exactly the value this key had at `last_index`.
    """

    key: str
    last_index: int
    hash: str
    length: int


# -- validation ------------------------------------------------------------------------
def clean_key(key: object) -> str:
    """A key as stored: leading and trailing `/` stripped; InvalidPathError if empty or bad."""
    if not isinstance(key, str):
        raise InvalidPathError(f"invalid key: {key!r}")
    stripped = key.strip("/")
    if not stripped:
        raise InvalidPathError(f"invalid key: {key!r} (empty)")
    return check_path(stripped)


def clean_prefix(prefix: object) -> str:
    """A range prefix without its slashes (`""`: every key); InvalidPathError if bad."""
    if not isinstance(prefix, str):
        raise InvalidPathError(f"invalid prefix: {prefix!r}")
    stripped = prefix.strip("/")
    return check_path(stripped) if stripped else ""


def _value(value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidArgumentError(f"a value must be bytes, not {type(value).__name__}")
    data = bytes(value)
    if len(data) > MAX_VALUE:
        raise InvalidArgumentError(f"a value is at most {MAX_VALUE} bytes, not {len(data)}")
    return data


def check_ttl(ttl: object) -> float | None:
    """None, or positive seconds up to MAX_TTL; InvalidArgumentError otherwise.

    Bounded because an expiry is a datetime (year 9999 at most) and the renewal
    thread waits ttl/3 (threading.TIMEOUT_MAX at most): past either, a put
    raised OverflowError, or killed the store's renewals of every key and lock.
    """
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise InvalidArgumentError(f"ttl must be a number of seconds, not {ttl!r}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise InvalidArgumentError(f"ttl must be positive seconds, not {ttl!r}")
    if ttl > MAX_TTL:
        raise InvalidArgumentError(f"ttl must be at most {MAX_TTL:.0f} seconds, not {ttl!r}")
    return float(ttl)


def _previous(key: str, previous: object) -> KVPair:
    if not isinstance(previous, KVPair):
        raise InvalidArgumentError(f"previous must be a KVPair, not {type(previous).__name__}")
    if not isinstance(previous.key, str) or previous.key.strip("/") != key:
        raise InvalidArgumentError(f"previous is a pair of {previous.key!r}, not of {key!r}")
    index = previous.last_index
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InvalidArgumentError(
            f"previous.last_index must be a revision (an int >= 0), not {index!r}"
        )
    return previous


def _under(prefix: str) -> dict[str, Any]:
    """Paths at or under `prefix` on segment boundaries ("p" and "p/...", never "pq")."""
    if not prefix:
        return {}
    return {"$or": [{"path": prefix}, {"path": {"$regex": "^" + re.escape(prefix + "/")}}]}


def _in_range(prefix: str, path: str) -> bool:
    return not prefix or path == prefix or path.startswith(prefix + "/")


def _live() -> dict[str, Any]:
    return {"expires_at": {"$not": {"$lte": utcnow()}}}


def _expired(expires_at: Any) -> bool:
    return expires_at is not None and aware(expires_at) <= utcnow()


def _key_info(doc: dict[str, Any]) -> KeyInfo:
    return KeyInfo(doc["path"], revision(doc["rev"]), doc["hash"], int(doc["length"]))


# -- content ---------------------------------------------------------------------------
def _contents(managed: ManagedStorage, hashes: set[str]) -> dict[str, bytes]:
    """The bytes of each stored hash (hashes no longer stored are left out)."""
    found: dict[str, bytes] = {}
    if not hashes:
        return found
    docs = managed.catalog.collection.find(
        {"hash": {"$in": sorted(hashes)}, "state": "ready"}, {"hash": 1, "path": 1, "data": 1}
    )
    for doc in docs:
        if doc.get("data") is not None:
            found[doc["hash"]] = bytes(doc["data"])
            continue
        try:
            reader = managed.resource_storage.get(doc["path"])
        except NotFoundError:
            continue
        try:
            found[doc["hash"]] = reader.read()
        finally:
            reader.close()
    return found


def _open_content(managed: ManagedStorage, digest: str) -> BinaryIO:
    """A stream of the stored content with this hash; NotFoundError once it is deleted."""
    doc = managed.catalog.collection.find_one(
        {"hash": digest, "state": "ready"}, {"path": 1, "data": 1}
    )
    if doc is None:
        raise NotFoundError(f"no stored content {digest}")
    if doc.get("data") is not None:
        return io.BytesIO(bytes(doc["data"]))
    return managed.resource_storage.get(doc["path"])  # type: ignore[no-any-return]


class ContentCache:
    """Bytes by content hash (content never changes); misses are read from the store."""

    def __init__(self, managed: ManagedStorage, limit: int) -> None:
        self._managed = managed
        self._items: SizedLRU[str, bytes] = SizedLRU(limit, len)

    def get_many(self, hashes: set[str]) -> dict[str, bytes]:
        """The bytes of each hash still known here or stored (the others are left out)."""
        found: dict[str, bytes] = {}
        for digest in hashes:
            data = self._items.get(digest)
            if data is not None:
                found[digest] = data
        missing = hashes - found.keys()
        if missing:
            fetched = _contents(self._managed, missing)
            for digest, data in fetched.items():
                if blake3.blake3(data).hexdigest() == digest:  # damaged bytes are not kept
                    self.add(digest, data)
            found.update(fetched)
        return found

    def get(self, digest: str) -> bytes | None:
        return self.get_many({digest}).get(digest)

    def add(self, digest: str, data: bytes) -> None:
        self._items.add(digest, data)


class KVStore:
    """libkv's Store over one environment of a ManagedStorage."""

    def __init__(self, managed: ManagedStorage, env_uuid: str) -> None:
        self.managed = managed
        self.env_uuid = check_env(env_uuid)
        self.owner = f"kv:{uuid.uuid4().hex}"
        self._renewer = Renewer(managed, self.env_uuid)
        self._sessions: dict[str, Lock] = {}
        self._locks: set[Lock] = set()
        self._mutex = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(64)]
        self._contents = ContentCache(managed, _STORE_CACHE_BYTES)
        self._closed = False

    # -- reads -------------------------------------------------------------------------
    def get(self, key: str) -> KVPair:
        k = clean_key(key)
        for _ in range(5):
            doc = self.managed.paths.find_one({"env": self.env_uuid, "path": k, **_live()}, _FIELDS)
            if doc is None:
                raise NotFoundError(f"{self.env_uuid}: no such key {k!r}", path=k)
            data = self._contents.get(doc["hash"])
            if data is not None:
                return KVPair(k, data, revision(doc["rev"]))
            # repointed and its old content deleted between the two reads: read again
        raise NotFoundError(f"{self.env_uuid}: key {k!r} keeps changing", path=k)

    def exists(self, key: str) -> bool:
        k = clean_key(key)
        query = {"env": self.env_uuid, "path": k, **_live()}
        return self.managed.paths.find_one(query, {"_id": 1}) is not None

    def get_range(self, prefix: str) -> list[KVPair]:
        p = clean_prefix(prefix)
        pairs = self._range(p)[0]
        if not pairs:
            raise NotFoundError(f"{self.env_uuid}: no key under {p!r}", path=p)
        return pairs

    def list_pairs(self, prefix: str = "") -> list[KVPair]:
        """get_range, but [] when nothing matches."""
        return self._range(clean_prefix(prefix))[0]

    def keys(self, prefix: str = "") -> Iterator[KeyInfo]:
        """The live keys at or under prefix in key order, reading no value.

        A cursor, not a list: listing keys costs the same whatever their values
        weigh (a key may be a path of hundreds of MiB). Read a value with
        `open_value`, one at a time.
        """
        query = {"env": self.env_uuid, **_live(), **_under(clean_prefix(prefix))}
        for doc in self.managed.paths.find(query, _FIELDS, sort=[("path", 1)]):
            yield _key_info(doc)

    def key_info(self, key: str) -> KeyInfo:
        """`get` without the value; NotFoundError as `get`."""
        k = clean_key(key)
        doc = self.managed.paths.find_one({"env": self.env_uuid, "path": k, **_live()}, _FIELDS)
        if doc is None:
            raise NotFoundError(f"{self.env_uuid}: no such key {k!r}", path=k)
        return _key_info(doc)

    def open_value(self, info: KeyInfo) -> BinaryIO:
        """A stream of the value `info` describes (its content, by hash: it never changes).

        NotFoundError when that content was deleted since (the key was changed
        or removed, and nothing else held it): read the key again.
        """
        try:
            return _open_content(self.managed, info.hash)
        except NotFoundError:
            raise NotFoundError(
                f"{self.env_uuid}: key {info.key!r} changed since revision {info.last_index}",
                path=info.key,
            ) from None

    def _range(self, prefix: str) -> tuple[list[KVPair], list[dict[str, Any]]]:
        """The live pairs at or under prefix in key order, and their documents."""
        query = {"env": self.env_uuid, **_live(), **_under(prefix)}
        for _ in range(5):
            docs = list(self.managed.paths.find(query, _FIELDS, sort=[("path", 1)]))
            data = self._contents.get_many({d["hash"] for d in docs})
            if all(d["hash"] in data for d in docs):
                pairs = [KVPair(d["path"], data[d["hash"]], revision(d["rev"])) for d in docs]
                return pairs, docs
        raise CatalogError(f"{self.env_uuid}: keys under {prefix!r} keep changing")

    # -- writes ------------------------------------------------------------------------
    def put(self, key: str, value: bytes, *, ttl: float | None = None) -> KVPair:
        k, v, t = clean_key(key), _value(value), check_ttl(ttl)
        return self._put(k, v, t, WriteOptions())

    def atomic_put(
        self, key: str, value: bytes, previous: KVPair | None, *, ttl: float | None = None
    ) -> KVPair:
        k, v, t = clean_key(key), _value(value), check_ttl(ttl)
        prev = _previous(k, previous) if previous is not None else None
        with self._stripe(k):
            return self._atomic_put(k, v, t, prev)

    def _atomic_put(self, k: str, v: bytes, t: float | None, prev: KVPair | None) -> KVPair:
        current = self._revision(k)
        if prev is None:
            if current is not None:
                raise AlreadyExistsError(f"{self.env_uuid}: key {k!r} exists")
            try:
                return self._put(k, v, t, WriteOptions(if_none_match=True))
            except PreconditionFailedError:
                raise AlreadyExistsError(f"{self.env_uuid}: key {k!r} exists") from None
        if current != prev.last_index:
            raise KeyModifiedError(
                f"{self.env_uuid}: key {k!r} changed since revision {prev.last_index}"
            )
        try:
            return self._put(k, v, t, WriteOptions(if_match=int(prev.last_index)))
        except PreconditionFailedError:
            raise KeyModifiedError(
                f"{self.env_uuid}: key {k!r} changed since revision {prev.last_index}"
            ) from None

    def _stripe(self, key: str) -> threading.Lock:
        """Conditional writes of one key from one store take turns.

        Only an optimisation: the database decides every condition. Threads of
        one process racing on a key would otherwise each take a content
        reference for a conditional write that mostly loses; in turn, the
        losers fail on the cheap revision read below.
        """
        return self._stripes[hash(key) % len(self._stripes)]

    def _revision(self, key: str) -> int | None:
        """The key's revision now (None if absent): a cheap early answer to a CAS.

        Revisions of a key only grow, so a CAS whose expected revision differs
        from a revision read now can never succeed later: it fails without
        writing. The conditional write itself stays the authority.
        """
        query = {"env": self.env_uuid, "path": key, **_live()}
        doc = self.managed.paths.find_one(query, {"rev": 1})
        return revision(doc["rev"]) if doc is not None else None

    def _put(self, key: str, value: bytes, ttl: float | None, options: WriteOptions) -> KVPair:
        # Every value inside its catalog entry, so that its change carries it (MAX_VALUE).
        options = dataclasses.replace(options, inline_max=MAX_VALUE)
        if ttl is not None:
            self._check_open()
            expires_at = utcnow() + datetime.timedelta(seconds=ttl)
            options = dataclasses.replace(options, expires_at=expires_at, owner=self.owner)
        info = self.managed.put_path(
            self.env_uuid, key, io.BytesIO(value), len(value), options=options
        )
        self._contents.add(info.hash, value)
        if ttl is not None:
            # RuntimeError: the store closed during the write, which stands; the key
            # lives out its first lease, as every TTL key of a closed store does.
            with contextlib.suppress(RuntimeError):
                self._renewer.add(key, self.owner, ttl, info.revision)
        else:
            self._renewer.remove(key, self.owner)
        return KVPair(key, value, info.revision)

    def delete(self, key: str) -> None:
        k = clean_key(key)
        try:
            self.managed.delete_path(self.env_uuid, k)
        except NotFoundError:  # said as the store's own reads say it
            raise NotFoundError(f"{self.env_uuid}: no such key {k!r}", path=k) from None
        self._renewer.remove(k, self.owner)

    def atomic_delete(self, key: str, previous: KVPair) -> None:
        k = clean_key(key)
        prev = _previous(k, previous)
        with self._stripe(k):
            self._atomic_delete(k, prev)
        self._renewer.remove(k, self.owner)

    def _atomic_delete(self, k: str, prev: KVPair) -> None:
        current = self._revision(k)
        if current is None:
            raise NotFoundError(f"{self.env_uuid}: no such key {k!r}", path=k)
        if current != prev.last_index:
            raise KeyModifiedError(
                f"{self.env_uuid}: key {k!r} changed since revision {prev.last_index}"
            )
        try:
            self.managed.delete_path(self.env_uuid, k, if_match=int(prev.last_index))
        except PreconditionFailedError:
            raise KeyModifiedError(
                f"{self.env_uuid}: key {k!r} changed since revision {prev.last_index}"
            ) from None

    def delete_range(self, prefix: str) -> None:
        """Delete every key at or under prefix in one transaction (DeleteTree).

        One step, as the seed's recursive delete: watchers and readers see the
        whole tree or none of it, and a crash leaves no half-deleted tree.
        Only a tree of more than _DELETE_BATCH keys goes in several steps (a
        transaction must stay well within MongoDB's size and time limits).
        """
        p = clean_prefix(prefix)
        query = {"env": self.env_uuid, **_live(), **_under(p)}
        paths = [d["path"] for d in self.managed.paths.find(query, {"path": 1}, sort=[("path", 1)])]
        for start in range(0, len(paths), _DELETE_BATCH):
            # Keys deleted meanwhile (or expired: gc reclaims those) are skipped.
            for path in self.managed.delete_paths(
                self.env_uuid, paths[start : start + _DELETE_BATCH]
            ):
                self._renewer.remove(path, self.owner)

    # -- watches -----------------------------------------------------------------------
    def watch(self, key: str, *, stop: threading.Event | None = None) -> Iterator[KVPair | None]:
        """The current pair (None if absent), then each later change once, in order."""
        return KeyWatch(self, clean_key(key), stop)

    def watch_range(
        self, prefix: str, *, stop: threading.Event | None = None
    ) -> Iterator[list[KVPair]]:
        """The current pairs under prefix, then the whole list again after each change."""
        return RangeWatch(self, clean_prefix(prefix), stop)

    # -- locks -------------------------------------------------------------------------
    def lock(self, key: str, value: bytes = b"", *, ttl: float = DEFAULT_LOCK_TTL) -> Lock:
        t = check_ttl(ttl)
        if t is None:  # a lock always expires: its holder may die
            raise InvalidArgumentError("a lock needs a ttl (seconds > 0), not None")
        return Lock(self, clean_key(key), _value(value), t)

    def acquire(self, key: str, value: bytes = b"") -> str:
        """The seed's non-blocking lock: a session id, or CannotLockError if it is held."""
        lock = self.lock(key, value)
        if not lock.acquire(blocking=False):
            raise CannotLockError(f"{self.env_uuid}: {lock.key!r} is locked")
        session = lock.session
        with self._mutex:
            self._sessions[session] = lock
        return session

    def release(self, session_id: str) -> None:
        with self._mutex:
            lock = self._sessions.pop(session_id, None) if isinstance(session_id, str) else None
        if lock is None:
            raise CannotLockError(f"no lock session {session_id!r} is held by this store")
        lock.release()

    # -- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        """Release this store's locks (setting `lost`) and stop renewing its TTL keys.

        A TTL key then lives out its last lease: it is gone from every read at
        most its ttl later (so `rescat kv put --ttl S` leaves a key for S seconds).
        """
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            locks = list(self._locks)
            self._sessions.clear()
        for lock in locks:
            lock._abandon()
        self._renewer.close()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgumentError("this KVStore is closed")

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KVStore({self.env_uuid!r})"


# -- watches -------------------------------------------------------------------------------
class _Watch:
    """Common to key and range watches: the stream, stop, and closing."""

    # Whether the stream carries new inline content: a key watch shows the value each
    # change wrote, even once overwritten; a range watch rereads the range instead.
    CONTENT = True

    def __init__(self, store: KVStore, stop: threading.Event | None) -> None:
        self._store = store
        self._stop = stop
        # Started now, before the first read; opened once the read says what to follow.
        self._changes: PathChanges | None = PathChanges(
            store.managed, store.env_uuid, defer=True, content=self.CONTENT
        )

    def _stopped(self) -> bool:
        ended = self._changes is not None and self._changes.ended
        if ended or (self._stop is not None and self._stop.is_set()):
            self.close()
        return self._changes is None

    def _next_event(self) -> dict[str, Any] | None:
        assert self._changes is not None
        return self._changes.next()

    def close(self) -> None:
        if self._changes is not None:
            self._changes.close()
            self._changes = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class KeyWatch(_Watch):
    """Iterator of one key's states: the current one, then one per change, gap-free.

    The stream is opened before the first read; a change whose revision is not
    above the one read is already in it and dropped. A TTL key that expires
    yields None (a deletion) once the stream is caught up.
    """

    def __init__(self, store: KVStore, key: str, stop: threading.Event | None) -> None:
        super().__init__(store, stop)
        self.key = key
        self._cache = ContentCache(store.managed, _CACHE_BYTES)
        self._queue: collections.deque[KVPair | None] = collections.deque()
        try:
            self._read()
            self._focus()
        except BaseException:
            self.close()
            raise

    def _focus(self) -> None:
        if self._changes is not None:
            self._changes.focus([self._doc_id] if self._doc_id is not None else [])

    def _read(self) -> None:
        store, managed = self._store, self._store.managed
        query = {"env": store.env_uuid, "path": self.key}
        for _ in range(5):
            doc = managed.paths.find_one(query, _FIELDS)
            gone = managed.history.find_one(query, {"last_rev": 1})
            self._rev = max(
                revision(doc["rev"]) if doc else 0, int((gone or {}).get("last_rev", 0))
            )
            self._doc: dict[str, Any] | None = dict(doc) if doc is not None else None
            self._doc_id = doc["_id"] if doc is not None else None
            if doc is None or _expired(doc.get("expires_at")):
                self._shown: KVPair | None = None
                self._queue.append(None)
                return
            value = self._content(doc["hash"])
            if value is not None:
                self._shown = KVPair(self.key, value, revision(doc["rev"]))
                self._queue.append(self._shown)
                return
        raise CatalogError(f"{store.env_uuid}: key {self.key!r} keeps changing")

    def _content(self, digest: str) -> bytes | None:
        return self._cache.get(digest)

    def __iter__(self) -> KeyWatch:
        return self

    def __next__(self) -> KVPair | None:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._stopped():
                raise StopIteration
            event = self._next_event()
            if event is not None:
                self._apply(event)
            if self._shown is None or self._doc is None:
                continue
            if not _expired(self._doc.get("expires_at")):
                continue
            # Caught up, the copy is current; while events flow (a busy database
            # need never go quiet) it may lag a renewal, so the database decides.
            if event is None or self._lapsed():
                self._show(None)

    def _apply(self, event: dict[str, Any]) -> None:
        op = event.get("operationType")
        doc_id = (event.get("documentKey") or {}).get("_id")
        full = event.get("fullDocument") or {}
        if event.get("ns", {}).get("coll") != self._store.managed.paths.name:
            if full.get("data") is not None:  # new inline content: keep its bytes a while
                self._cache.add(full["hash"], bytes(full["data"]))
            return
        carried = event.get(changehub.CONTENT)  # the shared stream hands content on this way
        if carried is not None:
            changed = full or (event.get("updateDescription") or {}).get("updatedFields") or {}
            self._cache.add(str(changed["hash"]), bytes(carried))
        if op in ("insert", "replace"):
            if full.get("path") != self.key or full.get("env") != self._store.env_uuid:
                return
            rev = revision(full["rev"])
            if rev <= self._rev:
                # The first read reflects it already; or a put re-created the key
                # while its delete committed, at a revision taken before it waited:
                # its writer raises it (pathdocs.settle_created), and that update
                # (or a later write's) is the change shown.
                if op == "insert" and doc_id != self._doc_id:
                    self._doc_id, self._doc = doc_id, dict(full)
                    self._focus()
                return
            self._rev, self._doc_id, self._doc = rev, doc_id, dict(full)
            self._focus()
            self._show_doc()
        elif op == "update":
            if doc_id is None or doc_id != self._doc_id or self._doc is None:
                return
            desc = event.get("updateDescription") or {}
            updated = desc.get("updatedFields") or {}
            if "rev" in updated and revision(updated["rev"]) <= self._rev:
                return
            for name in desc.get("removedFields") or []:
                self._doc.pop(name, None)
            self._doc.update(updated)
            if "rev" in updated:
                self._rev = revision(updated["rev"])
                self._show_doc()
        elif op == "delete":
            if doc_id is None or doc_id != self._doc_id:
                return
            self._doc = self._doc_id = None
            # The deletion's own revision: a put re-creating the key as it committed
            # can have a smaller one, and is shown once raised above it.
            gone = self._store.managed.history.find_one(
                {"env": self._store.env_uuid, "path": self.key}, {"last_rev": 1}
            )
            self._rev = max(self._rev, int((gone or {}).get("last_rev") or 0))
            self._focus()
            self._show(None)

    def _lapsed(self) -> bool:
        """Whether the key, at the revision shown, has expired in the database now.

        Otherwise the copy's expiry is brought up to the database's (a renewal
        the stream has not delivered yet); a newer revision or a deletion
        comes as its own event.
        """
        assert self._doc is not None
        doc = self._store.managed.paths.find_one({"_id": self._doc_id}, {"rev": 1, "expires_at": 1})
        if doc is None or revision(doc["rev"]) != revision(self._doc["rev"]):
            return False
        if _expired(doc.get("expires_at")):
            return True
        if doc.get("expires_at") is None:
            self._doc.pop("expires_at", None)
        else:
            self._doc["expires_at"] = doc["expires_at"]
        return False

    def _show_doc(self) -> None:
        doc = self._doc
        assert doc is not None
        if _expired(doc.get("expires_at")):
            self._show(None)
            return
        value = self._content(doc["hash"])
        if value is None:
            log.warning(
                "%s: the value of %r at revision %s was deleted before this watch read it",
                self._store.env_uuid,
                self.key,
                doc["rev"],
            )
            return
        self._show(KVPair(self.key, value, revision(doc["rev"])))

    def _show(self, pair: KVPair | None) -> None:
        if pair is None and self._shown is None:
            return  # already absent (an expired key deleted by gc, say)
        self._shown = pair
        self._queue.append(pair)


class RangeWatch(_Watch):
    """Iterator of the list of pairs under a prefix: now, then after each change."""

    CONTENT = False

    def __init__(self, store: KVStore, prefix: str, stop: threading.Event | None) -> None:
        super().__init__(store, stop)
        self.prefix = prefix
        self._shown: list[tuple[str, int]] | None = None
        self._pending: list[KVPair] | None = None
        try:
            self._reread()
        except BaseException:
            self.close()
            raise

    def _reread(self) -> None:
        pairs, docs = self._store._range(self.prefix)
        # Expired keys not yet reclaimed are followed too: a put over one (a new
        # lock holder after a dead one) updates that document, it inserts none.
        store = self._store
        expired = {"env": store.env_uuid, "expires_at": {"$lte": utcnow()}, **_under(self.prefix)}
        self._ids = {d["_id"] for d in docs}
        self._ids.update(d["_id"] for d in store.managed.paths.find(expired, {"_id": 1}))
        if self._changes is not None:
            self._changes.focus(sorted(self._ids) if len(self._ids) <= _FOCUS_MAX else None)
        expiries = [aware(d["expires_at"]) for d in docs if d.get("expires_at") is not None]
        self._next_expiry = min(expiries, default=None)
        shown = [(p.key, p.last_index) for p in pairs]
        if shown != self._shown:
            self._shown = shown
            self._pending = pairs

    def __iter__(self) -> RangeWatch:
        return self

    def __next__(self) -> list[KVPair]:
        while True:
            if self._pending is not None:
                pairs, self._pending = self._pending, None
                return pairs
            if self._stopped():
                raise StopIteration
            event = self._next_event()
            if event is not None and self._relevant(event):
                self._reread()
            elif self._next_expiry is not None and self._next_expiry <= utcnow():
                # Not only once the stream is quiet: a busy database need never be.
                # The reread is the database's answer, so a lagging stream is harmless.
                self._reread()

    def _relevant(self, event: dict[str, Any]) -> bool:
        if event.get("ns", {}).get("coll") != self._store.managed.paths.name:
            return False
        op = event.get("operationType")
        if op in ("insert", "replace"):
            full = event.get("fullDocument") or {}
            return full.get("env") == self._store.env_uuid and _in_range(
                self.prefix, str(full.get("path", ""))
            )
        doc_id = (event.get("documentKey") or {}).get("_id")
        if doc_id not in self._ids:
            return False
        if op == "update":
            updated = (event.get("updateDescription") or {}).get("updatedFields") or {}
            return "rev" in updated or "expires_at" in updated
        return True


# -- locks ---------------------------------------------------------------------------------
class Lock:
    """A lock on a key: blocking acquire, renewal every ttl/3, a fence per acquisition.

    While held, the key holds the lock's value with a lease owned by this
    acquisition. `fence` is the revision of the acquiring write, larger than
    every earlier revision of the key, so larger than every earlier fence.
    """

    def __init__(self, store: KVStore, key: str, value: bytes, ttl: float) -> None:
        self._store = store
        self.key = key
        self.value = value
        self.ttl = ttl
        self.lost = threading.Event()
        self.fence = 0
        self.session = ""
        self._mutex = threading.Lock()

    @property
    def held(self) -> bool:
        return bool(self.session) and not self.lost.is_set()

    def acquire(
        self,
        *,
        blocking: bool = True,
        timeout: float = -1,
        stop: threading.Event | None = None,
    ) -> bool:
        """Take the lock; False when `timeout` passes, `stop` is set or the store closes first."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout != timeout:
            raise InvalidArgumentError(f"timeout must be seconds, not {timeout!r}")
        deadline = None if timeout < 0 else time.monotonic() + timeout
        if blocking and getattr(self._store.managed, "_transactions", False):
            # A holder killed inside a fenced write leaves its transaction holding the
            # lock's document (our write would wait on it inside the server): have
            # such transactions aborted while we wait.
            owners_of(self._store.managed.db).watch()
        changes: PathChanges | None = None
        try:
            while True:
                if changes is not None and self._store._closed:
                    return False  # closed while waiting: the wait ends, as with stop
                if self._try():
                    return True
                if not blocking or _over(deadline, stop):
                    return False
                if changes is None or changes.ended:
                    # Opened before the next attempt: a release right after it is seen.
                    changes = PathChanges(self._store.managed, self._store.env_uuid, content=False)
                    continue
                self._wait(changes, deadline, stop)
        finally:
            if changes is not None:
                changes.close()

    def _try(self) -> bool:
        store = self._store
        store._check_open()
        session = f"lock:{uuid.uuid4().hex}"
        options = WriteOptions(
            if_none_match=True,
            expires_at=utcnow() + datetime.timedelta(seconds=self.ttl),
            owner=session,
            inline_max=MAX_VALUE,
        )
        try:
            info = store.managed.put_path(
                store.env_uuid, self.key, io.BytesIO(self.value), len(self.value), options=options
            )
        except PreconditionFailedError:
            return False
        if options.expires_at is not None and utcnow() >= options.expires_at:
            # The write waited (on a dead holder's transaction, say) past the lease it
            # carried: anyone may take the lock as absent now. Ours only if a renewal
            # still finds our acquisition there; else it was never held.
            renewed = store.managed.paths.update_one(
                {"env": store.env_uuid, "path": self.key, "owner": session},
                {"$set": {"expires_at": utcnow() + datetime.timedelta(seconds=self.ttl)}},
            )
            if renewed.matched_count != 1:
                return False
        with self._mutex:
            if self.session:  # we held it before and lost it: forget that acquisition
                store._renewer.remove(self.key, self.session)
            self.session, self.fence = session, info.revision
            self.lost.clear()
        with store._mutex:
            closed = store._closed
            if not closed:
                store._locks.add(self)
        try:
            if closed:
                raise RuntimeError("renewer closed")
            store._renewer.add(self.key, session, self.ttl, info.revision, on_lost=self._on_lost)
        except RuntimeError:
            # The store closed while this write took the lock: close() missed it
            # (or released it already), and nothing would renew it. Give it back
            # now rather than leave it held by nobody for its whole ttl.
            self._abandon()
            store._check_open()
            raise
        return True

    def _wait(
        self, changes: PathChanges, deadline: float | None, stop: threading.Event | None
    ) -> None:
        """Until the holder's lease ends (release, expiry, any rewrite), timeout or stop."""
        managed = self._store.managed
        query = {"env": self._store.env_uuid, "path": self.key}
        doc = managed.paths.find_one(query, {"_id": 1, "expires_at": 1})
        if doc is None:
            return
        changes.focus([doc["_id"]])
        expires_at = doc.get("expires_at")
        while not _over(deadline, stop):
            if _expired(expires_at) or changes.ended or self._store._closed:
                return  # (closed: the next attempt raises, a waiter is not left hanging)
            event = changes.next()
            if event is None or (event.get("documentKey") or {}).get("_id") != doc["_id"]:
                continue
            if event.get("operationType") != "update":
                return  # deleted (released) or replaced
            desc = event.get("updateDescription") or {}
            updated = desc.get("updatedFields") or {}
            if "rev" in updated:
                return  # rewritten: try again
            if "expires_at" in updated:
                expires_at = updated["expires_at"]
            if "expires_at" in (desc.get("removedFields") or []):
                expires_at = None

    def release(self) -> None:
        """Give the lock up; CannotLockError if it is not held (or was lost meanwhile)."""
        with self._mutex:
            session, fence = self.session, self.fence
            if not session:
                raise CannotLockError(f"lock {self.key!r} is not held")
            self.session = ""
        store = self._store
        store._renewer.remove(self.key, session)
        with store._mutex:
            store._locks.discard(self)
        try:
            store.managed.delete_path(store.env_uuid, self.key, if_match=fence)
        except (NotFoundError, PreconditionFailedError):
            self.lost.set()
            raise CannotLockError(f"lock {self.key!r} was lost before its release") from None

    def put(self, key: str, value: bytes) -> KVPair:
        """Write key only while this lock is held: CannotLockError once it is lost."""
        store = self._store
        k, v = clean_key(key), _value(value)
        if k == self.key:
            raise InvalidArgumentError("a fenced write cannot overwrite its own lock key")
        session, fence = self.session, self.fence
        if not session or self.lost.is_set():
            raise CannotLockError(f"lock {self.key!r} is not held")
        held = {"env": store.env_uuid, "path": self.key, "owner": session, "rev": fence}

        def guard(txn: Any) -> None:
            query = {**held, "expires_at": {"$gt": utcnow()}}
            # Touching the lock document makes a takeover and this write conflict.
            touched = store.managed.paths.find_one_and_update(
                query, {"$inc": {"fenced_writes": 1}}, projection={"_id": 1}, session=txn
            )
            if touched is None:
                raise CannotLockError(f"lock {self.key!r} was lost (fence {fence})")

        try:
            info = store.managed.put_guarded(
                store.env_uuid, k, v, guard, WriteOptions(inline_max=MAX_VALUE)
            )
        except CannotLockError:
            self._on_lost()
            raise
        return KVPair(k, v, info.revision)

    def _on_lost(self) -> None:
        self.lost.set()
        with self._store._mutex:
            self._store._locks.discard(self)

    def _abandon(self) -> None:
        """The store closes: release if still held, and set `lost` either way."""
        try:
            if self.session:
                self.release()
        except CatalogError:
            pass
        finally:
            self.lost.set()

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lock({self.key!r}, fence={self.fence}, held={self.held})"


def _over(deadline: float | None, stop: threading.Event | None) -> bool:
    if stop is not None and stop.is_set():
        return True
    return deadline is not None and time.monotonic() >= deadline


# -- gc ------------------------------------------------------------------------------------
def reclaim_expired(managed: ManagedStorage) -> int:
    """Delete every expired TTL key (releasing its content reference); how many went."""
    count = 0
    query = {"expires_at": {"$lte": utcnow()}}
    for doc in list(managed.paths.find(query, {"env": 1, "path": 1, "rev": 1})):
        if managed.delete_expired(doc["env"], doc["path"], revision(doc["rev"])):
            count += 1
    return count


__all__ = [
    "DEFAULT_LOCK_TTL",
    "MAX_TTL",
    "MAX_VALUE",
    "KVPair",
    "KVStore",
    "Lock",
    "check_ttl",
    "clean_key",
    "clean_prefix",
    "reclaim_expired",
]
