"""gc: reclaim what nothing references, online, while uploads run.

A pure library function over a ManagedStorage that returns a report; the CLI
only formats it.

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
from dataclasses import dataclass, field
from typing import Any

from bson import ObjectId
from pymongo.client_session import ClientSession

from catalog import history
from catalog.clock import utcnow
from catalog.errors import CatalogError
from catalog.history import DEFAULT_HISTORY_DAYS
from catalog.kv import reclaim_expired
from catalog.managed import ManagedStorage
from catalog.resources import INLINE, READY, to_resource
from catalog.scan import (
    BATCH,
    BarFactory,
    FileInfo,
    StoreView,
    batches,
    iso,
    live_pending,
    no_bar,
    path_counts,
    unreferenced_files,
)
from catalog.sessions import COLLECTION as SESSIONS
from catalog.sessions import (
    DEFAULT_MAX_AGE,
    live_session_file_ids,
    reclaim_sessions,
    session_storage_paths,
)

DEFAULT_GC_GRACE = 3600.0


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
    sessions_reclaimed: int = 0
    session_bytes: int = 0
    expired_keys: int = 0
    repaired_files: int = 0
    kept_files: int = 0
    kept_chunk_files: int = 0
    kept_chunks: int = 0
    missing_files: int = 0
    malformed_paths: int = 0
    in_flight: int = 0
    failed_uploads: int = 0
    history_trimmed: int = 0
    history_days: float = DEFAULT_HISTORY_DAYS
    actions: list[str] = field(default_factory=list)

    @property
    def entries(self) -> int:
        """Catalog entries deleted: abandoned uploads and content no path references."""
        return self.abandoned_pending + self.unreferenced_entries

    @property
    def bytes(self) -> int:
        """Stored bytes deleted."""
        return (
            self.unreferenced_bytes
            + self.orphan_file_bytes
            + self.orphan_chunk_bytes
            + self.session_bytes
        )

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
            or self.repaired_files
            or self.sessions_reclaimed
            or self.expired_keys
            or self.failed_uploads
            or self.history_trimmed
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
            "sessions_reclaimed": self.sessions_reclaimed,
            "session_bytes": self.session_bytes,
            "expired_keys": self.expired_keys,
            "repaired_files": self.repaired_files,
            "kept_files": self.kept_files,
            "kept_chunk_files": self.kept_chunk_files,
            "kept_chunks": self.kept_chunks,
            "missing_files": self.missing_files,
            "malformed_paths": self.malformed_paths,
            "in_flight": self.in_flight,
            "failed_uploads": self.failed_uploads,
            "history_trimmed": self.history_trimmed,
            "history_days": self.history_days,
            "actions": list(self.actions),
        }


def gc(
    managed: ManagedStorage,
    *,
    grace: float = DEFAULT_GC_GRACE,
    dry_run: bool = False,
    progress: BarFactory | None = None,
    session_max_age: float = DEFAULT_MAX_AGE,
    history_days: float = DEFAULT_HISTORY_DAYS,
) -> GcReport:
    """Reclaim what nothing references; safe while uploads run (see the module doc).

    In order: expired proof requests; writer sessions idle for `session_max_age`;
    expired TTL keys; abandoned pending entries; paths whose entry is gone
    (rebuilt or repointed when the bytes are still there); reference counts that
    drifted (recounted, entries at zero deleted with their bytes); stored files
    no entry points at (kept, or given back to their entry, when their hash is
    an entry's); chunks without a files document (kept while a ready entry's
    stored file is missing: they may be its bytes); history past retention.
    A dry run counts all of it and changes nothing.
    """
    if grace < 0:
        raise CatalogError(f"grace must be >= 0 seconds, not {grace}")
    if session_max_age < 0:
        raise CatalogError(f"session max age must be >= 0 seconds, not {session_max_age}")
    bar_for = progress or no_bar
    store = StoreView(managed.resource_storage)
    report = GcReport(dry_run=dry_run, grace=grace, history_days=history_days)
    cutoff = utcnow() - datetime.timedelta(seconds=grace)

    _gc_requests(managed, report)
    _gc_sessions(managed, store, session_max_age, report)
    _gc_expired_keys(managed, report)
    _gc_abandoned(managed, report)
    scan = bar_for(store.totals()[0], "scan files", "files")
    try:
        orphans = list(unreferenced_files(managed, store, scan))
    finally:
        scan.close()
    guard = _gc_dangling(managed, store, orphans, cutoff, report, bar_for)
    sessions = live_session_file_ids(managed)
    guard.session_files = sessions
    guard.session_paths = session_storage_paths(managed, sessions)
    _gc_refcounts(managed, report, bar_for, guard)
    _gc_orphan_files(managed, store, orphans, cutoff, guard, report)
    _gc_orphan_chunks(managed, store, cutoff, sessions, guard, report)
    _gc_history(managed, history_days, report)
    return report


@dataclass
class _Guard:
    """What the path scan found that gc must not delete on the strength of.

    `hashes`: content that paths name but no entry holds for them (missing entry,
    a resource id this catalog could not have made, or a path document without a
    resource id): its stored bytes are kept and its entries never recounted down.
    `unknown`: some path document names neither an entry nor a hash, so nothing
    unreferenced can be proven unreferenced: no orphan and no reference is dropped.
    `session_files` / `session_paths`: the files ids of writer sessions' bytes and
    the storage paths of those that became stored files (a commit whose writer
    died: the session's next open finishes it, so they stay while it exists).
    """

    hashes: set[str] = field(default_factory=set)
    unknown: bool = False
    session_files: set[Any] = field(default_factory=set)
    session_paths: set[str] = field(default_factory=set)


def _stale_sessions(managed: ManagedStorage, max_age: float) -> list[dict[str, Any]]:
    """The sessions `reclaim_sessions` would take (the same query, read only)."""
    now = utcnow()
    stale = {
        "updated_at": {"$lt": now - datetime.timedelta(seconds=max_age)},
        "$or": [{"owner": None}, {"lease_until": {"$lte": now}}],
    }
    return list(managed.db[SESSIONS].find(stale, {"_id": 1, "file_id": 1}))


def _gc_sessions(
    managed: ManagedStorage, store: StoreView, max_age: float, report: GcReport
) -> None:
    """Writer sessions idle for `max_age` go with their chunks (counted, bytes measured)."""
    stale = _stale_sessions(managed, max_age)
    usage = {doc["_id"]: store.chunk_usage(doc["file_id"]) for doc in stale}
    if report.dry_run:
        report.sessions_reclaimed = len(stale)
        report.session_bytes = sum(size for _, size in usage.values())
    else:
        report.sessions_reclaimed = reclaim_sessions(managed, max_age)
        if stale:
            left = {
                d["_id"]
                for d in managed.db[SESSIONS].find(
                    {"_id": {"$in": [d["_id"] for d in stale]}}, {"_id": 1}
                )
            }
            for doc in stale:
                if doc["_id"] in left or store.file_exists(doc["file_id"]):
                    continue  # resumed meanwhile, or its bytes became a stored file
                report.session_bytes += usage[doc["_id"]][1]
    if report.sessions_reclaimed:
        report.actions.append(
            f"idle writer sessions: {report.sessions_reclaimed}, "
            f"{report.session_bytes} bytes of chunks"
        )


def _gc_expired_keys(managed: ManagedStorage, report: GcReport) -> None:
    if report.dry_run:
        query = {"expires_at": {"$lte": utcnow()}}
        report.expired_keys = managed.paths.count_documents(query)
    else:
        report.expired_keys = reclaim_expired(managed)  # TTL keys past their lease
    if report.expired_keys:
        report.actions.append(f"expired TTL keys: {report.expired_keys}")


def _gc_history(managed: ManagedStorage, days: float, report: GcReport) -> None:
    """Abandoned uploads become `failed`; items older than `days` go (retention by age)."""
    collections = [managed.paths, managed.history, managed.archive]
    if report.dry_run:
        report.failed_uploads = history.count_abandoned(managed.history)
        report.history_trimmed = history.count_trimmable(collections, days)
    else:
        report.failed_uploads = history.fail_abandoned(managed.history)
        report.history_trimmed = history.trim(collections, days)
    if report.failed_uploads:
        report.actions.append(f"marked {report.failed_uploads} abandoned upload(s) failed")
    if report.history_trimmed:
        report.actions.append(f"history items older than {days:g} days: {report.history_trimmed}")


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


def _gc_dangling(
    managed: ManagedStorage,
    store: StoreView,
    orphans: list[FileInfo],
    cutoff: datetime.datetime,
    report: GcReport,
    bar_for: BarFactory,
) -> _Guard:
    """Repair paths whose catalog entry is gone; return what must not be deleted.

    A malformed path document (no resource id, or a missing entry and no usable
    hash or length) is reported and skipped, never repaired or acted upon.
    """
    entries = managed.catalog.collection
    guard = _Guard()
    missing: dict[Any, tuple[str, int]] = {}
    scan = bar_for(managed.paths.estimated_document_count(), "scan paths", "paths")
    try:
        projection = {"env": 1, "path": 1, "resource_id": 1, "hash": 1, "length": 1}
        for batch in batches(managed.paths.find({}, projection), BATCH):
            rids = [doc.get("resource_id") for doc in batch]
            known = [rid for rid in rids if rid is not None]
            have = {d["_id"] for d in entries.find({"_id": {"$in": known}}, {"_id": 1})}
            for doc in batch:
                scan.update(1)
                rid = doc.get("resource_id")
                if rid is not None and rid in have:
                    continue
                digest, length = _hash_and_length(doc)
                if rid is None or digest is None or length is None:
                    _malformed(
                        doc,
                        "no resource id" if rid is None else "no hash or length",
                        digest,
                        guard,
                        report,
                    )
                    continue
                missing[rid] = (digest, length)
    finally:
        scan.close()
    by_hash: dict[str, list[FileInfo]] = {}
    for info in orphans:
        if info.blake3:
            by_hash.setdefault(info.blake3, []).append(info)
    for rid, (digest, length) in missing.items():
        if not isinstance(rid, ObjectId):
            guard.hashes.add(digest)  # not a reference this catalog could have made
            report.actions.append(
                f"kept blake3:{digest}: paths point at resource id {rid!r}, not an ObjectId; "
                "run fsck"
            )
            continue
        # Only a file whose chunks check out: a damaged one restored as the entry's
        # would make an intact copy of the same hash a spare, and gc deletes spares.
        candidates = [
            f
            for f in by_hash.get(digest, [])
            if f.length == length
            and f.upload_date <= cutoff
            and f.chunk_size > 0
            and not store.chunk_problems(f)
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
            guard.hashes.add(digest)
    return guard


def _hash_and_length(doc: dict[str, Any]) -> tuple[str | None, int | None]:
    digest = doc.get("hash")
    length = doc.get("length")
    ok_hash = isinstance(digest, str) and len(digest) == 64
    ok_length = isinstance(length, int) and not isinstance(length, bool) and length >= 0
    return (digest if ok_hash else None), (length if ok_length else None)


def _malformed(
    doc: dict[str, Any], why: str, digest: str | None, guard: _Guard, report: GcReport
) -> None:
    report.malformed_paths += 1
    if digest is not None:
        guard.hashes.add(digest)  # whatever holds that hash may be this path's content
        kept = f"content blake3:{digest} kept"
    else:
        guard.unknown = True
        kept = "no unreferenced content is deleted"
    report.actions.append(
        f"skipped malformed path document {doc.get('_id')} "
        f"({doc.get('env')!r}: {doc.get('path')!r}): {why}; {kept}; run fsck"
    )


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


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1  # never equal to a count: such an entry is recounted (or skipped)


class _Retry(Exception):
    pass


class _Malformed(Exception):
    pass


def _history(state: str, at: datetime.datetime) -> dict[str, Any]:
    from catalog.resources import HISTORY_LIMIT

    return {"history": {"$each": [{"state": state, "at": at}], "$slice": -HISTORY_LIMIT}}


def _gc_refcounts(
    managed: ManagedStorage, report: GcReport, bar_for: BarFactory, guard: _Guard
) -> None:
    entries = managed.catalog.collection
    now = utcnow()
    query = {
        "state": READY,
        "$or": [{"lease_until": {"$lt": now}}, {"lease_until": None}],
    }
    scan = bar_for(entries.estimated_document_count(), "check refcounts", "entries")
    try:
        fields = {"refcount": 1, "hash": 1, "path": 1}
        for batch in batches(entries.find(query, fields), BATCH):
            counts = path_counts(managed, [doc["_id"] for doc in batch])
            for doc in batch:
                scan.update(1)
                paths = counts.get(doc["_id"], 0)
                if paths == _int(doc.get("refcount", 0)):
                    continue
                if doc.get("path") in guard.session_paths:
                    # A session's bytes, completed by a writer that died before it
                    # linked the path: its next open finishes that commit.
                    report.in_flight += 1
                    continue
                if paths < _int(doc.get("refcount", 0)) and (
                    guard.unknown or doc.get("hash") in guard.hashes
                ):
                    report.actions.append(
                        f"kept refcount of entry {doc['_id']}: paths gc cannot read may "
                        "reference it; run fsck"
                    )
                    continue
                try:
                    outcome = _recount(managed, doc["_id"], report.dry_run)
                except _Malformed as exc:
                    report.actions.append(f"skipped malformed {exc}; run fsck")
                    continue
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
        try:
            res = to_resource(doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise _Malformed(f"entry {oid}: unreadable field {exc}") from exc
        if res.pending or not res.lease_expired():
            return None  # an uploader holds a reference it has not linked yet
        n = managed.paths.count_documents({"resource_id": oid}, session=session)
        if n == res.refcount:
            return None
        if n < res.refcount and managed.letting_go(oid, session=session):
            return None  # a put that replaced it is about to drop its reference
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
    store: StoreView,
    orphans: list[FileInfo],
    cutoff: datetime.datetime,
    guard: _Guard,
    report: GcReport,
) -> None:
    entries = managed.catalog.collection
    for info in orphans:
        if (
            info.upload_date > cutoff
            or live_pending(managed, info.blake3)
            or info.file_id in guard.session_files  # a dead commit's: its next open ends it
        ):
            report.in_flight += 1
            continue
        if info.blake3 in guard.hashes or guard.unknown:
            report.kept_files += 1
            report.actions.append(
                f"kept file {info.file_id} {info.path!r}: a path without an entry may need it"
            )
            continue
        if entries.find_one({"path": info.path}, {"_id": 1}) is not None:
            continue  # referenced since the scan
        owner = entries.find_one({"hash": info.blake3}, {"data": 0}) if info.blake3 else None
        if owner is not None and not _spare_copy(store, owner):
            # The bytes of a catalog entry under a name no entry uses (a damaged files
            # document): kept; given back to the entry if it lost its own file.
            _adopt(managed, store, info, owner, report)
            continue
        if managed.read_leases.live(info.path):
            report.in_flight += 1  # its last reference went while someone reads it
            continue
        if not report.dry_run and not _hide_unread(managed, info.path):
            report.in_flight += 1  # a reader opened it as we looked: it deletes them
            continue
        if not report.dry_run:
            store.remove_file(info.file_id)
        report.orphan_files += 1
        report.orphan_file_bytes += info.length
        report.actions.append(
            f"orphan file {info.file_id} {info.path!r}: {info.length} bytes "
            f"from {iso(info.upload_date)}"
        )


def _hide_unread(managed: ManagedStorage, storage_path: str) -> bool:
    """Hide an orphan file from new readers, then look for readers; True if none.

    In the order ManagedStorage._discard deletes bytes (see catalog.readleases):
    a reader takes its lease and then opens, so one that opened the file just
    after gc first looked is found now, and one after this finds it hidden. A
    file with a reader stays hidden, and its last reader deletes it. Only after
    that first look: a put holds a lease on its file before the file exists,
    and a hidden file must never become an entry's.
    """
    mark = getattr(managed.resource_storage, "mark_doomed", None)
    if mark is None:
        return True  # a store without leases: nothing to hide from
    mark(storage_path)
    return not managed.read_leases.live(storage_path)


def _spare_copy(store: StoreView, owner: dict[str, Any]) -> bool:
    """True when the entry is ready and its own stored file is there and whole: an orphan
    with its hash is a spare copy (a crashed duplicate upload, say), reclaimed like any
    orphan. While the entry's own file lacks chunks, the orphan may be its only bytes."""
    path = owner.get("path")
    if owner.get("state", READY) != READY or not isinstance(path, str):
        return False
    if path in ("", INLINE):
        return False
    own = store.stat(path)
    return own is not None and not store.chunk_problems(own)


def _adopt(
    managed: ManagedStorage,
    store: StoreView,
    info: FileInfo,
    owner: dict[str, Any],
    report: GcReport,
) -> None:
    """Keep an orphan file holding an entry's hash; repoint the entry at it if its file is gone.

    The repair renames the stored file to the entry's storage path, once its
    length, recorded hash and chunks check out, and only while the entry is
    ready and has no stored file of its own.
    """
    rid, path = owner["_id"], owner.get("path")
    subject = f"file {info.file_id} {info.path!r} (blake3:{info.blake3})"
    stored = owner.get("state", READY) == READY and isinstance(path, str)
    stored = stored and path not in ("", INLINE)
    own = store.stat(str(path)) if stored else None
    damaged = own is not None and bool(store.chunk_problems(own))
    own_file_missing = stored and (own is None or damaged)
    files = getattr(store.storage, "files", None)
    sound = (
        info.length == _int(owner.get("length"))
        and info.blake3 == owner.get("hash")
        and info.chunk_size > 0
        and not store.chunk_problems(info)
    )
    if not (own_file_missing and sound and files is not None):
        report.kept_files += 1
        why = (
            "its stored file is missing, and this one does not check out"
            if (own_file_missing)
            else "a copy of its content"
        )
        report.actions.append(f"kept {subject}: the hash of entry {rid}; {why}")
        return
    aside = ""
    if damaged and own is not None:  # set aside first: one file holds the entry's name
        aside = f"{path}.damaged-{own.file_id}"
        if not report.dry_run:
            files.update_one({"_id": own.file_id}, {"$set": {"filename": aside}})
        aside = f"; its damaged file {own.file_id} set aside as {aside!r} (a spare now)"
    if not report.dry_run:
        files.update_one({"_id": info.file_id}, {"$set": {"filename": path}})
        if store.stat(str(path)) is None:  # pragma: no cover - renamed or removed meanwhile
            report.kept_files += 1
            report.actions.append(f"kept {subject}: changed while gc repaired entry {rid}")
            return
        now = utcnow()
        managed.catalog.collection.update_one(
            {"_id": rid}, {"$set": {"updated_at": now}, "$push": _history("file repaired", now)}
        )
    report.repaired_files += 1
    report.actions.append(
        f"repaired entry {rid}: its stored file is {subject}, renamed {path!r}{aside}"
    )


def _ready_entries_missing_files(managed: ManagedStorage, store: StoreView) -> int:
    """How many ready entries stored in files have no stored file (fsck's `missing_file`)."""
    entries = managed.catalog.collection
    files = getattr(store.storage, "files", None)
    missing = 0
    query = {"path": {"$ne": INLINE}, "state": {"$in": [READY, None]}}
    for batch in batches(entries.find(query, {"path": 1, "state": 1}), BATCH):
        paths: list[str] = []
        for doc in batch:
            path = doc.get("path")
            if doc.get("state", READY if path else "") != READY:
                continue  # no state and no path: pending, as to_resource reads it
            if not isinstance(path, str) or not path:
                missing += 1
            else:
                paths.append(path)
        if files is not None:
            found = {
                d.get("filename")
                for d in files.find(
                    {"filename": {"$in": paths}, "metadata.doomed": {"$ne": True}},
                    {"filename": 1},
                )
            }
            missing += sum(1 for path in paths if path not in found)
        else:  # pragma: no cover - every StoreView storage has a files collection today
            missing += sum(1 for path in paths if store.stat(path) is None)
    return missing


def _gc_orphan_chunks(
    managed: ManagedStorage,
    store: StoreView,
    cutoff: datetime.datetime,
    sessions: set[Any],
    guard: _Guard,
    report: GcReport,
) -> None:
    doomed: list[tuple[Any, datetime.datetime, int, int]] = []
    for files_id in store.orphan_chunk_ids():
        if files_id in sessions:
            continue  # a writer session's bytes, kept until it commits, cancels or expires
        last = store.last_activity(files_id)
        if last is None or last > cutoff:
            report.in_flight += 1  # still being written (or of unknown age: never guess)
            continue
        if store.file_exists(files_id):
            continue  # the upload committed since the scan
        chunks, size = store.chunk_usage(files_id)
        if chunks:
            doomed.append((files_id, last, chunks, size))
    if not doomed:
        return
    # Their hash is unknown without reading them: while a ready entry has lost its
    # stored file, any of them may be its bytes (a files document deleted by hand).
    report.missing_files = _ready_entries_missing_files(managed, store)
    if report.missing_files or guard.unknown:
        report.kept_chunk_files = len(doomed)
        report.kept_chunks = sum(chunks for _, _, chunks, _ in doomed)
        held = sum(size for *_, size in doomed)
        if report.missing_files:
            report.actions.append(
                f"kept {report.kept_chunks} orphan chunks: entries have missing files; run fsck "
                f"({report.missing_files} ready entries without their stored file; "
                f"{len(doomed)} chunk sets, {held} bytes)"
            )
        else:
            report.actions.append(
                f"kept {report.kept_chunks} orphan chunks: path documents gc cannot read; "
                f"run fsck ({len(doomed)} chunk sets, {held} bytes)"
            )
        return
    for files_id, _, chunks, size in doomed:
        last = store.last_activity(files_id)
        if last is None or last > cutoff or store.file_exists(files_id):
            continue  # written to or committed meanwhile
        if not report.dry_run:
            store.remove_file(files_id)
        report.orphan_chunk_files += 1
        report.orphan_chunks += chunks
        report.orphan_chunk_bytes += size
        report.actions.append(
            f"orphan chunks of {files_id}: {chunks} chunks, {size} bytes, last written {iso(last)}"
        )
