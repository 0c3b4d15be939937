"""Whole-catalog operations: statistics, environment listing, fsck and gc.

Pure library functions over a ManagedStorage that return dataclasses; the CLI
only formats them.

Safety of `gc` while uploads run rests on four rules:

* Bytes that no catalog entry points at are reclaimed only once they are older
  than a grace period. For a stored file that is its uploadDate (written at
  the commit point, a moment before the catalog records the path); for chunks
  without a files document it is the *last activity* of the upload: the
  newest of the files_id ObjectId (upload start) and the ObjectId of the
  highest-numbered chunk (its last batch), so a long upload that keeps writing
  is never touched, however long ago it started. A stored file whose hash is
  that of a pending entry whose uploader's lease is live is also left alone.
* A pending entry is deleted only by a conditional delete on "still pending
  and lease expired", so an uploader that renews its lease (or takes a new
  reference) at the same moment wins; and only when no path references it.
* Reference counts are recounted only for ready entries whose lease has run
  out (no uploader holds an unlinked reference), inside a transaction that
  writes the entry document, so it conflicts with every concurrent change
  that alters the count.
* A path whose catalog entry is gone is repaired (the entry rebuilt from a
  stored file with the same hash, or the path repointed at the entry that now
  holds that hash) before anything unreferenced is deleted, and a stored file
  that could still repair a path is never deleted.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import blake3
from bson import ObjectId
from pymongo.client_session import ClientSession
from pymongo.errors import OperationFailure

from catalog.clock import aware, utcnow
from catalog.errors import CatalogError, NotFoundError
from catalog.managed import ManagedStorage
from catalog.resources import READY, Resource, to_resource
from storage.gridfs_storage import StoredFile

DEFAULT_GC_GRACE = 3600.0
DEFAULT_FSCK_GRACE = 60.0
BATCH = 500
READ_BLOCK = 1024 * 1024
# ObjectId timestamps are whole seconds, truncated: add one so an age is never overstated.
_OID_SLACK = datetime.timedelta(seconds=1)

T = TypeVar("T")


# -- progress -----------------------------------------------------------------
class ProgressBar(Protocol):
    def update(self, n: float | None = 1) -> Any: ...

    def close(self) -> Any: ...


BarFactory = Callable[[int | None, str, str], ProgressBar]
"""(total, description, unit) -> a bar; `cli.progress.bar` has this signature."""


class _NoBar:
    def update(self, n: float | None = 1) -> None:
        return None

    def close(self) -> None:
        return None


def _no_bar(total: int | None, desc: str, unit: str) -> ProgressBar:
    return _NoBar()


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


def environments(managed: ManagedStorage) -> list[EnvSummary]:
    """Every environment that has paths, sorted, with its path count and bytes."""
    pipeline: list[dict[str, Any]] = [
        {"$group": {"_id": "$env", "paths": {"$sum": 1}, "bytes": {"$sum": "$length"}}},
        {"$sort": {"_id": 1}},
    ]
    return [
        EnvSummary(doc["_id"], int(doc["paths"]), int(doc["bytes"]))
        for doc in _aggregate(managed.paths, pipeline)
    ]


def stats(managed: ManagedStorage, *, by_env: bool = False) -> Stats:
    """Counts and byte totals of the whole catalog (and per environment with `by_env`)."""
    entries = managed.catalog.collection
    resources = pending = physical = 0
    for doc in _aggregate(
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
    store = _maybe_store(managed)
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
            for d in _aggregate(managed.paths, pipeline)
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


# -- the byte store, as gc and fsck see it --------------------------------------
FileInfo = StoredFile


class _Store:
    """What gc and fsck need of a resource storage: GridFSStorage's inspection methods."""

    NEEDED = (
        "iter_files",
        "file_exists",
        "totals",
        "stat",
        "get",
        "remove_file",
        "orphan_chunk_file_ids",
        "last_write",
        "chunk_usage",
        "chunk_problems",
    )

    def __init__(self, storage: Any) -> None:
        missing = [name for name in self.NEEDED if not hasattr(storage, name)]
        if missing:
            raise CatalogError(
                f"gc and fsck need a GridFS resource storage ({type(storage).__name__} "
                f"lacks {', '.join(missing)})"
            )
        self.storage = storage

    def iter_files(self) -> Iterator[FileInfo]:
        return iter(self.storage.iter_files())

    def file_exists(self, file_id: Any) -> bool:
        return bool(self.storage.file_exists(file_id))

    def totals(self) -> tuple[int, int]:
        files, size = self.storage.totals()
        return int(files), int(size)

    def stat(self, path: str) -> FileInfo | None:
        try:
            return cast(FileInfo, self.storage.stat(path))
        except NotFoundError:
            return None

    def orphan_chunk_ids(self) -> list[Any]:
        return list(self.storage.orphan_chunk_file_ids())

    def last_activity(self, files_id: Any) -> datetime.datetime | None:
        """When chunks of `files_id` were last written, plus slack for clock granularity."""
        when = self.storage.last_write(files_id)
        return aware(when) + _OID_SLACK if when is not None else None

    def chunk_usage(self, files_id: Any) -> tuple[int, int]:
        chunks, size = self.storage.chunk_usage(files_id)
        return int(chunks), int(size)

    def chunk_problems(self, info: FileInfo) -> list[str]:
        return list(self.storage.chunk_problems(info))

    def remove_file(self, file_id: Any) -> None:
        """Delete a files document and its chunks (also works for chunks alone)."""
        self.storage.remove_file(file_id)

    def content_hash(self, path: str, bar: ProgressBar) -> str:
        """BLAKE3 of the stored bytes at `path`, streamed."""
        import blake3

        hasher = blake3.blake3()
        reader = self.storage.get(path)
        try:
            if hasattr(reader, "iter_chunks"):
                pieces: Iterable[bytes] = reader.iter_chunks()
            else:
                pieces = iter(lambda: reader.read(READ_BLOCK), b"")
            for piece in pieces:
                hasher.update(piece)
                bar.update(len(piece))
        finally:
            reader.close()
        return str(hasher.hexdigest())


