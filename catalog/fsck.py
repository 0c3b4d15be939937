"""fsck: every inconsistency between paths, catalog entries and stored bytes.

A pure library function over a ManagedStorage that returns a report; the CLI
only formats it. Unreferenced bytes younger than the grace period and entries
under a live upload lease are in flight, not problems, and whatever looks
wrong is read again (in one snapshot where it matters) before it is reported,
so fsck can run while uploads and gc do.

A document it cannot read (a field missing or of the wrong type) is a problem
of its own (`malformed_entry`, `malformed_path`), never a crash; and every
problem about lost content names the paths that point at that content.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import blake3
from bson import ObjectId
from pymongo.client_session import ClientSession

from catalog.clock import utcnow
from catalog.errors import CatalogError, NotFoundError
from catalog.managed import ManagedStorage
from catalog.resources import READY, Resource, to_resource
from catalog.scan import (
    BATCH,
    BarFactory,
    NoBar,
    ProgressBar,
    StoreView,
    aggregate,
    batches,
    iso,
    live_pending,
    no_bar,
    path_counts,
    unreferenced_files,
)
from catalog.sessions import live_session_file_ids

DEFAULT_FSCK_GRACE = 60.0
# A lost-content problem lists at most this many of the paths using the content.
PATHS_SHOWN = 100


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
    # malformed_*: where the document is and which of its fields are missing or wrong
    collection: str | None = None
    document_id: str | None = None
    fields: tuple[str, ...] = ()
    # lost content (and malformed entries): the (env, path)s pointing at it, the
    # first PATHS_SHOWN in order, and how many more there are; None: not applicable
    paths: tuple[tuple[str, str], ...] | None = None
    more_paths: int = 0

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "subject": self.subject, "detail": self.detail}
        for key in (
            "env",
            "path",
            "resource_id",
            "hash",
            "file_id",
            "bytes",
            "collection",
            "document_id",
        ):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        if self.fields:
            data["field"] = self.fields[0]
            data["fields"] = list(self.fields)
        if self.paths is not None:
            data["paths"] = [{"env": env, "path": path} for env, path in self.paths]
            data["more_paths"] = self.more_paths
        return data

    def __str__(self) -> str:
        text = f"{self.kind}: {self.subject}: {self.detail}"
        if self.paths is None:
            return text
        total = len(self.paths) + self.more_paths
        if not total:
            return f"{text}; used by no path"
        shown = ", ".join(_show_path(env, path) for env, path in self.paths)
        more = f", and {self.more_paths} more" if self.more_paths else ""
        return f"{text}; used by {total} path{'s' if total != 1 else ''}: {shown}{more}"


def _show_path(env: str, path: str) -> str:
    """`env:path`, quoted when it would not read as one item of a comma-separated list."""
    text = f"{env}:{path}"
    if ", " in text or text != text.strip() or text[:1] in "'\"":
        return repr(text)
    return text


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
    "malformed_entry",  # a catalog entry with a field missing or of the wrong type
    "malformed_path",  # a path document with a field missing or of the wrong type
)

# Problems meaning the content's bytes are lost or damaged: they list the paths using it.
LOST_CONTENT = frozenset(
    {
        "missing_file",
        "length_mismatch",
        "hash_mismatch",
        "missing_chunk",
        "bad_chunk",
        "corrupt_content",
        "malformed_entry",
    }
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
    bar_for = progress or no_bar
    store = StoreView(managed.resource_storage)
    cutoff = utcnow() - datetime.timedelta(seconds=grace)
    problems: list[Problem] = []
    in_flight = 0

    # 1. catalog entries: references and the stored files they point at
    entries = managed.catalog.collection
    n_resources = 0
    verify_bar: ProgressBar = NoBar()
    if verify_content:
        total = sum(
            int(d["bytes"])
            for d in aggregate(
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
        NoBar()
        if verify_content
        else bar_for(entries.estimated_document_count(), "check resources", "entries")
    )
    try:
        for batch in batches(entries.find({}), BATCH):
            counts = path_counts(managed, [doc["_id"] for doc in batch])
            for doc in batch:
                n_resources += 1
                scan.update(1)
                if entry_defects(doc):
                    malformed = _malformed_entry(managed, doc)
                    if malformed is not None:
                        problems.append(malformed)
                    continue
                found, flying, verified = _check_entry(
                    managed, store, doc, counts.get(doc["_id"], 0), verify_content, verify_bar
                )
                problems.extend(_with_paths(managed, doc["_id"], found))
                in_flight += flying
                bytes_verified += verified
    finally:
        scan.close()
        verify_bar.close()

    # 2. paths: each must point at an existing, ready resource with its hash and length
    n_paths = 0
    scan = bar_for(managed.paths.estimated_document_count(), "check paths", "paths")
    try:
        for batch in batches(managed.paths.find({}), BATCH):
            good = []
            for doc in batch:
                if not path_defects(doc):
                    good.append(doc)
                    continue
                n_paths += 1
                scan.update(1)
                malformed = _malformed_path(managed, doc)
                if malformed is not None:
                    problems.append(malformed)
            rids = list({doc["resource_id"] for doc in good})
            known = {
                d["_id"]: d
                for d in entries.find(
                    {"_id": {"$in": rids}}, {"state": 1, "hash": 1, "length": 1, "path": 1}
                )
            }
            for doc in good:
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
        for info in unreferenced_files(managed, store, scan):
            if info.upload_date > cutoff or _live_pending(managed, info.blake3):
                in_flight += 1
                continue
            if entries.find_one({"path": info.path}, {"_id": 1}) is not None:
                continue  # referenced meanwhile
            if not store.file_exists(info.file_id):
                continue  # its entry's removal deleted it meanwhile
            if managed.read_leases.live(info.path):
                in_flight += 1  # still read: its last reader deletes it (as gc counts it)
                continue
            problems.append(
                Problem(
                    "orphan_file",
                    f"file {info.file_id} {info.path!r}",
                    f"{info.length} bytes stored since {iso(info.upload_date)}, "
                    "no catalog entry points at it",
                    hash=info.blake3,
                    file_id=str(info.file_id),
                    bytes=info.length,
                )
            )
    finally:
        scan.close()

    # 4. chunks without a files document (a writer session's are its own)
    sessions = live_session_file_ids(managed)
    for files_id in store.orphan_chunk_ids():
        if files_id in sessions:
            continue
        last = store.last_activity(files_id)
        if last is not None and last > cutoff:
            in_flight += 1
            continue
        if store.file_exists(files_id):
            continue  # committed meanwhile
        chunks, size = store.chunk_usage(files_id)
        if not chunks:
            continue
        when = f"last written {iso(last)}" if last is not None else "age unknown"
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
    store: StoreView,
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
                f"pending since {iso(res.created_at)}, uploader's lease expired "
                f"{iso(res.lease_until)}, {res.refcount} references",
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
        problem("length_mismatch", f"inline bytes: {len(data)}, the entry says {res.length}")
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
    if entry_defects(entry):
        return None  # reported as malformed_entry, with this path
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
        if entry_defects(doc):
            return None  # reported as malformed_entry
        refcount = int(doc.get("refcount", 0))
        res = to_resource(doc)
        if res.pending or (n < refcount and not res.lease_expired()):
            return None
        if n < refcount and managed.letting_go(oid, session=session):
            return None  # a put that replaced it is about to drop its reference
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


# -- malformed documents and the paths of lost content ---------------------------------
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_DIGEST = "a BLAKE3 digest (64 lowercase hex digits)"
_COUNT = "a non-negative integer"


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _is_count(value: Any) -> bool:
    return _is_integer(value) and value >= 0


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and _DIGEST_RE.fullmatch(value) is not None


def _is_history(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(h, dict) and "state" in h and isinstance(h.get("at"), datetime.datetime)
        for h in value
    )


def _is(kind: type | tuple[type, ...]) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, kind)


# (field, required, None allowed, check, what it should be)
_Field = tuple[str, bool, bool, Callable[[Any], bool], str]
_ENTRY_FIELDS: tuple[_Field, ...] = (
    ("hash", True, False, _is_digest, _DIGEST),
    ("length", True, False, _is_count, _COUNT),
    ("refcount", False, False, _is_integer, "an integer"),
    ("path", False, False, _is(str), "a string"),
    ("state", False, False, _is(str), "a string"),
    ("created_at", False, True, _is(datetime.datetime), "a date"),
    ("updated_at", False, True, _is(datetime.datetime), "a date"),
    ("lease_until", False, True, _is(datetime.datetime), "a date"),
    ("history", False, False, _is_history, "a list of {state, at: date} documents"),
    ("data", False, True, _is(bytes), "binary data"),
)
_PATH_FIELDS: tuple[_Field, ...] = (
    ("env", True, False, _is(str), "a string"),
    ("path", True, False, _is(str), "a string"),
    # a string id points at no entry: a dangling path (gc repoints it by hash), not malformed
    ("resource_id", True, False, _is((ObjectId, str)), "an ObjectId"),
    ("hash", True, False, _is_digest, _DIGEST),
    ("length", True, False, _is_count, _COUNT),
)


def _shorten(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _defects(doc: dict[str, Any], spec: tuple[_Field, ...]) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for name, required, nullable, check, expected in spec:
        if name not in doc:
            if required:
                found.append((name, f"field {name!r} is missing"))
            continue
        value = doc[name]
        if value is None:
            if not nullable:
                found.append((name, f"field {name!r} is null, expected {expected}"))
            continue
        if not check(value):
            kind = type(value).__name__
            found.append((name, f"field {name!r} is {kind} {_shorten(value)}, expected {expected}"))
    return found


def entry_defects(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, what is wrong) for each field of a catalog entry fsck cannot use."""
    found = _defects(doc, _ENTRY_FIELDS)
    if not found:
        try:
            to_resource(doc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # pragma: no cover
            found.append(("?", f"cannot be read: {type(exc).__name__}: {exc}"))
    return found


def path_defects(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, what is wrong) for each field of a path document fsck cannot use."""
    return _defects(doc, _PATH_FIELDS)


def _malformed(
    kind: str, collection: str, doc: dict[str, Any], defects: list[tuple[str, str]], **extra: Any
) -> Problem:
    return Problem(
        kind,
        f"{collection} document {doc['_id']}",
        "; ".join(what for _, what in defects),
        collection=collection,
        document_id=str(doc["_id"]),
        fields=tuple(name for name, _ in defects),
        **extra,
    )


def _malformed_entry(managed: ManagedStorage, doc: dict[str, Any]) -> Problem | None:
    """The entry re-read: still malformed? Then a problem listing the paths using it."""
    entries = managed.catalog.collection
    now = entries.find_one({"_id": doc["_id"]})
    defects = entry_defects(now) if now is not None else []
    if now is None or not defects:
        return None  # removed or rewritten meanwhile
    digest = now.get("hash")
    problem = _malformed(
        "malformed_entry",
        entries.name,
        now,
        defects,
        resource_id=str(now["_id"]),
        hash=digest if isinstance(digest, str) else None,
    )
    return _with_paths(managed, now["_id"], [problem])[0]


def _malformed_path(managed: ManagedStorage, doc: dict[str, Any]) -> Problem | None:
    now = managed.paths.find_one({"_id": doc["_id"]}, {"events": 0})
    defects = path_defects(now) if now is not None else []
    if now is None or not defects:
        return None  # removed or rewritten meanwhile
    bad = {name for name, _ in defects}
    extra: dict[str, Any] = {}
    for key in ("env", "path", "hash"):
        if key not in bad and key in now:
            extra[key] = now[key]
    if "resource_id" not in bad:
        extra["resource_id"] = str(now["resource_id"])
    return _malformed("malformed_path", managed.paths.name, now, defects, **extra)


def paths_using(managed: ManagedStorage, oid: Any) -> tuple[tuple[tuple[str, str], ...], int]:
    """The first PATHS_SHOWN (env, path)s pointing at entry `oid`, sorted, and how many more."""
    cursor = (
        managed.paths.find({"resource_id": oid}, {"env": 1, "path": 1})
        .sort([("env", 1), ("path", 1)])
        .limit(PATHS_SHOWN)
    )
    shown = tuple((str(d.get("env")), str(d.get("path"))) for d in cursor)
    more = 0
    if len(shown) == PATHS_SHOWN:
        more = max(managed.paths.count_documents({"resource_id": oid}) - PATHS_SHOWN, 0)
    return shown, more


def _with_paths(managed: ManagedStorage, oid: Any, found: list[Problem]) -> list[Problem]:
    """Lost-content problems of entry `oid`, with the paths that lose their content."""
    if not any(p.kind in LOST_CONTENT for p in found):
        return found
    shown, more = paths_using(managed, oid)
    return [
        dataclasses.replace(p, paths=shown, more_paths=more) if p.kind in LOST_CONTENT else p
        for p in found
    ]


def _live_pending(managed: ManagedStorage, digest: str | None) -> bool:
    """live_pending, where a malformed entry (reported on its own) is no live upload."""
    try:
        return live_pending(managed, digest)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
