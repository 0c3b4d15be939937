"""Pending uploads and retention of the per-path history.

The events of a live path sit in its own document and move to `path_history`
when it goes (catalog.pathdocs). What sits only in `path_history` is what no
path document can hold: an upload still running or one that failed. A large
upload adds a `pending` item there, with a lease its uploader renews, before
its first byte; success removes the item (the path's own create or replace
event is that operation's record), a failure in process turns it `failed`, and
gc turns those whose uploader died (lease run out) `failed` too.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from typing import Any

from bson import ObjectId
from pymongo import WriteConcern
from pymongo.collection import Collection

from catalog.clock import aware, utcnow
from catalog.pathdocs import revision

DEFAULT_HISTORY_DAYS = 30.0
# Per environment, the largest revision that retention has removed (`{_id: env, rev}`):
# changes after it are all still known (catalog.pathevents replays them).
FLOOR_COLLECTION = "history_floor"


def floor(db: Any, env_uuid: str) -> int:
    """The largest revision of `env_uuid` trimmed from the history (0: none)."""
    doc = db[FLOOR_COLLECTION].find_one({"_id": env_uuid}, {"rev": 1})
    return int(doc["rev"]) if doc is not None else 0


def _raise_floors(collection: Collection[Any], cutoff: datetime.datetime) -> None:
    """Before trimming events older than cutoff: each environment's floor is raised to them."""
    trimmed = collection.aggregate(
        [
            {"$match": {"events.at": {"$lt": cutoff}}},
            {"$unwind": "$events"},
            {"$match": {"events.at": {"$lt": cutoff}, "events.state": {"$ne": "pending"}}},
            {"$group": {"_id": "$env", "rev": {"$max": "$events.revision"}}},
        ]
    )
    floors = collection.database[FLOOR_COLLECTION]
    for row in trimmed:
        floors.update_one({"_id": row["_id"]}, {"$max": {"rev": int(row["rev"] or 0)}}, upsert=True)


def start_upload(
    history: Collection[Any], env_uuid: str, path: str, lease: float, *, replacing: bool
) -> ObjectId:
    op = ObjectId()
    now = utcnow()
    # Advisory (its lease decides), like the chunks it announces: written at w=1, so an
    # upload never waits for replication before its first byte. A majority write here
    # blocked every streamed upload while the secondaries lagged (tests/test_failover.py).
    history.with_options(write_concern=WriteConcern(w=1)).update_one(
        {"env": env_uuid, "path": path},
        {
            "$push": {
                "events": {
                    "op": op,
                    "at": now,
                    "event": "upload",
                    "state": "pending",
                    "replacing": replacing,
                    "hash": "",
                    "length": 0,
                    "revision": 0,
                    "lease_until": now + datetime.timedelta(seconds=lease),
                }
            }
        },
        upsert=True,
    )
    return op


def failed_upload(history: Collection[Any], env_uuid: str, path: str) -> None:
    """Record an upload that failed before it wrote a pending item (a small one)."""
    history.with_options(write_concern=WriteConcern(w=1)).update_one(
        {"env": env_uuid, "path": path},
        {
            "$push": {
                "events": {
                    "op": ObjectId(),
                    "at": utcnow(),
                    "event": "upload",
                    "state": "failed",
                    "hash": "",
                    "length": 0,
                    "revision": 0,
                }
            }
        },
        upsert=True,
    )


def renew_upload(
    history: Collection[Any], env_uuid: str, path: str, op: ObjectId, lease: float
) -> None:
    until = utcnow() + datetime.timedelta(seconds=lease)
    history.update_one(
        {"env": env_uuid, "path": path, "events.op": op},
        {"$set": {"events.$.lease_until": until}},
    )


def finish_upload(
    history: Collection[Any], env_uuid: str, path: str, op: ObjectId, *, ok: bool
) -> None:
    if ok:
        history.update_one({"env": env_uuid, "path": path}, {"$pull": {"events": {"op": op}}})
    else:
        history.update_one(
            {"env": env_uuid, "path": path, "events.op": op},
            {"$set": {"events.$.state": "failed", "events.$.at": utcnow()}},
        )


