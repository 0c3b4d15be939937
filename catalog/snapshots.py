"""containerd's snapshot metadata store (the seed's MetaStore), on MongoDB transactions.

A snapshot is known by a key. It is *active* (mutable; readonly when it backs a
view) until it is committed under a new name, after which it is *committed*,
immutable, and may be the parent of other snapshots. Each snapshot has an id,
handed out once per namespace and kept through the commit, which a snapshotter
uses to name its on-disk directory: an id that came back after a remove would
make two snapshots share one directory.

Documents (one MongoDB transaction per MetaStore transaction):

* ``snapshots``: one per snapshot, ``{ns, key, id, kind, parent, chain,
  readonly, created_at, updated_at, labels, children}``; unique on
  ``(ns, key)`` and on ``(ns, id)``. ``chain`` is the ids of the parent, its
  parent and so on down to the root: a committed snapshot never changes and
  cannot be removed while it has children, so a chain copied at creation stays
  true and ``get_active`` is one read. ``labels`` is a list of ``{k, v}``
  pairs because containerd's label keys hold dots, which MongoDB field names
  do not take well. ``children`` counts the snapshots whose parent this is.
* ``snapshot_ids``: ``{_id: ns, seq}``, the last id handed out. It is bumped
  outside the transaction, with w="majority": bumped inside, it would be a
  document every creating transaction writes, so two transactions creating
  unrelated snapshots would always conflict (containerd's bolt store makes
  them wait for each other instead; neither fails). An id is therefore never
  handed out twice, also after a remove or a rollback; ids of rolled-back
  transactions are skipped.

Write skew: ``remove(parent)`` reads ``children == 0`` and deletes the parent;
``create_active(child, parent)`` reads the parent and increments its
``children``. Both write the parent's document, so under snapshot isolation
one of two concurrent transactions loses a write conflict instead of both
committing and leaving a child without its parent.

Every call checks all of its preconditions with reads before its first write:
a server-side error inside a MongoDB transaction aborts the whole transaction,
and a call that raises a contract error must leave its transaction usable.
A transaction that loses a write conflict raises WriteConflictError and has
changed nothing; ``MetaStore.with_transaction`` reruns a callback for that.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from pymongo import ASCENDING, ReturnDocument, WriteConcern
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.errors import DuplicateKeyError, PyMongoError

from catalog import txn
from catalog.clock import aware, utcnow
from catalog.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    NoTransactionError,
    WriteConflictError,
)
from catalog.txnowners import owners_of

if TYPE_CHECKING:
    from catalog.managed import ManagedStorage

T = TypeVar("T")

# containerd's limit on a label (key and value together).
MAX_LABEL_BYTES = 4096


class Kind(str, enum.Enum):
    ACTIVE = "active"
    COMMITTED = "committed"


@dataclass(frozen=True)
class Active:
    """What a snapshotter needs to mount an active snapshot: its id and its layers."""

    id: str
    parent_ids: list[str]  # immediate parent first, root last
    readonly: bool


@dataclass(frozen=True)
class Info:
    name: str
    parent: str  # "" when none
    kind: Kind
    readonly: bool
    created_at: datetime.datetime
    updated_at: datetime.datetime
    labels: dict[str, str] = field(default_factory=dict)


class MetaStore:
    """Snapshots of one namespace, kept beside the catalog in ManagedStorage's database."""

    def __init__(self, managed: ManagedStorage, namespace: str = "default") -> None:
        if not isinstance(namespace, str) or not namespace:
            raise InvalidArgumentError("a namespace is a non-empty string")
        self.namespace = namespace
        if not getattr(managed, "_transactions", True):
            raise FailedPreconditionError(
                "the snapshot metastore needs MongoDB transactions (a replica set)"
            )
        db = managed.db
        self._client = db.client
        self._db = db
        self._snapshots: Collection[dict[str, Any]] = db["snapshots"]
        self._ids: Collection[dict[str, Any]] = db["snapshot_ids"].with_options(
            write_concern=WriteConcern("majority")
        )
        # Indexes and the counter exist before any transaction: creating either
        # inside one would conflict between two first transactions.
        self._snapshots.create_index(
            [("ns", ASCENDING), ("key", ASCENDING)], unique=True, name="ns_key"
        )
        self._snapshots.create_index(
            [("ns", ASCENDING), ("id", ASCENDING)], unique=True, name="ns_id"
        )
        self._ids.update_one({"_id": namespace}, {"$setOnInsert": {"seq": 0}}, upsert=True)

    def transaction_context(self, writable: bool) -> Transaction:
        """The seed's form: the caller ends it with commit() or rollback()."""
        return Transaction(self, writable)

    def transaction(self, writable: bool) -> Transaction:
        """For `with`: commits when the block ends, rolls back on an exception or if read-only."""
        return Transaction(self, writable)

    def with_transaction(self, fn: Callable[[Transaction], T], writable: bool = True) -> T:
        """Run fn(tx) in a transaction and commit; rerun it from scratch after a write conflict.

        fn may run more than once, so it should have no effects outside tx.
        """

        def attempt() -> T:
            with self.transaction(writable) as tx:
                return fn(tx)

        return txn.retry(attempt, lambda exc: isinstance(exc, WriteConflictError))


