"""Statistics of the whole catalog: counts, logical and physical bytes, per environment.

A pure library function over a ManagedStorage that returns dataclasses; the
CLI only formats them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from catalog.clock import utcnow
from catalog.managed import ManagedStorage
from catalog.resources import READY
from catalog.scan import aggregate, maybe_store


# -- statistics -----------------------------------------------------------------
@dataclass(frozen=True)
class EnvSummary:
    """One environment: its paths and the bytes they name."""

    env: str
    paths: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"env": self.env, "paths": self.paths, "bytes": self.bytes}


@dataclass(frozen=True)
class EnvStats:
    """One environment's share: logical bytes (per path) and the distinct content it uses."""

    env: str
    paths: int
    logical_bytes: int
    resources: int
    physical_bytes: int

    @property
    def dedup_ratio(self) -> float | None:
        return _ratio(self.logical_bytes, self.physical_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "paths": self.paths,
            "logical_bytes": self.logical_bytes,
            "resources": self.resources,
            "physical_bytes": self.physical_bytes,
            "dedup_ratio": self.dedup_ratio,
        }


@dataclass(frozen=True)
class Stats:
    """The catalog in numbers.

    `logical_bytes` sums the length over every path; `physical_bytes` sums the
    length of every ready resource, each stored once. `stored_files` /
    `stored_bytes` count what GridFS holds (orphans included). The database's
    own figures (`storage_size`, `free_storage_size`, from dbStats) show what
    the files on disk take: gc frees logical bytes, only `compact` shrinks files.
    """

    resources: int
    pending: int
    paths: int
    environments: int
    logical_bytes: int
    physical_bytes: int
    stored_files: int
    stored_bytes: int
    data_size: int | None = None
    storage_size: int | None = None
    free_storage_size: int | None = None
    by_env: tuple[EnvStats, ...] | None = None

    @property
    def dedup_ratio(self) -> float | None:
        return _ratio(self.logical_bytes, self.physical_bytes)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "resources": self.resources,
            "pending": self.pending,
            "paths": self.paths,
            "environments": self.environments,
            "logical_bytes": self.logical_bytes,
            "physical_bytes": self.physical_bytes,
            "dedup_ratio": self.dedup_ratio,
            "stored_files": self.stored_files,
            "stored_bytes": self.stored_bytes,
            "data_size": self.data_size,
            "storage_size": self.storage_size,
            "free_storage_size": self.free_storage_size,
        }
        if self.by_env is not None:
            data["by_env"] = [e.to_dict() for e in self.by_env]
        return data


def _ratio(logical: int, physical: int) -> float | None:
    return round(logical / physical, 4) if physical else None


def _live() -> dict[str, Any]:
    """Paths every read sees: not a TTL key past its expiry (gc has not reclaimed it yet)."""
    return {"$match": {"expires_at": {"$not": {"$lte": utcnow()}}}}


def environments(managed: ManagedStorage) -> list[EnvSummary]:
    """Every environment that has live paths, sorted, with its path count and bytes."""
    pipeline: list[dict[str, Any]] = [
        _live(),
        {"$group": {"_id": "$env", "paths": {"$sum": 1}, "bytes": {"$sum": "$length"}}},
        {"$sort": {"_id": 1}},
    ]
    return [
        EnvSummary(doc["_id"], int(doc["paths"]), int(doc["bytes"]))
        for doc in aggregate(managed.paths, pipeline)
    ]


def stats(managed: ManagedStorage, *, by_env: bool = False) -> Stats:
    """Counts and byte totals of the whole catalog (and per environment with `by_env`)."""
    entries = managed.catalog.collection
    resources = pending = physical = 0
    for doc in aggregate(
        entries,
        [
            {
                "$group": {
                    "_id": {"$eq": ["$state", READY]},
                    "n": {"$sum": 1},
                    "bytes": {"$sum": "$length"},
                }
            }
        ],
    ):
        if doc["_id"]:
            resources, physical = int(doc["n"]), int(doc["bytes"])
        else:
            pending = int(doc["n"])
    envs = environments(managed)
    stored_files = stored_bytes = 0
    store = maybe_store(managed)
    if store is not None:
        stored_files, stored_bytes = store.totals()
    db_stats: dict[str, Any] = {}
    try:
        db_stats = managed.db.command("dbStats", freeStorage=1)
    except Exception:  # mongomock, or a user without the privilege: figures stay unknown
        db_stats = {}
    per_env: tuple[EnvStats, ...] | None = None
    if by_env:
        pipeline: list[dict[str, Any]] = [
            _live(),
            {
                "$group": {
                    "_id": {"env": "$env", "rid": "$resource_id"},
                    "n": {"$sum": 1},
                    "bytes": {"$sum": "$length"},
                    "len": {"$first": "$length"},
                }
            },
            {
                "$group": {
                    "_id": "$_id.env",
                    "paths": {"$sum": "$n"},
                    "logical": {"$sum": "$bytes"},
                    "resources": {"$sum": 1},
                    "physical": {"$sum": "$len"},
                }
            },
            {"$sort": {"_id": 1}},
        ]
        per_env = tuple(
            EnvStats(
                d["_id"],
                int(d["paths"]),
                int(d["logical"]),
                int(d["resources"]),
                int(d["physical"]),
            )
            for d in aggregate(managed.paths, pipeline)
        )
    return Stats(
        resources=resources,
        pending=pending,
        paths=sum(e.paths for e in envs),
        environments=len(envs),
        logical_bytes=sum(e.bytes for e in envs),
        physical_bytes=physical,
        stored_files=stored_files,
        stored_bytes=stored_bytes,
        data_size=_int_or_none(db_stats.get("dataSize")),
        storage_size=_int_or_none(db_stats.get("storageSize")),
        free_storage_size=_int_or_none(db_stats.get("freeStorageSize")),
        by_env=per_env,
    )


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None