def upload_in_progress(
    history: Collection[Any], env_uuid: str, path: str, *, before: ObjectId | None = None
) -> bool:
    """Whether an upload of the path is running (a live pending item).

    before: only uploads that started before the one with this op count (an
    upload asking about others, once its own pending item is written: of two
    racing create-only uploads, the first goes on and the second is refused).
    """
    pending: dict[str, Any] = {"state": "pending", "lease_until": {"$gt": utcnow()}}
    if before is not None:
        pending["op"] = {"$lt": before}
    query = {"env": env_uuid, "path": path, "events": {"$elemMatch": pending}}
    return history.find_one(query, {"_id": 1}) is not None


def _abandoned(now: datetime.datetime) -> dict[str, Any]:
    return {"events": {"$elemMatch": {"state": "pending", "lease_until": {"$lte": now}}}}


def count_abandoned(history: Collection[Any]) -> int:
    """Paths with a pending upload whose uploader stopped renewing (gc's dry run)."""
    return int(history.count_documents(_abandoned(utcnow())))


def fail_abandoned(history: Collection[Any]) -> int:
    """Pending uploads whose uploader stopped renewing: `failed`. Returns how many.

    One conditional update per upload (still pending, lease still run out), so an
    uploader renewing at the same moment wins; plain positional updates, which
    the in-memory store (mongomock) has too.
    """
    now = utcnow()
    failed = 0
    for doc in history.find(
        _abandoned(now), {"events.op": 1, "events.state": 1, "events.lease_until": 1}
    ):
        for event in doc.get("events") or []:
            until = event.get("lease_until")
            if event.get("state") != "pending" or until is None or aware(until) > now:
                continue
            done = history.update_one(
                {
                    "_id": doc["_id"],
                    "events": {
                        "$elemMatch": {
                            "op": event.get("op"),
                            "state": "pending",
                            "lease_until": {"$lte": now},
                        }
                    },
                },
                {"$set": {"events.$.state": "failed"}},
            )
            failed += int(done.modified_count)
    return failed


def _trimmable(cutoff: datetime.datetime) -> list[dict[str, Any]]:
    return [
        {"$match": {"events.at": {"$lt": cutoff}}},
        {"$unwind": "$events"},
        {"$match": {"events.at": {"$lt": cutoff}, "events.state": {"$ne": "pending"}}},
        {"$group": {"_id": None, "n": {"$sum": 1}}},
    ]


def _count_items(collection: Collection[Any], cutoff: datetime.datetime) -> int:
    return sum(int(row["n"]) for row in collection.aggregate(_trimmable(cutoff)))


def _implied_before(cutoff: datetime.datetime) -> dict[str, Any]:
    """Path documents whose only event is implied and older than cutoff.

    A path made by insert and never changed since stores no `events`: its
    create is implied by `created_at` (`pathdocs.fresh`, `path_events`).
    """
    return {
        "events": {"$exists": False},
        "rev": {"$type": "timestamp"},
        "created_at": {"$lt": cutoff},
    }


def _trim_implied(paths: Collection[Any], cutoff: datetime.datetime) -> int:
    """Drop implied create events past the cutoff as stored ones are dropped.

    The floor first (each environment's newest such revision), then an empty
    `events`, which implies nothing: the path stays, its create goes.
    """
    query = _implied_before(cutoff)
    floors = paths.database[FLOOR_COLLECTION]
    for row in paths.aggregate(
        [{"$match": query}, {"$group": {"_id": "$env", "rev": {"$max": "$rev"}}}]
    ):
        floors.update_one({"_id": row["_id"]}, {"$max": {"rev": revision(row["rev"])}}, upsert=True)
    return int(paths.update_many(query, {"$set": {"events": []}}).modified_count)


