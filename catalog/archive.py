"""A path's older history, in bucket documents of `path_archive`.

The contract keeps history by age (`--history-days`), not by count. A path's
history document (`path_history`) is rewritten by each spill and closing of
that path, so it must stay small; a writer that finds one past HISTORY_KEPT
events moves all but the newest HISTORY_CAP into a new bucket
`{env, path, first_rev, last_rev, events}`. Copied first and dropped after,
as spills are: a crash in between leaves events in both (readers show them
once), never in neither. Buckets are inserted once and only ever trimmed by
age (catalog.history.trim), so a hot key's past costs its later writes
nothing.

Uploads still running stay in the history document, where their uploader
renews and finishes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pymongo import ASCENDING, WriteConcern
from pymongo.collection import Collection

from catalog.pathdocs import HISTORY_CAP, HISTORY_KEPT

COLLECTION = "path_archive"


def archive_collection(db: Any) -> Collection[Any]:
    """`path_archive`, with the index its readers use (a path's buckets, by revision)."""
    archive: Collection[Any] = db[COLLECTION].with_options(write_concern=WriteConcern("majority"))
    archive.create_index([("env", ASCENDING), ("path", ASCENDING), ("last_rev", ASCENDING)])
    return archive


def archive_old(
    history: Collection[Any], archive: Collection[Any], env_uuid: str, path: str
) -> int:
    """Move all but the newest HISTORY_CAP events of a full history document; how many."""
    doc = history.find_one({"env": env_uuid, "path": path}, {"events": 1})
    events = list((doc or {}).get("events") or [])
    if doc is None or len(events) <= HISTORY_KEPT:
        return 0
    moved = [e for e in events[: len(events) - HISTORY_CAP] if e.get("state") != "pending"]
    revisions = [int(e["revision"]) for e in moved if e.get("revision")]
    ops = [e["op"] for e in moved if not e.get("revision") and "op" in e]
    if not revisions and not ops:
        return 0
    archive.insert_one(
        {
            "env": env_uuid,
            "path": path,
            "first_rev": min(revisions, default=0),
            "last_rev": max(revisions, default=0),
            "events": moved,
        }
    )
    # A path's revisions only grow, so a revision names one event of it (and its copies
    # from a spill cut short); uploads that made no revision are named by their op.
    if revisions:
        history.update_one(
            {"_id": doc["_id"]}, {"$pull": {"events": {"revision": {"$in": revisions}}}}
        )
    if ops:
        history.update_one({"_id": doc["_id"]}, {"$pull": {"events": {"op": {"$in": ops}}}})
    return len(moved)


def bucket_events(
    archive: Collection[Any], env_uuid: str, path: str
) -> Iterator[list[dict[str, Any]]]:
    """The events of one path's buckets, a bucket at a time, oldest bucket first."""
    query = {"env": env_uuid, "path": path}
    for doc in archive.find(query, {"events": 1}, sort=[("last_rev", ASCENDING)]):
        yield list(doc.get("events") or [])


def archived_uploads(archive: Collection[Any], env_uuid: str, path: str) -> list[dict[str, Any]]:
    """The uploads among one path's archived events (failed ones: few), without the rest."""
    only = {"$filter": {"input": "$events", "cond": {"$eq": ["$$this.event", "upload"]}}}
    found = archive.aggregate(
        [{"$match": {"env": env_uuid, "path": path}}, {"$project": {"_id": 0, "events": only}}]
    )
    return [e for doc in found for e in doc.get("events") or []]


def buckets_since(
    archive: Collection[Any], query: dict[str, Any], since: int
) -> Iterator[dict[str, Any]]:
    """Buckets (`path`, `events`) of the paths `query` matches with events above `since`."""
    yield from archive.find({**query, "last_rev": {"$gt": since}}, {"path": 1, "events": 1})
