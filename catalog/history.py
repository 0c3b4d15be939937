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
from typing import Any

from bson import ObjectId
from pymongo.collection import Collection

from catalog.clock import utcnow

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
    history.update_one(
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


def upload_in_progress(history: Collection[Any], env_uuid: str, path: str) -> bool:
    query = {
        "env": env_uuid,
        "path": path,
        "events": {"$elemMatch": {"state": "pending", "lease_until": {"$gt": utcnow()}}},
    }
    return history.find_one(query, {"_id": 1}) is not None


def fail_abandoned(history: Collection[Any]) -> int:
    """Pending uploads whose uploader stopped renewing: `failed`. Returns how many."""
    now = utcnow()
    done = history.update_many(
        {"events": {"$elemMatch": {"state": "pending", "lease_until": {"$lte": now}}}},
        {"$set": {"events.$[e].state": "failed"}},
        array_filters=[{"e.state": "pending", "e.lease_until": {"$lte": now}}],
    )
    return int(done.modified_count)


def trim(collections: list[Collection[Any]], days: float) -> int:
    """Drop events older than `days` (retention by age); documents left empty go too."""
    cutoff = utcnow() - datetime.timedelta(days=days)
    changed = 0
    for collection in collections:
        _raise_floors(collection, cutoff)
        done = collection.update_many(
            {"events.at": {"$lt": cutoff}},
            {"$pull": {"events": {"at": {"$lt": cutoff}, "state": {"$ne": "pending"}}}},
        )
        changed += int(done.modified_count)
    collections[-1].delete_many({"events": {"$size": 0}})
    return changed
