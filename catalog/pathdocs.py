"""How a path document changes: revisions and the per-path history of events.

Every change of a path is one atomic update of its document that also gives it
a new revision and appends the event to the document's own `events` list, so a
put of new content costs no extra write for its history. When a path goes
(delete, or moved away) its events move to the `path_history` collection with
the final event, in the same transaction that removes the path.

Revisions grow on every change of a path and across the whole environment
without a counter document that every write would contend on: the revision is
the server's cluster time at the write (seconds << 32 | increment), and at
least one more than the path's previous revision. A change that starts after
another has finished reads a later cluster time, so it gets a larger revision.
Where the server has no cluster time (a standalone mongod, mongomock), a
process-local clock in microseconds takes its place.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Sequence
from typing import Any

from bson import Int64, Timestamp

from catalog.groupcommit import insert_new

# A path's events live in its own document while they are few: a put of new
# content costs no extra write for its history. Every change rewrites that
# document, and mongod's cost of it grows with the document (measured, 16
# threads: a link on a path holding 256 events cost 2.2x one on a fresh path).
# So a writer that leaves more than SPILL_AT events moves all but the newest
# LIVE_EVENTS to the path's `path_history` document (ManagedStorage._spill),
# where a deleted path's events go too (and the oldest on to `path_archive`).
LIVE_EVENTS = 32
SPILL_AT = 2 * LIVE_EVENTS
# Events of a path replayed from its document; should spills fail, its document
# is cut back to the newest EVENTS_CAP at EVENTS_KEPT. An event appended is
# logged (oplog, journal, every change stream) as that event, ~400 bytes; a cut
# shifts the array and is logged as all of it.
EVENTS_CAP = 256
EVENTS_KEPT = 2 * EVENTS_CAP
EVENTS_SHOWN: dict[str, Any] = {"$slice": -EVENTS_CAP}
# A history document keeps a path's recent past: past HISTORY_KEPT events, the
# writer that notices moves all but the newest HISTORY_CAP to a bucket document
# of `path_archive` (catalog.archive), so history is kept by age alone
# (`--history-days`), however many changes a path has had, while the document
# every closing and spill rewrites stays small: rewritten whole on every move,
# a hot key's moves logged its whole history (6.8 KiB of oplog per put, against
# 2.0 KiB for a key with a short past).
HISTORY_CAP = EVENTS_CAP * 4
HISTORY_KEPT = 2 * HISTORY_CAP
# Only should archiving keep failing is a history document cut back (to
# HISTORY_CUT_TO, at HISTORY_CUT_AT, ~6 MiB of events: below MongoDB's 16 MiB
# document limit); a replay that needs what a cut took answers 410.
HISTORY_CUT_AT = 16 * HISTORY_CAP
HISTORY_CUT_TO = 12 * HISTORY_CAP
HISTORY_SHOWN: dict[str, Any] = {"$slice": -HISTORY_CUT_AT}

_CLUSTER_CLOCK: dict[str, Any] = {
    "$add": [
        {"$multiply": [{"$toLong": {"$tsSecond": "$$CLUSTER_TIME"}}, 4294967296]},
        {"$toLong": {"$tsIncrement": "$$CLUSTER_TIME"}},
    ]
}
_SERVER_MS_CLOCK: dict[str, Any] = {"$multiply": [{"$toLong": "$$NOW"}, 1000]}


class LocalClock:
    """Strictly increasing microseconds in this process (mongomock mode)."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            now = max(time.time_ns() // 1000, self._last + 1)
            self._last = now
            return now


def literal(value: Any) -> dict[str, Any]:
    """A value in an aggregation pipeline, never taken for a field path or operator."""
    return {"$literal": value}


def revision(value: Any) -> int:
    """A stored revision as an int: a path made by `fresh` holds the server's Timestamp."""
    if isinstance(value, Timestamp):
        return (value.time << 32) | value.inc
    return int(value or 0)