def count_trimmable(collections: list[Collection[Any]], days: float) -> int:
    """How many history items `trim(collections, days)` would drop now (gc's dry run)."""
    cutoff = utcnow() - datetime.timedelta(days=days)
    implied = collections[0].count_documents(_implied_before(cutoff)) if collections else 0
    return implied + sum(_count_items(collection, cutoff) for collection in collections)


def trim(collections: list[Collection[Any]], days: float) -> int:
    """Drop events older than `days` (retention by age); documents left empty go too.

    collections: the live paths' first, then those that hold only history
    (`path_history`, `path_archive`), in the order events move between them.

    Returns how many items were dropped: those older than the cutoff before each
    collection's update less those still there after it (none, unless a path was
    deleted or archived meanwhile and its events moved between the collections).
    """
    cutoff = utcnow() - datetime.timedelta(days=days)
    removed = _trim_implied(collections[0], cutoff) if collections else 0
    for collection in collections:
        _raise_floors(collection, cutoff)
        before = _count_items(collection, cutoff)
        if not before:
            continue
        collection.update_many(
            {"events.at": {"$lt": cutoff}},
            {"$pull": {"events": {"at": {"$lt": cutoff}, "state": {"$ne": "pending"}}}},
        )
        removed += before - _count_items(collection, cutoff)
    for collection in collections[1:]:  # path documents stay, however few their events
        collection.delete_many({"events": {"$size": 0}})
    return removed


def items(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A path's events as the contract shows them, oldest first.

    `{"at", "event", "state", "hash", "length", "revision"}` with `at` as RFC 3339
    UTC. The path's own events come in revision order; uploads that failed or
    are still running (revision 0) are placed among them by time.
    """
    ops = [e for e in events if e.get("event") != "upload"]
    uploads = sorted((e for e in events if e.get("event") == "upload"), key=lambda e: e["at"])
    ordered: list[dict[str, Any]] = []
    for op in ops:
        while uploads and uploads[0]["at"] < op["at"]:
            ordered.append(uploads.pop(0))
        ordered.append(op)
    ordered.extend(uploads)
    now = utcnow()
    return [item(e, now) for e in ordered]


def item(event: dict[str, Any], now: datetime.datetime) -> dict[str, Any]:
    """One event as the contract shows it (`now`: for uploads whose lease ran out)."""
    return {
        "at": rfc3339(event["at"]),
        "event": str(event.get("event", "")),
        "state": shown_state(event, now),
        "hash": str(event.get("hash") or ""),
        "length": int(event.get("length") or 0),
        "revision": int(event.get("revision") or 0),
    }


def shown(ordered: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Events already in order (`ManagedStorage.iter_history`) as the contract shows them."""
    now = utcnow()
    for event in ordered:
        yield item(event, now)


def json_items(ordered: Iterator[dict[str, Any]], *, per_piece: int = 512) -> Iterator[bytes]:
    """`{"items": [...]}` of events already in order, in pieces of `per_piece` items.

    The HTTP history answer: a hot key's history may be long, and is sent as
    it is read, never held whole.
    """
    yield b'{"items":['
    first = True
    batch: list[str] = []
    for shown_item in shown(ordered):
        batch.append(json.dumps(shown_item, separators=(",", ":")))
        if len(batch) >= per_piece:
            yield (b"" if first else b",") + ",".join(batch).encode()
            first, batch = False, []
    if batch:
        yield (b"" if first else b",") + ",".join(batch).encode()
    yield b"]}"


def shown_state(event: dict[str, Any], now: datetime.datetime) -> str:
    """An upload still `pending` whose lease ran out is shown `failed`.

    Its uploader died (nobody renews the lease, nobody marks it failed); gc
    rewrites it `failed` later, but readers must not see it running until then.
    """
    state = str(event.get("state", "ok"))
    until = event.get("lease_until")
    if state == "pending" and until is not None and aware(until) <= now:
        return "failed"
    return state


def rfc3339(at: datetime.datetime) -> str:
    """An aware datetime as RFC 3339 UTC with milliseconds (`...Z`)."""
    utc = at.astimezone(datetime.timezone.utc)
    return utc.isoformat(timespec="milliseconds").replace("+00:00", "Z")