class Transaction:
    """One MongoDB transaction over a namespace's snapshots."""

    def __init__(self, store: MetaStore, writable: bool) -> None:
        self._ns = store.namespace
        self._snapshots = store._snapshots
        self._ids = store._ids
        self._writable = bool(writable)
        self._wrote = False
        # Looked up each time: a process forked since the store was made has its own.
        self._owners = owners_of(store._db)
        session = txn.start(store._client)
        try:
            self._owners.register(session)
        except BaseException:
            session.end_session()
            raise
        self._session: ClientSession | None = session

    # -- ending ---------------------------------------------------------------
    @property
    def writable(self) -> bool:
        return self._writable

    @property
    def open(self) -> bool:
        return self._session is not None

    def commit(self) -> None:
        """Make every change visible at once; a read-only transaction just ends."""
        session = self._end()
        try:
            if not self._wrote:
                # Nothing was written: an abort ends it the same, without
                # waiting for a majority to acknowledge a commit.
                session.abort_transaction()
                return
            txn.commit(session)
        except PyMongoError as exc:
            if txn.transient(exc):
                self._lost_conflict()
                raise WriteConflictError("the transaction lost a conflict; retry it") from exc
            raise
        finally:
            session.end_session()

    def rollback(self) -> None:
        session = self._end()
        try:
            session.abort_transaction()
        except PyMongoError:
            pass  # the server drops an unfinished transaction on its own
        finally:
            session.end_session()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is None:
            return  # ended inside the block (commit/rollback, or a lost conflict)
        if exc_type is None and self._writable:
            self.commit()
        else:
            self.rollback()

    def _end(self) -> ClientSession:
        if self._session is None:
            raise NoTransactionError("the transaction has ended")
        session, self._session = self._session, None
        return session

    def _abandon(self) -> None:
        if self._session is not None:
            self.rollback()

    def _lost_conflict(self) -> None:
        """The conflict may be with a dead process's transaction: have it aborted (txnowners)."""
        with contextlib.suppress(PyMongoError):
            self._owners.reap()

    def _ready(self, write: bool) -> None:
        """Refuse a call on an ended transaction, or a write in a read-only one, first."""
        if self._session is None:
            raise NoTransactionError("the transaction has ended")
        if write and not self._writable:
            raise NoTransactionError("a write in a read-only transaction")

    @contextmanager
    def _call(self, write: bool) -> Iterator[ClientSession]:
        """The session for one call; ends the transaction if the server failed it."""
        self._ready(write)
        assert self._session is not None
        self._wrote = self._wrote or write
        try:
            yield self._session
        except DuplicateKeyError as exc:
            # We checked the key with a read first: a concurrent transaction
            # committed the same key since our snapshot was taken.
            self._abandon()
            raise WriteConflictError("a concurrent transaction took the same key") from exc
        except PyMongoError as exc:
            # The server aborts a transaction on any error; nothing of it remains.
            self._abandon()
            if txn.transient(exc):
                self._lost_conflict()
                raise WriteConflictError("the transaction lost a conflict; retry it") from exc
            raise

    # -- reads ----------------------------------------------------------------
    def stat(self, key: str) -> Info:
        return self.get_info(key)[1]

    def get_info(self, key: str) -> tuple[str, Info]:
        """The snapshot's id and Info (containerd's GetInfo)."""
        self._ready(write=False)
        _check_key(key, "key")
        with self._call(write=False) as session:
            doc = self._need(session, key)
        return str(doc["id"]), _info(doc)

    def get_active(self, key: str) -> Active:
        self._ready(write=False)
        _check_key(key, "key")
        with self._call(write=False) as session:
            doc = self._need(session, key)
        if doc["kind"] != Kind.ACTIVE.value:
            raise FailedPreconditionError(f"snapshot {key!r} is committed, not active")
        return _active(doc)

    def walk(self, fn: Callable[[Info], None]) -> None:
        """Call fn with every snapshot of the namespace, in key order."""
        with self._call(write=False) as session:
            docs = list(self._snapshots.find({"ns": self._ns}, session=session).sort("key"))
        for doc in docs:
            fn(_info(doc))

    def id_map(self) -> dict[str, str]:
        """id -> key of every snapshot (containerd's IDMap, for a snapshotter's cleanup)."""
        with self._call(write=False) as session:
            cursor = self._snapshots.find({"ns": self._ns}, {"id": 1, "key": 1}, session=session)
            return {str(doc["id"]): doc["key"] for doc in cursor}

    # -- writes ---------------------------------------------------------------
    def create_active(
        self,
        key: str,
        parent: str = "",
        readonly: bool = False,
        labels: Mapping[str, str] | None = None,
    ) -> Active:
        self._ready(write=True)
        _check_key(key, "key")
        _check_parent(parent)
        if not isinstance(readonly, bool):
            raise InvalidArgumentError("readonly is a bool")
        label_pairs = _label_pairs(labels)
        with self._call(write=True) as session:
            # One round trip for both: reads inside a transaction are not free.
            found = self._find_all(session, key, parent)
            pdoc = _committed_parent(found.get(parent), parent) if parent else None
            if key in found:
                raise AlreadyExistsError(f"snapshot {key!r} already exists")
            # Checked: from here on only writes.
            new_id = self._next_id()
            chain = [pdoc["id"], *pdoc["chain"]] if pdoc is not None else []
            now = utcnow()
            doc = {
                "ns": self._ns,
                "key": key,
                "id": new_id,
                "kind": Kind.ACTIVE.value,
                "parent": parent,
                "chain": chain,
                "readonly": readonly,
                "created_at": now,
                "updated_at": now,
                "labels": label_pairs,
                "children": 0,
            }
            self._snapshots.insert_one(doc, session=session)
            if pdoc is not None:
                # The common document with a concurrent remove(parent): see module doc.
                self._snapshots.update_one(
                    {"_id": pdoc["_id"]}, {"$inc": {"children": 1}}, session=session
                )
        return _active(doc)

    def commit_active(
        self,
        key: str,
        name: str,
        labels: Mapping[str, str] | None = None,
        parent: str = "",
    ) -> str:
        """Commit the active `key` as `name`; the id stays. The seed's Commit.

        Labels are replaced, not inherited (as containerd does): they describe
        the committed content, not the work in progress. `parent` may give an
        active created without one a parent at commit (containerd's rebase).
        """
        self._ready(write=True)
        _check_key(key, "key")
        _check_key(name, "name")
        _check_parent(parent)
        label_pairs = _label_pairs(labels)
        with self._call(write=True) as session:
            found = self._find_all(session, name, key)
            if name in found:
                raise AlreadyExistsError(f"snapshot {name!r} already exists")
            doc = found.get(key)
            if doc is None:
                raise _not_found(key)
            if doc["kind"] != Kind.ACTIVE.value:
                raise FailedPreconditionError(f"snapshot {key!r} is committed, not active")
            if doc["readonly"]:
                raise FailedPreconditionError(f"snapshot {key!r} is a readonly active")
            update: dict[str, Any] = {}
            pdoc = None
            if parent and parent != doc["parent"]:
                if doc["parent"]:
                    raise InvalidArgumentError(f"cannot change the parent of {key!r} on commit")
                pdoc = self._committed_parent(session, parent)
                update = {"parent": parent, "chain": [pdoc["id"], *pdoc["chain"]]}
            # Checked: from here on only writes.
            now = utcnow()
            update.update(
                key=name,
                kind=Kind.COMMITTED.value,
                readonly=True,
                created_at=now,
                updated_at=now,
                labels=label_pairs,
            )
            self._snapshots.update_one({"_id": doc["_id"]}, {"$set": update}, session=session)
            if pdoc is not None:
                self._snapshots.update_one(
                    {"_id": pdoc["_id"]}, {"$inc": {"children": 1}}, session=session
                )
        return str(doc["id"])

    def remove(self, key: str) -> str:
        """Remove a snapshot that has no children; its id is never handed out again."""
        self._ready(write=True)
        _check_key(key, "key")
        with self._call(write=True) as session:
            # The check and the delete in one step: a delete that matches
            # nothing is no server error, so it leaves the transaction usable.
            doc = self._snapshots.find_one_and_delete(
                {"ns": self._ns, "key": key, "children": {"$lte": 0}}, session=session
            )
            if doc is None:
                if self._find(session, key) is None:
                    raise _not_found(key)
                raise FailedPreconditionError(f"snapshot {key!r} has children")
            if doc["parent"]:
                self._snapshots.update_one(
                    {"ns": self._ns, "key": doc["parent"]},
                    {"$inc": {"children": -1}},
                    session=session,
                )
        return str(doc["id"])

    def update(
        self,
        key: str,
        labels: Mapping[str, str],
        fieldpaths: Sequence[str] = (),
    ) -> Info:
        """Replace the labels (containerd's UpdateInfo).

        With fieldpaths, only those change: "labels" replaces them all,
        "labels.<k>" sets k from `labels`, or drops it when `labels` has no k
        or maps it to "" (an empty value is no label, as in containerd).
        Snapshot GC keeps its references in labels, so this is how they move.
        """
        self._ready(write=True)
        _check_key(key, "key")
        new_labels = dict(_labels_dict(_label_pairs(labels)))
        if isinstance(fieldpaths, str):
            paths = [fieldpaths]
        elif isinstance(fieldpaths, Iterable):
            paths = list(fieldpaths)
        else:  # None is refused, not read as "all": that would replace every label
            raise InvalidArgumentError(f"fieldpaths is a list of str, not {fieldpaths!r}")
        for path in paths:
            if path != "labels" and not (isinstance(path, str) and path.startswith("labels.")):
                raise InvalidArgumentError(f"cannot update {path!r} of snapshot {key!r}")
        with self._call(write=True) as session:
            doc = self._need(session, key)
            current = _labels_dict(doc.get("labels", []))
            if paths:
                result = dict(current)
                for path in paths:
                    if path == "labels":
                        result = dict(new_labels)
                        continue
                    label = path[len("labels.") :]
                    if label in new_labels:
                        result[label] = new_labels[label]
                    else:
                        result.pop(label, None)
            else:
                result = new_labels
            pairs = _label_pairs(result)
            # Checked: from here on only writes.
            now = utcnow()
            self._snapshots.update_one(
                {"_id": doc["_id"]},
                {"$set": {"labels": pairs, "updated_at": now}},
                session=session,
            )
        return _info({**doc, "labels": pairs, "updated_at": now})

    # -- helpers --------------------------------------------------------------
    def _find(self, session: ClientSession, key: str) -> dict[str, Any] | None:
        return self._snapshots.find_one({"ns": self._ns, "key": key}, session=session)

    def _need(self, session: ClientSession, key: str) -> dict[str, Any]:
        doc = self._find(session, key)
        if doc is None:
            raise _not_found(key)
        return doc

    def _find_all(self, session: ClientSession, *keys: str) -> dict[str, dict[str, Any]]:
        wanted = [k for k in keys if k]
        cursor = self._snapshots.find({"ns": self._ns, "key": {"$in": wanted}}, session=session)
        return {doc["key"]: doc for doc in cursor}

    def _committed_parent(self, session: ClientSession, parent: str) -> dict[str, Any]:
        return _committed_parent(self._find(session, parent), parent)

    def _next_id(self) -> int:
        """A fresh id, taken outside the transaction (see the module doc on ``snapshot_ids``).

        Majority-acknowledged, so a failover cannot roll the counter back and
        hand a committed snapshot's id out again.
        """
        doc = self._ids.find_one_and_update(
            {"_id": self._ns},
            {"$inc": {"seq": 1}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:  # pragma: no cover - an upsert always returns the document
            raise AssertionError("the id counter vanished")
        return int(doc["seq"])


def _committed_parent(pdoc: dict[str, Any] | None, parent: str) -> dict[str, Any]:
    if pdoc is None:
        raise _not_found(parent, "parent ")
    if pdoc["kind"] != Kind.COMMITTED.value:
        raise InvalidArgumentError(f"parent {parent!r} is not a committed snapshot")
    return pdoc


def _not_found(key: str, what: str = "") -> NotFoundError:
    return NotFoundError(f"{what}snapshot {key!r} does not exist", path=key)


def _utf8_len(text: str, what: str) -> int:
    """Its UTF-8 length; text with no UTF-8 form (lone surrogates) is bad input.

    The BSON encoder would otherwise raise UnicodeEncodeError mid-call.
    """
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{what} {text!r} is not valid UTF-8 text") from None


def _check_key(key: object, what: str) -> None:
    if not isinstance(key, str) or not key:
        raise InvalidArgumentError(f"a snapshot {what} is a non-empty string, not {key!r}")
    _utf8_len(key, f"snapshot {what}")


def _check_parent(parent: object) -> None:
    if not isinstance(parent, str):
        raise InvalidArgumentError(f"a parent is a string ('' for none), not {parent!r}")
    _utf8_len(parent, "parent")


def _label_pairs(labels: Mapping[str, str] | None) -> list[dict[str, str]]:
    """The labels to store; an empty value means "no such label", as in containerd.

    containerd's clients remove a label by setting it to "" (its bolt store
    never writes an empty value), and GC labels count by their mere presence.
    """
    if labels is None:
        return []
    if not isinstance(labels, Mapping):
        raise InvalidArgumentError("labels are a mapping of str to str")
    items = list(labels.items())
    # Types first: sorting keys of mixed types would raise TypeError.
    for k, v in items:
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise InvalidArgumentError(f"label {k!r}: keys are non-empty str, values str")
    pairs = []
    for k, v in sorted(items):
        if _utf8_len(k, "label") + _utf8_len(v, f"label {k!r} value") > MAX_LABEL_BYTES:
            raise InvalidArgumentError(f"label {k!r} is longer than {MAX_LABEL_BYTES} bytes")
        if v:
            pairs.append({"k": k, "v": v})
    return pairs


def _labels_dict(pairs: list[dict[str, str]]) -> dict[str, str]:
    return {p["k"]: p["v"] for p in pairs}


def _info(doc: dict[str, Any]) -> Info:
    return Info(
        name=doc["key"],
        parent=doc.get("parent", ""),
        kind=Kind(doc["kind"]),
        readonly=bool(doc["readonly"]),
        created_at=aware(doc["created_at"]),
        updated_at=aware(doc["updated_at"]),
        labels=_labels_dict(doc.get("labels", [])),
    )


def _active(doc: dict[str, Any]) -> Active:
    return Active(
        id=str(doc["id"]),
        parent_ids=[str(i) for i in doc["chain"]],
        readonly=bool(doc["readonly"]),
    )


__all__ = ["Active", "Info", "Kind", "MetaStore", "Transaction"]