def _maybe_store(managed: ManagedStorage) -> _Store | None:
    try:
        return _Store(managed.resource_storage)
    except CatalogError:
        return None


# -- fsck -----------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One inconsistency. `kind` is a stable snake_case name; `subject` says what it concerns."""

    kind: str
    subject: str
    detail: str
    env: str | None = None
    path: str | None = None
    resource_id: str | None = None
    hash: str | None = None
    file_id: str | None = None
    bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "subject": self.subject, "detail": self.detail}
        for key in ("env", "path", "resource_id", "hash", "file_id", "bytes"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        return data

    def __str__(self) -> str:
        return f"{self.kind}: {self.subject}: {self.detail}"


PROBLEM_KINDS = (
    "dangling_path",  # a path's resource does not exist
    "path_to_pending",  # a path's resource is not ready
    "path_mismatch",  # a path's recorded hash/length differ from its resource's
    "refcount_mismatch",  # refcount != number of paths (and no uploader holds a reference)
    "abandoned_pending",  # a pending entry whose uploader's lease ran out
    "missing_file",  # a ready resource has no stored file
    "length_mismatch",  # the stored file's length is not the resource's
    "hash_mismatch",  # the stored file's recorded BLAKE3 is not the resource's
    "missing_chunk",  # chunks missing from a stored file
    "bad_chunk",  # a chunk of the wrong size, or beyond the end
    "corrupt_content",  # the stored bytes do not hash to the resource's hash
    "orphan_file",  # a stored file no catalog entry points at
    "orphan_chunks",  # chunks without a files document
)


@dataclass(frozen=True)
class FsckReport:
    problems: tuple[Problem, ...]
    resources: int
    paths: int
    files: int
    bytes_verified: int = 0
    in_flight: int = 0
    verify_content: bool = False

    @property
    def clean(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for problem in self.problems:
            counts[problem.kind] = counts.get(problem.kind, 0) + 1
        return counts

    def kinds(self) -> set[str]:
        return {p.kind for p in self.problems}

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "problems": [p.to_dict() for p in self.problems],
            "counts": self.counts(),
            "checked": {
                "resources": self.resources,
                "paths": self.paths,
                "files": self.files,
                "bytes_verified": self.bytes_verified,
                "verify_content": self.verify_content,
            },
            "in_flight": self.in_flight,
        }


def fsck(
    managed: ManagedStorage,
    *,
    verify_content: bool = False,
    grace: float = DEFAULT_FSCK_GRACE,
    progress: BarFactory | None = None,
) -> FsckReport:
    """Find every inconsistency between paths, catalog entries and stored bytes.

    Unreferenced bytes younger than `grace` seconds and entries an uploader
    holds a live lease on are in-flight uploads, counted in `in_flight`, not
    problems. What looks wrong is checked a second time before it is reported,
    so a concurrent change does not show up as a false positive.
    """
    bar_for = progress or _no_bar
    store = _Store(managed.resource_storage)
    cutoff = utcnow() - datetime.timedelta(seconds=grace)
    problems: list[Problem] = []
    in_flight = 0

    # 1. catalog entries: references and the stored files they point at
    entries = managed.catalog.collection
    n_resources = 0
    verify_bar: ProgressBar = _NoBar()
    if verify_content:
        total = sum(
            int(d["bytes"])
            for d in _aggregate(
                entries,
                [
                    {"$match": {"state": READY}},
                    {"$group": {"_id": None, "bytes": {"$sum": "$length"}}},
                ],
            )
        )
        verify_bar = bar_for(total, "verify content", "B")
    bytes_verified = 0
    # With --verify-content the byte bar is the one worth watching: show only that one.
    scan = (
        _NoBar()
        if verify_content
        else bar_for(entries.estimated_document_count(), "check resources", "entries")
    )
    try:
        for batch in _batches(entries.find({}), BATCH):
            counts = _path_counts(managed, [doc["_id"] for doc in batch])
            for doc in batch:
                n_resources += 1
                scan.update(1)
                found, flying, verified = _check_entry(
                    managed, store, doc, counts.get(doc["_id"], 0), verify_content, verify_bar
                )
                problems.extend(found)
                in_flight += flying
                bytes_verified += verified
    finally:
        scan.close()
        verify_bar.close()

    # 2. paths: each must point at an existing, ready resource with its hash and length
    n_paths = 0
    scan = bar_for(managed.paths.estimated_document_count(), "check paths", "paths")
    try:
        for batch in _batches(managed.paths.find({}), BATCH):
            rids = list({doc["resource_id"] for doc in batch})
            known = {
                d["_id"]: d
                for d in entries.find(
                    {"_id": {"$in": rids}}, {"state": 1, "hash": 1, "length": 1, "path": 1}
                )
            }
            for doc in batch:
                n_paths += 1
                scan.update(1)
                problem = _check_path(doc, known.get(doc["resource_id"]))
                if problem is not None and problem.kind == "dangling_path":
                    problem = _recheck_dangling(managed, doc, problem)
                if problem is not None:
                    problems.append(problem)
    finally:
        scan.close()

    # 3. stored files no entry points at
    n_files = store.totals()[0]
    scan = bar_for(n_files, "check files", "files")
    try:
        for info in _unreferenced_files(managed, store, scan):
            if info.upload_date > cutoff or _live_pending(managed, info.blake3):
                in_flight += 1
                continue
            if entries.find_one({"path": info.path}, {"_id": 1}) is not None:
                continue  # referenced meanwhile
            if not store.file_exists(info.file_id):
                continue  # its entry's removal deleted it meanwhile
            problems.append(
                Problem(
                    "orphan_file",
                    f"file {info.file_id} {info.path!r}",
                    f"{info.length} bytes stored since {_iso(info.upload_date)}, "
                    "no catalog entry points at it",
                    hash=info.blake3,
                    file_id=str(info.file_id),
                    bytes=info.length,
                )
            )
    finally:
        scan.close()

    # 4. chunks without a files document
    for files_id in store.orphan_chunk_ids():
        last = store.last_activity(files_id)
        if last is not None and last > cutoff:
            in_flight += 1
            continue
        if store.file_exists(files_id):
            continue  # committed meanwhile
        chunks, size = store.chunk_usage(files_id)
        if not chunks:
            continue
        when = f"last written {_iso(last)}" if last is not None else "age unknown"
        problems.append(
            Problem(
                "orphan_chunks",
                f"chunks of {files_id}",
                f"{chunks} chunks, {size} bytes without a files document ({when})",
                file_id=str(files_id),
                bytes=size,
            )
        )

    return FsckReport(
        problems=tuple(problems),
        resources=n_resources,
        paths=n_paths,
        files=n_files,
        bytes_verified=bytes_verified,
        in_flight=in_flight,
        verify_content=verify_content,
    )


def _check_entry(
    managed: ManagedStorage,
    store: _Store,
    doc: dict[str, Any],
    n_paths: int,
    verify_content: bool,
    verify_bar: ProgressBar,
) -> tuple[list[Problem], int, int]:
    """Problems of one catalog entry, in-flight count, bytes re-hashed."""
    res = to_resource(doc)
    subject = f"resource {res.id} (blake3:{res.hash})"
    found: list[Problem] = []

    def problem(kind: str, detail: str, **extra: Any) -> None:
        found.append(Problem(kind, subject, detail, resource_id=res.id, hash=res.hash, **extra))

    if res.pending:
        if not res.lease_expired():
            return [], 1, 0
        if n_paths == 0:
            problem(
                "abandoned_pending",
                f"pending since {_iso(res.created_at)}, uploader's lease expired "
                f"{_iso(res.lease_until)}, {res.refcount} references",
            )
        return found, 0, 0

    if n_paths != res.refcount:
        if n_paths < res.refcount and not res.lease_expired():
            return_flying = 1  # an uploader holds a reference it has not linked yet
        else:
            recount = _snapshot_refcount(managed, doc["_id"])
            return_flying = 0
            if recount is not None and recount[0] != recount[1]:
                refcount, paths = recount
                problem(
                    "refcount_mismatch",
                    f"refcount {refcount}, but {paths} paths reference it",
                )
    else:
        return_flying = 0

    if res.inline:
        verified = _check_inline(res, doc, problem, verify_content, verify_bar)
        return found, return_flying, verified
    stored = store.stat(res.path) if res.path else None
    if stored is None:
        if _entry_still(managed, doc):
            problem("missing_file", f"no stored file at {res.path!r}", bytes=res.length)
        return found, return_flying, 0
    file_id = str(stored.file_id)
    if stored.length != res.length:
        problem(
            "length_mismatch",
            f"stored file {res.path!r} has {stored.length} bytes, the entry says {res.length}",
            file_id=file_id,
        )
    if stored.blake3 and stored.blake3 != res.hash:
        problem(
            "hash_mismatch",
            f"stored file {res.path!r} records hash {stored.blake3}",
            file_id=file_id,
        )
    chunk_issues = store.chunk_problems(stored) if stored.chunk_size > 0 else ["no chunk size"]
    if chunk_issues and not store.file_exists(stored.file_id):
        return found, return_flying, 0  # removed meanwhile: files document first, then chunks
    if chunk_issues:
        missing = [c for c in chunk_issues if "missing" in c]
        other = [c for c in chunk_issues if "missing" not in c]
        if missing:
            problem("missing_chunk", f"{res.path!r}: " + "; ".join(missing), file_id=file_id)
        if other:
            problem("bad_chunk", f"{res.path!r}: " + "; ".join(other), file_id=file_id)
    verified = 0
    if verify_content and not chunk_issues and stored.length == res.length:
        try:
            digest = store.content_hash(res.path, verify_bar)
        except NotFoundError:
            return found, return_flying, 0  # deleted meanwhile
        except CatalogError as exc:
            if store.file_exists(stored.file_id):
                problem("corrupt_content", f"{res.path!r} cannot be read: {exc}", file_id=file_id)
            return found, return_flying, 0
        verified = stored.length
        if digest != res.hash and store.file_exists(stored.file_id):
            problem(
                "corrupt_content",
                f"stored bytes at {res.path!r} hash to {digest}",
                file_id=file_id,
            )
    return found, return_flying, verified


def _check_inline(
    res: Resource,
    doc: dict[str, Any],
    problem: Callable[..., None],
    verify_content: bool,
    verify_bar: ProgressBar,
) -> int:
    """Small content lives in its entry: check its length, and re-hash it when asked."""
    data = doc.get("data")
    if data is None:
        problem("missing_file", "the entry has no inline bytes", bytes=res.length)
        return 0
    if len(data) != res.length:
        problem(
            "length_mismatch", f"inline bytes are {len(data)} long, the entry says {res.length}"
        )
        return 0
    if not verify_content:
        return 0
    verify_bar.update(len(data))
    digest = blake3.blake3(bytes(data)).hexdigest()
    if digest != res.hash:
        problem("corrupt_content", f"inline bytes hash to {digest}")
    return len(data)


def _check_path(doc: dict[str, Any], entry: dict[str, Any] | None) -> Problem | None:
    env, path = doc["env"], doc["path"]
    rid = str(doc["resource_id"])
    subject = f"{env}:{path}"

    def problem(kind: str, detail: str) -> Problem:
        return Problem(kind, subject, detail, env=env, path=path, resource_id=rid, hash=doc["hash"])

    if entry is None:
        return problem("dangling_path", f"its resource {rid} (blake3:{doc['hash']}) does not exist")
    if entry.get("state", READY) != READY:
        return problem("path_to_pending", f"its resource {rid} is {entry.get('state')}")
    if entry["hash"] != doc["hash"] or int(entry["length"]) != int(doc["length"]):
        return problem(
            "path_mismatch",
            f"path records blake3:{doc['hash']} ({doc['length']} bytes), its resource "
            f"blake3:{entry['hash']} ({entry['length']} bytes)",
        )
    return None


def _recheck_dangling(
    managed: ManagedStorage, doc: dict[str, Any], problem: Problem
) -> Problem | None:
    """Still dangling in one consistent snapshot? (a removal may have raced the scan)"""

    def read(session: ClientSession | None, doomed: list[str]) -> bool:
        now = managed.paths.find_one({"_id": doc["_id"]}, {"resource_id": 1}, session=session)
        if now is None:
            return False
        return (
            managed.catalog.collection.find_one(
                {"_id": now["resource_id"]}, {"_id": 1}, session=session
            )
            is None
        )

    return problem if managed.transact(read) else None


def _snapshot_refcount(managed: ManagedStorage, oid: Any) -> tuple[int, int] | None:
    """(refcount, paths) of a ready entry whose lease has run out, read in one snapshot."""

    def read(session: ClientSession | None, doomed: list[str]) -> tuple[int, int] | None:
        doc = managed.catalog.collection.find_one({"_id": oid}, session=session)
        if doc is None:
            return None
        n = managed.paths.count_documents({"resource_id": oid}, session=session)
        refcount = int(doc.get("refcount", 0))
        res = to_resource(doc)
        if res.pending or (n < refcount and not res.lease_expired()):
            return None
        return refcount, n

    return managed.transact(read)


def _entry_still(managed: ManagedStorage, doc: dict[str, Any]) -> bool:
    """The entry still exists, ready, with the same storage path."""
    return (
        managed.catalog.collection.find_one(
            {"_id": doc["_id"], "state": READY, "path": doc.get("path", "")}, {"_id": 1}
        )
        is not None
    )


# -- gc ---------------------------------------------------------------------------
@dataclass
class GcReport:
    """What gc reclaimed (or, with dry_run, would reclaim)."""

    dry_run: bool
    grace: float
    expired_requests: int = 0
    abandoned_pending: int = 0
    refcounts_fixed: int = 0
    unreferenced_entries: int = 0
    unreferenced_bytes: int = 0
    restored_entries: int = 0
    repointed_paths: int = 0
    orphan_files: int = 0
    orphan_file_bytes: int = 0
    orphan_chunk_files: int = 0
    orphan_chunks: int = 0
    orphan_chunk_bytes: int = 0
    in_flight: int = 0
    actions: list[str] = field(default_factory=list)

    @property
    def entries(self) -> int:
        """Catalog entries deleted: abandoned uploads and content no path references."""
        return self.abandoned_pending + self.unreferenced_entries

    @property
    def bytes(self) -> int:
        """Stored bytes deleted."""
        return self.unreferenced_bytes + self.orphan_file_bytes + self.orphan_chunk_bytes

    @property
    def changed(self) -> bool:
        return bool(
            self.entries
            or self.bytes
            or self.orphan_files
            or self.orphan_chunks
            or self.expired_requests
            or self.refcounts_fixed
            or self.restored_entries
            or self.repointed_paths
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "grace": self.grace,
            "entries": self.entries,
            "bytes": self.bytes,
            "expired_requests": self.expired_requests,
            "abandoned_pending": self.abandoned_pending,
            "refcounts_fixed": self.refcounts_fixed,
            "unreferenced_entries": self.unreferenced_entries,
            "unreferenced_bytes": self.unreferenced_bytes,
            "restored_entries": self.restored_entries,
            "repointed_paths": self.repointed_paths,
            "orphan_files": self.orphan_files,
            "orphan_file_bytes": self.orphan_file_bytes,
            "orphan_chunk_files": self.orphan_chunk_files,
            "orphan_chunks": self.orphan_chunks,
            "orphan_chunk_bytes": self.orphan_chunk_bytes,
            "in_flight": self.in_flight,
            "actions": list(self.actions),
        }


def gc(
    managed: ManagedStorage,
    *,
    grace: float = DEFAULT_GC_GRACE,
    dry_run: bool = False,
    progress: BarFactory | None = None,
) -> GcReport:
    """Reclaim what nothing references; safe while uploads run (see the module doc).

    In order: expired proof requests; abandoned pending entries; paths whose
    entry is gone (rebuilt or repointed when the bytes are still there);
    reference counts that drifted (recounted, entries at zero deleted with their
    bytes); stored files no entry points at; chunks without a files document.
    """
    if grace < 0:
        raise CatalogError(f"grace must be >= 0 seconds, not {grace}")
    bar_for = progress or _no_bar
    store = _Store(managed.resource_storage)
    report = GcReport(dry_run=dry_run, grace=grace)
    cutoff = utcnow() - datetime.timedelta(seconds=grace)

    _gc_requests(managed, report)
    _gc_abandoned(managed, report)
    scan = bar_for(store.totals()[0], "scan files", "files")
    try:
        orphans = list(_unreferenced_files(managed, store, scan))
    finally:
        scan.close()
    protected = _gc_dangling(managed, orphans, cutoff, report, bar_for)
    _gc_refcounts(managed, report, bar_for)
    _gc_orphan_files(managed, store, orphans, cutoff, protected, report)
    _gc_orphan_chunks(store, cutoff, report)
    return report


def _gc_requests(managed: ManagedStorage, report: GcReport) -> None:
    query = {"expires_at": {"$lt": utcnow()}}
    if report.dry_run:
        report.expired_requests = managed.requests.count_documents(query)
    else:
        report.expired_requests = managed.requests.delete_many(query).deleted_count
    if report.expired_requests:
        report.actions.append(f"expired put requests: {report.expired_requests}")


def _abandoned_query(now: datetime.datetime) -> dict[str, Any]:
    return {
        "state": {"$ne": READY},
        "path": "",
        "$or": [{"lease_until": {"$lt": now}}, {"lease_until": None}],
    }


def _gc_abandoned(managed: ManagedStorage, report: GcReport) -> None:
    entries = managed.catalog.collection
    for doc in entries.find(_abandoned_query(utcnow()), {"_id": 1, "hash": 1}):
        oid = doc["_id"]
        if managed.paths.count_documents({"resource_id": oid}, limit=1):
            continue  # a path points at it: fsck reports that, gc leaves it alone
        if not report.dry_run:
            # Conditional: an uploader that renewed its lease (or a new reference,
            # which sets a fresh lease) since the scan wins.
            gone = entries.delete_one({"_id": oid, **_abandoned_query(utcnow())})
            if not gone.deleted_count:
                continue
        report.abandoned_pending += 1
        report.actions.append(f"abandoned pending entry {oid} (blake3:{doc['hash']})")


def _unreferenced_files(
    managed: ManagedStorage, store: _Store, bar: ProgressBar
) -> Iterator[FileInfo]:
    """Stored files whose filename is no catalog entry's path (at the time of the scan)."""
    entries = managed.catalog.collection
    for batch in _batches(store.iter_files(), BATCH):
        names = list({info.path for info in batch})
        known = {d["path"] for d in entries.find({"path": {"$in": names}}, {"path": 1})}
        for info in batch:
            bar.update(1)
            if info.path not in known:
                yield info


def _live_pending(managed: ManagedStorage, digest: str | None) -> bool:
    """Is an upload of `digest` in progress under a live lease?"""
    if not digest:
        return False
    doc = managed.catalog.collection.find_one({"hash": digest})
    if doc is None:
        return False
    res = to_resource(doc)
    return res.pending and not res.lease_expired()


def _gc_dangling(
    managed: ManagedStorage,
    orphans: list[FileInfo],
    cutoff: datetime.datetime,
    report: GcReport,
    bar_for: BarFactory,
) -> set[str]:
    """Repair paths whose catalog entry is gone; return hashes whose bytes must be kept."""
    entries = managed.catalog.collection
    missing: dict[Any, tuple[str, int]] = {}
    scan = bar_for(managed.paths.estimated_document_count(), "scan paths", "paths")
    try:
        projection = {"resource_id": 1, "hash": 1, "length": 1}
        for batch in _batches(managed.paths.find({}, projection), BATCH):
            rids = list({doc["resource_id"] for doc in batch})
            have = {d["_id"] for d in entries.find({"_id": {"$in": rids}}, {"_id": 1})}
            for doc in batch:
                scan.update(1)
                if doc["resource_id"] not in have:
                    missing[doc["resource_id"]] = (doc["hash"], int(doc["length"]))
    finally:
        scan.close()
    protected: set[str] = set()
    by_hash: dict[str, list[FileInfo]] = {}
    for info in orphans:
        if info.blake3:
            by_hash.setdefault(info.blake3, []).append(info)
    for rid, (digest, length) in missing.items():
        if not isinstance(rid, ObjectId):
            protected.add(digest)  # not a reference this catalog could have made
            continue
        candidates = [
            f
            for f in by_hash.get(digest, [])
            if f.length == length and f.upload_date <= cutoff and f.chunk_size > 0
        ]
        outcome, n = _restore(managed, rid, digest, length, candidates, report.dry_run)
        if outcome == "restored":
            report.restored_entries += 1
            report.actions.append(f"restored entry {rid} (blake3:{digest}) for {n} paths")
            used = candidates[0]
            orphans[:] = [f for f in orphans if f.file_id != used.file_id]
        elif outcome == "repointed":
            report.repointed_paths += n
            report.actions.append(
                f"repointed {n} paths from missing entry {rid} to the entry of blake3:{digest}"
            )
        elif outcome == "lost":
            protected.add(digest)
    return protected


def _restore(
    managed: ManagedStorage,
    rid: Any,
    digest: str,
    length: int,
    candidates: list[FileInfo],
    dry_run: bool,
) -> tuple[str, int]:
    """Give the paths of missing entry `rid` their content back, in one transaction."""
    entries = managed.catalog.collection

    def fix(session: ClientSession | None, doomed: list[str]) -> tuple[str, int]:
        if entries.find_one({"_id": rid}, {"_id": 1}, session=session) is not None:
            return "exists", 0
        n = managed.paths.count_documents({"resource_id": rid}, session=session)
        if n == 0:
            return "gone", 0
        now = utcnow()
        other = entries.find_one({"hash": digest}, session=session)
        if other is not None:
            if other.get("state") != READY or int(other["length"]) != length:
                return "lost", 0
            if dry_run:
                return "repointed", n
            taken = entries.find_one_and_update(
                {"_id": other["_id"], "state": READY, "refcount": {"$gt": 0}},
                {
                    "$inc": {"refcount": n},
                    "$set": {"updated_at": now},
                    "$push": _history("paths repointed", now),
                },
                session=session,
            )
            if taken is None:
                return "lost", 0
            moved = managed.paths.update_many(
                {"resource_id": rid},
                {"$set": {"resource_id": other["_id"], "updated_at": now}, "$inc": {"revision": 1}},
                session=session,
            ).modified_count
            if moved != n:
                raise _Retry()  # pragma: no cover - a snapshot cannot disagree with itself
            return "repointed", n
        for info in candidates:
            if entries.find_one({"path": info.path}, {"_id": 1}, session=session) is not None:
                continue
            if dry_run:
                return "restored", n
            entries.insert_one(
                {
                    "_id": rid,
                    "hash": digest,
                    "length": length,
                    "refcount": n,
                    "path": info.path,
                    "state": READY,
                    "lease_until": now,
                    "created_at": now,
                    "updated_at": now,
                    "history": [{"state": "restored", "at": now}],
                },
                session=session,
            )
            return "restored", n
        return "lost", 0

    for _ in range(3):
        try:
            return managed.transact(fix)
        except _Retry:  # pragma: no cover
            continue
    return "lost", 0  # pragma: no cover


class _Retry(Exception):
    pass


def _history(state: str, at: datetime.datetime) -> dict[str, Any]:
    from catalog.resources import HISTORY_LIMIT

    return {"history": {"$each": [{"state": state, "at": at}], "$slice": -HISTORY_LIMIT}}


def _gc_refcounts(managed: ManagedStorage, report: GcReport, bar_for: BarFactory) -> None:
    entries = managed.catalog.collection
    now = utcnow()
    query = {
        "state": READY,
        "$or": [{"lease_until": {"$lt": now}}, {"lease_until": None}],
    }
    scan = bar_for(entries.estimated_document_count(), "check refcounts", "entries")
    try:
        for batch in _batches(entries.find(query, {"refcount": 1}), BATCH):
            counts = _path_counts(managed, [doc["_id"] for doc in batch])
            for doc in batch:
                scan.update(1)
                if counts.get(doc["_id"], 0) == int(doc.get("refcount", 0)):
                    continue
                outcome = _recount(managed, doc["_id"], report.dry_run)
                if outcome is None:
                    continue
                old, new, path, length = outcome
                if new == 0:
                    report.unreferenced_entries += 1
                    report.unreferenced_bytes += length
                    report.actions.append(
                        f"entry {doc['_id']}: refcount {old}, no paths: deleted "
                        f"with its {length} bytes at {path!r}"
                    )
                else:
                    report.refcounts_fixed += 1
                    report.actions.append(f"entry {doc['_id']}: refcount {old} -> {new}")
    finally:
        scan.close()


def _recount(managed: ManagedStorage, oid: Any, dry_run: bool) -> tuple[int, int, str, int] | None:
    """Set an idle ready entry's refcount to its number of paths (delete it at zero).

    Runs in a transaction that writes the entry document, so it conflicts with
    (and is retried after) any concurrent reference change of that entry.
    """
    entries = managed.catalog.collection

    def fix(session: ClientSession | None, doomed: list[str]) -> tuple[int, int, str, int] | None:
        doc = entries.find_one({"_id": oid}, session=session)
        if doc is None:
            return None
        res = to_resource(doc)
        if res.pending or not res.lease_expired():
            return None  # an uploader holds a reference it has not linked yet
        n = managed.paths.count_documents({"resource_id": oid}, session=session)
        if n == res.refcount:
            return None
        if not dry_run:
            if n == 0:
                entries.delete_one({"_id": oid}, session=session)
                if res.path:
                    doomed.append(res.path)
            else:
                now = utcnow()
                entries.update_one(
                    {"_id": oid},
                    {
                        "$set": {"refcount": n, "updated_at": now},
                        "$push": _history("recounted", now),
                    },
                    session=session,
                )
        return res.refcount, n, res.path, res.length

    return managed.transact(fix)


def _gc_orphan_files(
    managed: ManagedStorage,
    store: _Store,
    orphans: list[FileInfo],
    cutoff: datetime.datetime,
    protected: set[str],
    report: GcReport,
) -> None:
    entries = managed.catalog.collection
    for info in orphans:
        if info.upload_date > cutoff or _live_pending(managed, info.blake3):
            report.in_flight += 1
            continue
        if info.blake3 in protected:
            report.actions.append(
                f"kept file {info.file_id} {info.path!r}: a path without an entry needs it"
            )
            continue
        if entries.find_one({"path": info.path}, {"_id": 1}) is not None:
            continue  # referenced since the scan
        if not report.dry_run:
            store.remove_file(info.file_id)
        report.orphan_files += 1
        report.orphan_file_bytes += info.length
        report.actions.append(
            f"orphan file {info.file_id} {info.path!r}: {info.length} bytes "
            f"from {_iso(info.upload_date)}"
        )


def _gc_orphan_chunks(store: _Store, cutoff: datetime.datetime, report: GcReport) -> None:
    for files_id in store.orphan_chunk_ids():
        last = store.last_activity(files_id)
        if last is None or last > cutoff:
            report.in_flight += 1  # still being written (or of unknown age: never guess)
            continue
        if store.file_exists(files_id):
            continue  # the upload committed since the scan
        chunks, size = store.chunk_usage(files_id)
        if not chunks:
            continue
        if not report.dry_run:
            store.remove_file(files_id)
        report.orphan_chunk_files += 1
        report.orphan_chunks += chunks
        report.orphan_chunk_bytes += size
        report.actions.append(
            f"orphan chunks of {files_id}: {chunks} chunks, {size} bytes, last written {_iso(last)}"
        )


# -- helpers ----------------------------------------------------------------------
def _path_counts(managed: ManagedStorage, oids: list[Any]) -> dict[Any, int]:
    pipeline: list[dict[str, Any]] = [
        {"$match": {"resource_id": {"$in": oids}}},
        {"$group": {"_id": "$resource_id", "n": {"$sum": 1}}},
    ]
    return {doc["_id"]: int(doc["n"]) for doc in _aggregate(managed.paths, pipeline)}


def _aggregate(collection: Any, pipeline: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    try:
        cursor = collection.aggregate(pipeline, allowDiskUse=True)
    except (OperationFailure, TypeError):
        cursor = collection.aggregate(pipeline)
    yield from cursor


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _iso(value: datetime.datetime | None) -> str:
    if value is None:
        return "?"
    return (
        value.astimezone(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    )
