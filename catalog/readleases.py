"""Read leases: bytes are not deleted while a reader streams them.

A reader of stored (not inline) content registers a lease on the storage path
before it opens the file, renews it as it fetches chunks, and drops it on
close. Deleting bytes whose last reference went first hides the file from new
readers (`mark_doomed`), then looks for live leases: none, and the bytes go at
once; some, and the last reader to close deletes them (gc catches a reader
that died). The two orders are what make it safe: reader (lease, then open)
and deleter (hide, then look) cannot both miss each other.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

from bson import ObjectId
from pymongo import ASCENDING, WriteConcern
from pymongo.database import Database

from catalog.clock import utcnow

DEFAULT_READ_LEASE = 120.0


class ReadLeases:
    def __init__(self, db: Database[Any], ttl: float = DEFAULT_READ_LEASE) -> None:
        self.ttl = ttl
        self.collection = db["read_leases"].with_options(write_concern=WriteConcern("majority"))
        self._fast = self.collection.with_options(write_concern=WriteConcern(w=1))
        self.collection.create_index([("storage_path", ASCENDING)])
        self.collection.create_index([("until", ASCENDING)], expireAfterSeconds=3600)

    def take(self, storage_path: str, *, durable: bool = True) -> ObjectId:
        """durable=False: acknowledged by the primary alone, for bytes not yet written
        (a lease an upload takes on its own file, which must not wait for a majority
        before its first chunk: a failover that loses the lease loses those chunks too)."""
        lease_id = ObjectId()
        collection = self.collection if durable else self._fast
        doc = {"_id": lease_id, "storage_path": storage_path, "until": self._until()}
        collection.insert_one(doc)
        return lease_id

    def renew(self, lease_id: ObjectId) -> None:
        self.collection.update_one({"_id": lease_id}, {"$set": {"until": self._until()}})

    def drop(self, lease_id: ObjectId) -> str | None:
        """Release a lease; the storage path it covered."""
        doc = self.collection.find_one_and_delete({"_id": lease_id}, {"storage_path": 1})
        return str(doc["storage_path"]) if doc is not None else None

    def live(self, storage_path: str) -> bool:
        query = {"storage_path": storage_path, "until": {"$gt": utcnow()}}
        return self.collection.find_one(query, {"_id": 1}) is not None

    def renewer(self, lease_id: ObjectId) -> Callable[[], None]:
        """A hook for each chunk fetched: renews at most every third of the lease."""
        last = [time.monotonic()]

        def renew() -> None:
            now = time.monotonic()
            if now - last[0] >= self.ttl / 3:
                last[0] = now
                self.renew(lease_id)

        return renew

    def _until(self) -> datetime.datetime:
        return utcnow() + datetime.timedelta(seconds=self.ttl)