def revision_query(rev: int) -> dict[str, Any]:
    """A query on `rev` for revision `rev`, in either of the forms it is stored in."""
    return {"$in": [Int64(rev), Timestamp(rev >> 32, rev & 0xFFFFFFFF)]}


def path_events(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A path document's events; one made by `fresh` and unchanged since holds none yet."""
    if "events" in doc or not isinstance(doc.get("rev"), Timestamp):
        return list(doc.get("events") or [])
    return [
        {
            "at": doc["created_at"],
            "event": "create",
            "state": "ok",
            "hash": doc["hash"],
            "length": int(doc["length"]),
            "revision": revision(doc["rev"]),
        }
    ]


def fresh(
    env_uuid: str, path: str, target: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    """A new path's whole document, to insert (cluster mode only).

    An insert costs mongod half what the upsert pipeline of `PathUpdates.link`
    does (measured, 16 threads: 0.40 against 0.76 ms of mongod CPU per write),
    but an insert cannot evaluate `$$CLUSTER_TIME`. Its revision comes from the
    server all the same: a top-level `Timestamp(0, 0)` is replaced at the insert
    with a fresh tick of the cluster clock, the clock `$$CLUSTER_TIME` reads, so
    it is larger than every revision written before and smaller than every one
    written after. It is stored as that Timestamp (`revision` reads it) and its
    create event is implied (`path_events`) until the first change of the path,
    whose pipeline turns both into the usual form.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "env": env_uuid,
        "path": path,
        "rev": Timestamp(0, 0),
        **{k: target[k] for k in ("resource_id", "hash", "length")},
        **extra,
        "created_at": now,
        "updated_at": now,
    }


def insert_fresh(collection: Any, docs: Sequence[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """A `run_batch` of `fresh` inserts whose writers want the path back, with its revision.

    All in one insert and one read by `_id`: the server fills in each revision
    at the insert, so it is read back. None for a path that exists (refused
    as a duplicate). A path changed between the two has its revision turned
    into a long and its create event written out: the create event carries
    the insert's revision (`_of_insert`).
    """
    inserted = insert_new(collection, docs)
    raised = settle_created(collection, [d for d, ok in zip(docs, inserted, strict=True) if ok])
    ids = [doc["_id"] for doc, ok in zip(docs, inserted, strict=True) if ok]
    found = (
        {}
        if not ids
        else {
            d["_id"]: d for d in collection.find({"_id": {"$in": ids}}, {"rev": 1}, limit=len(ids))
        }
    )
    out: list[dict[str, Any] | None] = []
    for doc, ok in zip(docs, inserted, strict=True):
        if not ok:
            out.append(None)
            continue
        now = found.get(doc["_id"])
        if doc["_id"] in raised:
            out.append({**doc, "rev": Int64(raised[doc["_id"]])})
        elif now is not None and isinstance(now.get("rev"), Timestamp):
            out.append({**doc, "rev": now["rev"]})
        else:
            out.append({**doc, "rev": Int64(_of_insert(collection, doc))})
    return out


def insert_settled(collection: Any, docs: Sequence[dict[str, Any]]) -> list[bool]:
    """A `run_batch` of `fresh` inserts whose writers want nothing back: `insert_new`, settled."""
    inserted = insert_new(collection, docs)
    settle_created(collection, [d for d, ok in zip(docs, inserted, strict=True) if ok])
    return inserted


def settle_created(
    collection: Any, docs: Sequence[dict[str, Any]], mode: str = "cluster"
) -> dict[Any, int]:
    """Raise the revision of paths just created above their deletion's; {_id: new revision}.

    A write that creates a path takes its revision (the insert's tick, the
    pipeline's clock) before it waits for a delete of the same path still
    committing, so the path came back at a revision no larger than the one its
    deletion took: a compare-and-swap on that revision could pass against a
    different state, and watches saw a put older than the delete before it.
    Once the insert has returned the delete has committed, so the path's
    history says whether that happened; then one conditional update gives the
    path (and its create event) a revision above it. Only paths with a history
    are looked at: one query for the whole batch, none more for a new path.
    """
    if not docs or mode == "local":  # mongomock: one process, its clock only grows
        return {}
    history = collection.database["path_history"]
    by_env: dict[str, list[str]] = {}
    for d in docs:
        by_env.setdefault(d["env"], []).append(d["path"])
    # One index scan per environment ($in on the (env, path) index), not an $or of
    # point queries, each planned on its own: most batches are of one environment.
    lasts = {
        (h["env"], h["path"]): int(h.get("last_rev") or 0)
        for env, paths in by_env.items()
        for h in history.find(
            {"env": env, "path": {"$in": paths}, "last_rev": {"$gt": 0}},
            {"_id": 0, "env": 1, "path": 1, "last_rev": 1},
        )
    }
    raised: dict[Any, int] = {}
    for doc in docs:
        last = lasts.get((doc["env"], doc["path"]))
        if last is None:
            continue
        stored = doc.get("rev")
        if stored is None or (isinstance(stored, Timestamp) and stored.time == 0):
            now = collection.find_one({"_id": doc["_id"]}, {"rev": 1})
            if now is None:
                continue  # gone since: its deletion took a revision after ours
            stored = now["rev"]
        if revision(stored) > last:
            continue
        after = collection.find_one_and_update(
            {"_id": doc["_id"], "rev": stored},
            _raise_above(revision(stored), last, mode),
            projection={"rev": 1},
            return_document=True,
        )
        if after is not None:
            raised[doc["_id"]] = revision(after["rev"])
    return raised


def _raise_above(old: int, last: int, mode: str) -> list[dict[str, Any]]:
    """A just-created path's revision (and its create event's) raised above `last`."""
    clock = _CLUSTER_CLOCK if mode == "cluster" else _SERVER_MS_CLOCK
    bumped = {
        "$cond": [
            {"$eq": ["$$this.revision", old]},
            {"$mergeObjects": ["$$this", {"revision": "$rev"}]},
            "$$this",
        ]
    }
    return [
        {"$set": {"events": _EVENTS_SO_FAR}},
        {"$set": {"rev": {"$max": [{"$add": [_REV_AS_LONG, 1]}, clock, last + 1]}}},
        {"$set": {"events": {"$map": {"input": "$events", "in": bumped}}}},
        {"$set": {"n_events": {"$size": "$events"}}},
    ]


def _of_insert(collection: Any, doc: dict[str, Any]) -> int:
    """The revision a `fresh` insert got, once its path changed (or went) since.

    Its create event is the first of the document's events (or, the path
    gone, among its history's), with the insert's `created_at`; 0 if it has
    passed on to the archive since: a revision no condition matches.
    """
    at = doc["created_at"].replace(microsecond=doc["created_at"].microsecond // 1000 * 1000)
    match = {"event": "create", "at": at, "hash": doc["hash"]}
    # The document it inserted, if it is still there: its events are its own alone.
    held = collection.find_one({"_id": doc["_id"]}, {"events": {"$elemMatch": match}})
    if held is None or not held.get("events"):  # gone (deleted, moved) or spilled
        held = collection.database["path_history"].find_one(
            {"env": doc["env"], "path": doc["path"], "events": {"$elemMatch": match}},
            {"events": {"$elemMatch": match}},
        )
    if held is not None and held.get("events"):
        return int(held["events"][0].get("revision") or 0)
    return 0


_FRESH = {"$eq": [{"$type": "$rev"}, "timestamp"]}
_FRESH_REV = {
    "$add": [
        {"$multiply": [{"$toLong": {"$tsSecond": "$rev"}}, 4294967296]},
        {"$toLong": {"$tsIncrement": "$rev"}},
    ]
}
# A TTL key read past its expiry (`expires_at` in the past), in a pipeline.
_EXPIRED: dict[str, Any] = {
    "$and": [{"$eq": [{"$type": "$expires_at"}, "date"]}, {"$lte": ["$expires_at", "$$NOW"]}]
}
# The stored revision as a long, whichever form it has (see `fresh`).
_REV_AS_LONG: dict[str, Any] = {"$cond": [_FRESH, _FRESH_REV, {"$ifNull": ["$rev", 0]}]}
# The events of a document as `path_events` reads them.
_EVENTS_SO_FAR: dict[str, Any] = {
    "$ifNull": [
        "$events",
        {
            "$cond": [
                _FRESH,
                [
                    {
                        "at": "$created_at",
                        "event": "create",
                        "state": "ok",
                        "hash": "$hash",
                        "length": "$length",
                        "revision": _FRESH_REV,
                    }
                ],
                [],
            ]
        },
    ]
}


class PathUpdates:
    """Builders for the updates that change a path document.

    `mode` is "cluster" (replica set: revisions from cluster time), "server"
    (standalone: the server's clock) or "local" (mongomock: no pipelines).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.clock = LocalClock()

    @property
    def pipelines(self) -> bool:
        return self.mode != "local"

    def _rev_expr(self) -> dict[str, Any]:
        clock = _CLUSTER_CLOCK if self.mode == "cluster" else _SERVER_MS_CLOCK
        return {"$max": [{"$add": [_REV_AS_LONG, 1]}, clock]}

    def link(
        self,
        target: dict[str, Any],
        *,
        event: str | None = None,
        extra: dict[str, Any] | None = None,
        unset: tuple[str, ...] = (),
        detail: dict[str, Any] | None = None,
        dropping: float | None = None,
    ) -> Any:
        """Point a path at `target` (resource_id, hash, length), with a new revision.

        event: the history event; by default `create` for a new (or expired) path
        and `replace` otherwise. `prev_rid` keeps the resource the path held
        before, so a caller asking for the document after the update learns both.
        dropping: the caller drops that resource's reference after this update,
        not in the same transaction, within this lease (seconds); `dropping` and
        `dropping_until` tell gc so (gc._let_go_lately).
        """
        fields = {k: target[k] for k in ("resource_id", "hash", "length")}
        fields.update(extra or {})
        if not self.pipelines:
            return self._link_classic(fields, event, unset, detail)
        # A TTL key past its expiry is gone from every read: writing it again
        # creates it anew (its event, its created_at), though its document stayed.
        kind: Any = (
            literal(event)
            if event
            else {
                "$cond": [
                    {"$and": [{"$ifNull": ["$prev_rid", False]}, {"$not": ["$_expired"]}]},
                    "replace",
                    "create",
                ]
            }
        )
        entry = {
            "at": "$$NOW",
            "event": kind,
            "state": "ok",
            "hash": literal(fields["hash"]),
            "length": literal(fields["length"]),
            "revision": "$rev",
        }
        entry.update({k: literal(v) for k, v in (detail or {}).items()})
        stages: list[dict[str, Any]] = [
            {
                "$set": {
                    "prev_rid": {"$ifNull": ["$resource_id", None]},
                    "rev": self._rev_expr(),
                    "events": _EVENTS_SO_FAR,
                    "_expired": _EXPIRED,
                    "created_at": {
                        "$cond": [_EXPIRED, "$$NOW", {"$ifNull": ["$created_at", "$$NOW"]}]
                    },
                    "updated_at": "$$NOW",
                    **{k: literal(v) for k, v in fields.items()},
                }
            },
            {"$set": {"events": {"$concatArrays": [{"$ifNull": ["$events", []]}, [entry]]}}},
            {"$set": {"events": _cut(EVENTS_KEPT, EVENTS_CAP)}},
            {"$set": {"n_events": {"$size": "$events"}}},  # past SPILL_AT: the writer spills
        ]
        if dropping is not None:
            until = {"$add": ["$$NOW", int(dropping * 1000)]}
            stages.append({"$set": {"dropping": "$prev_rid", "dropping_until": until}})
        else:
            unset = (*unset, "dropping", "dropping_until")
        stages.append({"$unset": [*unset, "_expired"]})
        return stages

    def _link_classic(
        self,
        fields: dict[str, Any],
        event: str | None,
        unset: tuple[str, ...],
        detail: dict[str, Any] | None,
    ) -> dict[str, Any]:
        import datetime

        now = datetime.datetime.now(datetime.timezone.utc)
        rev = self.clock()
        entry = {
            "at": now,
            "event": event or "put",
            "state": "ok",
            "hash": fields["hash"],
            "length": fields["length"],
            "revision": rev,
            **(detail or {}),
        }
        update: dict[str, Any] = {
            "$set": {**fields, "updated_at": now, "rev": rev},
            "$setOnInsert": {"created_at": now},
            "$push": {"events": {"$each": [entry], "$slice": -EVENTS_CAP}},
        }
        if unset:
            update["$unset"] = dict.fromkeys(unset, "")
        return update

    def spilled(self, moved: list[dict[str, Any]]) -> Any:
        """The update of `path_history` that appends events moved from the path document."""
        if not self.pipelines:
            return {"$push": {"events": {"$each": moved, "$slice": -HISTORY_CUT_TO}}}
        events = {"$concatArrays": [{"$ifNull": ["$events", []]}, literal(moved)]}
        return [{"$set": {"events": events}}, *_history_cut()]

    def trim(self, upto: int) -> list[dict[str, Any]]:
        """Drop a path's events up to revision `upto` (moved to its history document)."""
        kept = {
            "$filter": {
                "input": {"$ifNull": ["$events", []]},
                "cond": {"$gt": [{"$ifNull": ["$$this.revision", 0]}, upto]},
            }
        }
        return [{"$set": {"events": kept}}, {"$set": {"n_events": {"$size": "$events"}}}]

    def closing(self, doc: dict[str, Any], event: str, detail: dict[str, Any] | None = None) -> Any:
        """The update of `path_history` when `doc`'s path goes: its events plus the last."""
        kept = path_events(doc)[-EVENTS_CAP:]
        entry: dict[str, Any] = {
            "event": event,
            "state": "ok",
            "hash": doc.get("hash", ""),
            "length": int(doc.get("length", 0)),
            **(detail or {}),
        }
        floor = revision(doc.get("rev")) + 1
        if not self.pipelines:
            import datetime

            entry["at"] = datetime.datetime.now(datetime.timezone.utc)
            entry["revision"] = max(self.clock(), floor)
            return {
                "$set": {"last_rev": entry["revision"]},
                "$push": {"events": {"$each": [*kept, entry], "$slice": -HISTORY_CUT_TO}},
            }
        clock = _CLUSTER_CLOCK if self.mode == "cluster" else _SERVER_MS_CLOCK
        new_entry: dict[str, Any] = {k: literal(v) for k, v in entry.items()}
        new_entry.update({"at": "$$NOW", "revision": "$last_rev"})
        return [
            {"$set": {"last_rev": {"$max": [floor, clock, {"$ifNull": ["$last_rev", 0]}]}}},
            {
                "$set": {
                    "events": {
                        "$concatArrays": [{"$ifNull": ["$events", []]}, literal(kept), [new_entry]]
                    }
                }
            },
            *_history_cut(),
        ]


def _history_cut() -> list[dict[str, Any]]:
    """A history document's last stages: the last-resort cut, and its size for the writer.

    Past HISTORY_KEPT (`n_events`) the writer archives (catalog.archive).
    """
    return [
        {"$set": {"events": _cut(HISTORY_CUT_AT, HISTORY_CUT_TO)}},
        {"$set": {"n_events": {"$size": "$events"}}},
    ]


def _cut(over: int, to: int) -> dict[str, Any]:
    """`events` as they are, or their newest `to` once more than `over`.

    Cut only now and then: a cut shifts the array and is logged whole, while an
    append is logged as what was appended.
    """
    return {
        "$cond": [
            {"$gt": [{"$size": "$events"}, over]},
            {"$slice": ["$events", -to]},
            "$events",
        ]
    }
