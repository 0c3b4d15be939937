"""ResourceCatalog: one reference-counted entry per distinct content.

Each entry is keyed by its BLAKE3 hash (unique index) and changed only by
single-document atomic updates, so N concurrent `put`s of one new hash give one
entry with refcount N and no read-then-write race exists. An entry is
`pending` (path "") until an uploader records where the bytes are; a pending
entry carries a lease that its uploader renews, so an upload whose uploader
died is known to be abandoned once the lease runs out. Every transition is
appended to a short, bounded history that `stat` shows.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bson import Binary, ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING, ReturnDocument, UpdateOne, WriteConcern
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from catalog.clock import aware, utcnow
from catalog.errors import (
    AlreadyExistsError,
    BadRequestError,
    CatalogError,
    LengthMismatchError,
    NotFoundError,
    UploadPendingError,
)
from catalog.groupcommit import GroupCommit, insert_new
from catalog.lru import SizedLRU
from catalog.names import parse_hash

PENDING = "pending"
READY = "ready"
HISTORY_LIMIT = 16
DEFAULT_LEASE = 60.0
# The `path` of an entry whose bytes live in the entry itself (field `data`).
INLINE = "inline:"


@dataclass(frozen=True)
class Resource:
    """A catalog entry. `path` is where the resource storage holds the bytes."""

    id: str
    hash: str
    path: str
    length: int
    refcount: int
    state: str = READY
    created_at: datetime.datetime | None = None
    updated_at: datetime.datetime | None = None
    lease_until: datetime.datetime | None = None
    history: tuple[tuple[str, datetime.datetime], ...] = field(default=())
    data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def pending(self) -> bool:
        return self.state != READY

    @property
    def inline(self) -> bool:
        """The bytes are in the entry itself (small content), not in the resource storage."""
        return self.path == INLINE

    def lease_expired(self, now: datetime.datetime | None = None) -> bool:
        if self.lease_until is None:
            return True
        return self.lease_until <= (now or utcnow())


def _history_push(state: str, at: datetime.datetime) -> dict[str, Any]:
    return {"history": {"$each": [{"state": state, "at": at}], "$slice": -HISTORY_LIMIT}}


@dataclass(frozen=True)
class _RefAsk:
    """One _take_ref waiting to be batched (see ResourceCatalog.take_refs)."""

    digest: str
    length: int
    now: datetime.datetime
    on_insert: dict[str, Any]


def to_resource(doc: dict[str, Any]) -> Resource:
    def when(key: str) -> datetime.datetime | None:
        value = doc.get(key)
        return aware(value) if value is not None else None

    return Resource(
        id=str(doc["_id"]),
        hash=doc["hash"],
        path=doc.get("path", ""),
        length=int(doc["length"]),
        refcount=int(doc.get("refcount", 0)),
        state=doc.get("state", READY if doc.get("path") else PENDING),
        created_at=when("created_at"),
        updated_at=when("updated_at"),
        lease_until=when("lease_until"),
        history=tuple((h["state"], aware(h["at"])) for h in doc.get("history", [])),
        data=bytes(doc["data"]) if doc.get("data") is not None else None,
    )


def object_id(resource_id: object) -> ObjectId:
    """The ObjectId behind a resource id; NotFoundError when it cannot be one."""
    if isinstance(resource_id, ObjectId):
        return resource_id
    try:
        return ObjectId(str(resource_id))
    except (InvalidId, TypeError) as exc:
        raise NotFoundError(f"no resource with id {resource_id!r}") from exc


class ResourceCatalog:
    """Hash-keyed, reference-counted entries in the `catalog` collection."""

    def __init__(
        self, db: Database[Any], *, collection: str = "catalog", lease: float = DEFAULT_LEASE
    ) -> None:
        self.collection = db[collection].with_options(write_concern=WriteConcern("majority"))
        self._fast = self.collection.with_options(write_concern=WriteConcern(w=1))
        self.lease = lease
        self.collection.create_index([("hash", ASCENDING)], unique=True)
        self.collection.create_index([("path", ASCENDING)])
        # References to small content taken by many threads at once go in one
        # command (not in mongomock, whose bulk writes lag pymongo's).
        self.ref_batches: GroupCommit[_RefAsk, dict[str, Any] | None] | None = None
        # New small content, many threads' entries in one insert (see acquire_inline).
        self.new_batches: GroupCommit[dict[str, Any], bool] | None = None
        # Content this process took a reference to lately: its next put takes one
        # at once rather than first trying (and failing) to insert it again.
        self._known: SizedLRU[str, bool] = SizedLRU(16384, lambda _: 1)
        if not type(db.client).__module__.startswith("mongomock"):
            self.ref_batches = GroupCommit(self.take_refs)
            self.new_batches = GroupCommit(functools.partial(insert_new, self.collection))

    # -- the contract ---------------------------------------------------------
    def put(
        self, hash: str, length: int, *, session: ClientSession | None = None
    ) -> tuple[str, str]:
        """Take a reference to `hash`, creating a pending entry if it is new."""
        res, _ = self.acquire(hash, length, session=session)
        return res.id, res.path

    def acquire(
        self,
        hash: str,
        length: int,
        *,
        uploading: bool = False,
        session: ClientSession | None = None,
    ) -> tuple[Resource, bool]:
        """put(), returning the entry and whether this call created it.

        uploading: the caller will upload if the entry is new, so its history
        says so at once (one write less).

        Acknowledged at w="majority": a reference acknowledged at w=1 can be rolled
        back by a failover while a later majority write that depends on it (the
        path that uses it) is retried on the new primary and survives; the count
        would then be one short and the content deleted under a live path.
        """
        digest = parse_hash(hash)
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise BadRequestError(f"invalid length: {length!r}")
        now = utcnow()
        history = [{"state": "created", "at": now}]
        if uploading:
            history.append({"state": "uploading", "at": now})
        on_insert = {"path": "", "state": PENDING, "created_at": now, "history": history}
        doc = self._take_ref(digest, length, now, on_insert, session)
        res = to_resource(doc)
        return res, res.refcount == 1 and res.created_at == aware(now)

    def _take_ref(
        self,
        digest: str,
        length: int,
        now: datetime.datetime,
        on_insert: dict[str, Any],
        session: ClientSession | None,
    ) -> dict[str, Any]:
        """One atomic upsert: refcount += 1 and a fresh lease, the entry made if new.

        The entry as it is after (without inline bytes); LengthMismatchError if the
        hash is recorded with another length.
        """
        while True:
            try:
                doc = self.collection.find_one_and_update(
                    {"hash": digest, "length": length},
                    {
                        "$inc": {"refcount": 1},
                        "$set": {
                            "updated_at": now,
                            "lease_until": now + datetime.timedelta(seconds=self.lease),
                        },
                        "$setOnInsert": on_insert,
                    },
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                    projection={"data": 0},
                    session=session,
                )
            except DuplicateKeyError:
                other = self.collection.find_one({"hash": digest}, {"length": 1}, session=session)
                if other is not None and other["length"] != length:
                    raise LengthMismatchError(
                        f"content {digest} is recorded with length {other['length']}, not {length}"
                    ) from None
                if session is not None:
                    raise  # inside a transaction the whole transaction is retried
                continue  # lost an upsert race: the entry exists now
            assert doc is not None  # upsert with AFTER always returns the document
            return dict(doc)

    def acquire_inline(
        self, digest: str, data: bytes, *, session: ClientSession | None = None
    ) -> Resource:
        """Take a reference to small content, storing its bytes in the entry if new.

        One majority write whether the content is new or known: small content is
        never pending, so nothing waits on an uploader and no lease is renewed.
        """
        length = len(data)
        while True:
            now = utcnow()
            on_insert = {
                "path": INLINE,
                "data": Binary(data),
                "state": READY,
                "created_at": now,
                "history": [{"state": "created", "at": now}],
            }
            doc: dict[str, Any] | None = None
            if session is None and self.new_batches is not None and not self._known.get(digest):
                doc = self._insert_inline(digest, data, now, on_insert)
            if doc is None and session is None and self.ref_batches is not None:
                doc = self.ref_batches.submit(_RefAsk(digest, length, now, on_insert))
            if doc is None:
                doc = self._take_ref(digest, length, now, on_insert, session)
            if doc.get("path", "") == "":
                # A pending entry made through ResourceCatalog.put: complete it with our bytes.
                doc = self.collection.find_one_and_update(
                    {"_id": doc["_id"], "path": ""},
                    {
                        "$set": {"path": INLINE, "data": Binary(data), "state": READY},
                        "$push": _history_push(READY, now),
                    },
                    return_document=ReturnDocument.AFTER,
                    projection={"data": 0},
                    session=session,
                ) or self.collection.find_one({"_id": doc["_id"]}, {"data": 0}, session=session)
                if doc is None:
                    continue
            self._known.add(digest, True)
            res = to_resource(doc)
            if res.inline:
                res = dataclasses.replace(res, data=data)
            return res

    def _insert_inline(
        self, digest: str, data: bytes, now: datetime.datetime, on_insert: dict[str, Any]
    ) -> dict[str, Any] | None:
        """The entry of new small content, inserted whole; None if its hash is known.

        Content new to the catalog is the common case of a small put (each
        change of a KV value, a registry link), and an insert costs mongod less
        than the upsert that takes a reference (measured, 16 threads: a put at
        0.55-0.59x raw inserts against 0.44x). Known content pays a refused insert
        before its upsert (an index probe, no write), unless this process took a
        reference to it lately (`_known`): a client re-putting the same bytes.
        """
        assert self.new_batches is not None
        doc = {
            "hash": digest,
            "length": len(data),
            "refcount": 1,
            "updated_at": now,
            "lease_until": now + datetime.timedelta(seconds=self.lease),
            **on_insert,
        }
        if not self.new_batches.submit(doc):
            return None
        doc.pop("data")
        return doc

    def take_refs(self, asks: Sequence[_RefAsk]) -> list[dict[str, Any] | None]:
        """_take_ref for many asks in one bulk write; each one's entry after, or None.

        None: that ask took nothing (it raced another first writer of its hash,
        or its hash is recorded with another length) and is to be retried alone.
        Asks for one hash are one upsert adding their count. An error of the
        whole write is raised for every ask: as with a single failed write, a
        reference may or may not have been taken, and only ever one too many,
        which gc recounts once its lease runs out.
        """
        if len(asks) == 1:  # alone: one upsert that returns the entry, not a write and a read
            ask = asks[0]
            return [self._take_ref(ask.digest, ask.length, ask.now, ask.on_insert, None)]
        groups: dict[tuple[str, int], list[int]] = {}
        for i, ask in enumerate(asks):
            groups.setdefault((ask.digest, ask.length), []).append(i)
        keys = list(groups)
        ops = []
        for digest, length in keys:
            first = asks[groups[digest, length][0]]
            ops.append(
                UpdateOne(
                    {"hash": digest, "length": length},
                    {
                        "$inc": {"refcount": len(groups[digest, length])},
                        "$set": {
                            "updated_at": first.now,
                            "lease_until": first.now + datetime.timedelta(seconds=self.lease),
                        },
                        "$setOnInsert": first.on_insert,
                    },
                    upsert=True,
                )
            )
        try:
            upserted = dict(self.collection.bulk_write(ops, ordered=False).upserted_ids or {})
            failed: set[int] = set()
        except BulkWriteError as exc:
            if exc.details.get("writeConcernErrors"):
                raise
            upserted = {u["index"]: u["_id"] for u in exc.details.get("upserted", [])}
            failed = {e["index"] for e in exc.details["writeErrors"] if e.get("code") == 11000}
            if len(failed) != len(exc.details["writeErrors"]):
                raise
        docs: dict[int, dict[str, Any]] = {}
        for k, oid in upserted.items():
            digest, length = keys[k]
            first = asks[groups[digest, length][0]]
            docs[k] = {
                "_id": oid,
                "hash": digest,
                "length": length,
                "refcount": len(groups[digest, length]),
                "updated_at": first.now,
                "lease_until": first.now + datetime.timedelta(seconds=self.lease),
                **{f: v for f, v in first.on_insert.items() if f != "data"},
            }
        matched = [k for k in range(len(keys)) if k not in upserted and k not in failed]
        if matched:
            by_hash = {keys[k][0]: k for k in matched}
            for doc in self.collection.find({"hash": {"$in": list(by_hash)}}, {"data": 0}):
                docs[by_hash[doc["hash"]]] = dict(doc)
            if len(docs) != len(upserted) + len(matched):
                raise CatalogError("an entry we hold a reference to is gone")
        out: list[dict[str, Any] | None] = [None] * len(asks)
        for k, key in enumerate(keys):
            for i in groups[key]:
                out[i] = docs.get(k)
        return out

    def read_inline(self, id: str, *, session: ClientSession | None = None) -> bytes:
        doc = self.collection.find_one({"_id": object_id(id)}, {"data": 1}, session=session)
        if doc is None or doc.get("data") is None:
            raise NotFoundError(f"no inline content for resource {id}")
        return bytes(doc["data"])

    def get(self, id: str, *, session: ClientSession | None = None) -> Resource:
        res = self.entry(id, session=session)
        if res.pending:
            raise UploadPendingError(f"resource {id} is still being uploaded")
        return res

    def find(self, hash: str, *, session: ClientSession | None = None) -> str:
        res = self.lookup(hash, session=session)
        if res is None:
            raise NotFoundError(f"no resource with hash {parse_hash(hash)}")
        if res.pending:
            if res.lease_expired():
                raise NotFoundError(f"the upload of {res.hash} was abandoned")
            raise UploadPendingError(f"resource {res.hash} is still being uploaded")
        return res.id

    def upload_complete(
        self,
        id: str,
        path: str,
        *,
        session: ClientSession | None = None,
    ) -> None:
        """Record where the bytes are; the entry becomes ready (majority-acknowledged)."""
        if not isinstance(path, str) or not path:
            raise BadRequestError("upload_complete needs a non-empty storage path")
        oid = object_id(id)
        now = utcnow()
        doc = self.collection.find_one_and_update(
            {"_id": oid, "path": ""},
            {
                "$set": {"path": path, "state": READY, "updated_at": now},
                "$push": _history_push(READY, now),
            },
            session=session,
        )
        if doc is None:
            if self.collection.find_one({"_id": oid}, {"_id": 1}, session=session) is None:
                raise NotFoundError(f"no resource with id {id}")
            raise AlreadyExistsError(f"resource {id} already has its content stored")

    def remove(
        self, id: str, *, session: ClientSession | None = None, durable: bool = True
    ) -> tuple[bool, str]:
        """Drop one reference; delete the entry at zero. Returns (was_deleted, path).

        The last reference is taken away by deleting the entry (one write, the
        common case for unique content); any other by a decrement that only
        matches above one. Each call that succeeds took exactly one reference,
        the others raise NotFoundError, and the deleting call returns the path
        recorded when the entry went: an upload_complete that got in first is
        never forgotten.

        durable=False (outside a transaction) acknowledges once the primary has
        applied the write, without waiting for a majority: for a reference that
        no path holds any more, whose loss in a failover rollback only leaves
        a count one too high, which gc recounts (the state a crash before the
        release leaves too). It spares mongod a majority write per replace.
        """
        oid = object_id(id)
        collection = self._fast if not durable and session is None else self.collection
        while True:
            gone = collection.find_one_and_delete(
                {"_id": oid, "refcount": 1}, projection={"path": 1}, session=session
            )
            if gone is not None:
                return True, gone.get("path", "")
            doc = collection.find_one_and_update(
                {"_id": oid, "refcount": {"$gt": 1}},
                {"$inc": {"refcount": -1}, "$set": {"updated_at": utcnow()}},
                projection={"path": 1},
                session=session,
            )
            if doc is not None:
                return False, doc.get("path", "")
            # Neither matched: gone, at zero, or dropped to one between the two.
            now = self.collection.find_one({"_id": oid}, {"refcount": 1}, session=session)
            if now is None or now.get("refcount", 0) < 1:
                raise NotFoundError(f"no resource with id {id}")

    # -- beyond the contract -------------------------------------------------
    def entry(self, id: str, *, session: ClientSession | None = None) -> Resource:
        """The entry whatever its state (NotFoundError)."""
        doc = self.collection.find_one({"_id": object_id(id)}, session=session)
        if doc is None:
            raise NotFoundError(f"no resource with id {id}")
        return to_resource(doc)

    def lookup(self, hash: str, *, session: ClientSession | None = None) -> Resource | None:
        """The entry for a hash whatever its state, or None."""
        doc = self.collection.find_one({"hash": parse_hash(hash)}, session=session)
        return to_resource(doc) if doc is not None else None

    def add_ref(self, id: str, *, session: ClientSession | None = None) -> Resource | None:
        """Take one more reference to a ready entry; None if it is gone or not ready."""
        now = utcnow()
        doc = self.collection.find_one_and_update(
            {"_id": object_id(id), "state": READY, "refcount": {"$gt": 0}},
            {"$inc": {"refcount": 1}, "$set": {"updated_at": now}},
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        return to_resource(doc) if doc is not None else None

    def renew_lease(self, id: str, *, state: str | None = None) -> None:
        """Extend the lease of an uploader (or an in-flight reference); note `state` if given."""
        now = utcnow()
        update: dict[str, Any] = {
            "$set": {"lease_until": now + datetime.timedelta(seconds=self.lease)}
        }
        if state is not None:
            update["$push"] = _history_push(state, now)
        self._fast.update_one({"_id": object_id(id)}, update)
