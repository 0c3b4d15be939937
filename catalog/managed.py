"""ManagedStorage: environments' paths mapped onto deduplicated content.

Design, after juju/blobstore's managedStorage, with what it lacked:

* Uploads stream. When the hash is known up front (given by the caller, or
  computed in a first pass over a seekable reader) a reference is taken first:
  if the content is stored already nothing is written, the bytes are only
  hashed. Otherwise the bytes go to a fresh storage path and the catalog entry
  becomes ready when they are all there; concurrent uploaders of one content
  each write, the first to complete wins and the others delete their copy.
* A path's reference and the reference count it holds change in one
  transaction (when the server has transactions), so the count never drifts
  below the paths that use it; a crash can only leave a count too high, which
  `gc` recounts once the in-flight lease has run out.
* Bytes are deleted after the transaction that dropped their last reference
  commits; a crash in between leaves a storage file no entry points to, which
  `gc` reclaims.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import hmac
import io
import itertools
import logging
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TypeVar, cast

import blake3
from bson import ObjectId
from pymongo import ASCENDING, ReturnDocument, WriteConcern
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import (
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from catalog import history
from catalog.archive import archive_collection, archive_old, archived_uploads, bucket_events
from catalog.clock import aware, utcnow
from catalog.errors import (
    AlreadyExistsError,
    BadRequestError,
    HashMismatchError,
    LengthMismatchError,
    NotFoundError,
    PreconditionFailedError,
    RequestExpiredError,
    ResourceDeletedError,
    ResponseMismatchError,
    UploadPendingError,
)
from catalog.groupcommit import GroupCommit
from catalog.lru import SizedLRU
from catalog.names import check_env, check_path, check_prefix, parse_hash
from catalog.pathdocs import (
    EVENTS_SHOWN,
    HISTORY_KEPT,
    HISTORY_SHOWN,
    LIVE_EVENTS,
    SPILL_AT,
    PathUpdates,
    fresh,
    insert_fresh,
    insert_settled,
    path_events,
    revision,
    revision_query,
    settle_created,
)
from catalog.proof import (
    DAILY_BUDGET,
    ProofBudget,
    PutResponse,
    RequestResponse,
    choose_ranges,
    new_put_response,
    ranges_checksum,
)
from catalog.readleases import ReadLeases
from catalog.resources import (
    DEFAULT_LEASE,
    INLINE,
    READY,
    Resource,
    ResourceCatalog,
    object_id,
    to_resource,
)
from catalog.streams import (
    Heartbeat,
    PrefixedReader,
    WatchedReader,
    hash_stream,
    is_seekable,
    read_exact,
)
from catalog.txnowners import owners_of

log = logging.getLogger("rescat.catalog")

if TYPE_CHECKING:
    from catalog.environment import Environment
    from catalog.transaction import ContentTransaction

T = TypeVar("T")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")
# Content up to this size lives in its catalog entry: one document to write and
# to read instead of a GridFS files document plus chunks (bench/core.py measures).
INLINE_MAX = 64 * 1024
# Inline entries a process keeps after reading or writing them (content never
# changes): a read of small content is then one query for its path document.
INLINE_CACHE_BYTES = 16 * 1024 * 1024
# Path documents carry their history; reads never need it.
NO_EVENTS = {"events": 0}


@dataclass(frozen=True)
class PathInfo:
    """What a path holds. `revision` grows on every change of the path."""

    env_uuid: str
    path: str
    hash: str
    length: int
    created_at: datetime.datetime
    updated_at: datetime.datetime
    revision: int
    resource_id: str = ""
    state: str = "ready"
    history: tuple[tuple[str, datetime.datetime], ...] = field(default=())
    content_type: str = ""
    expires_at: datetime.datetime | None = None


@dataclass(frozen=True)
class WriteOptions:
    """How a put may change its path, checked in the same atomic step as the write.

    if_match: the path's current revision (int) or content hash (str) must match
    ("*": the path must exist, whatever it holds); if_none_match: the path must not
    exist. expires_at / owner: a TTL key, gone from reads after expires_at unless
    its owner renews it.
    """

    if_match: int | str | None = None
    if_none_match: bool = False
    expires_at: datetime.datetime | None = None
    owner: str | None = None
    content_type: str | None = None
    # False: store the bytes and keep the reference, but link no path (a content
    # transaction links its puts together when its block ends).
    link: bool = True
    # Content up to this size is kept inside its catalog entry even above the
    # store's inline_max: the KV store's values (at most 1 MiB), so that each
    # change carries its bytes to watchers even once a later one replaced it.
    inline_max: int = 0
    # False: the caller wants no path document back, so a new path may be
    # inserted rather than upserted (pathdocs.fresh): half the database's work.
    answer: bool = True
    # The pending history item the caller wrote when the upload began
    # (`upload_started`: a service still receiving the body); the put ends it.
    pending_op: ObjectId | None = None


PLAIN = WriteOptions()
BLIND = WriteOptions(answer=False)


def new_storage_path() -> str:
    """Every upload writes to a path of its own, so concurrent uploads never collide."""
    return uuid.uuid4().hex


class ManagedStorage:
    """Per-environment paths over a ResourceCatalog and a resource storage."""

    def __init__(
        self,
        db: Database[Any],
        resource_storage: Any,
        *,
        request_expiry: float = 60.0,
        lease: float = DEFAULT_LEASE,
        inline_max: int = INLINE_MAX,
        dedup_scope: str = "global",
        proof_budget: int = DAILY_BUDGET,
    ) -> None:
        if dedup_scope not in ("global", "environment"):
            raise ValueError(f"dedup_scope must be 'global' or 'environment', not {dedup_scope!r}")
        self.dedup_scope = dedup_scope
        self._budget = ProofBudget(db, proof_budget)
        self.db = db
        self.resource_storage = resource_storage
        self.request_expiry = request_expiry
        self.inline_max = inline_max
        self._catalog = ResourceCatalog(db, lease=lease)
        majority = WriteConcern("majority")
        self.paths = db["paths"].with_options(write_concern=majority)
        self.requests = db["put_requests"].with_options(write_concern=majority)
        self.paths.create_index([("env", ASCENDING), ("path", ASCENDING)], unique=True)
        self.paths.create_index([("resource_id", ASCENDING)])
        self.paths.create_index([("env", ASCENDING), ("hash", ASCENDING)])
        # The resource a put's link let go and drops after it (gc's question: is that drop
        # still in flight?); only paths a put replaced are in it.
        self.paths.create_index(
            [("dropping", ASCENDING)], partialFilterExpression={"dropping": {"$type": "objectId"}}
        )
        # TTL keys alone, so that finding what has expired (catalog.reaper, every second
        # in each service) is an index probe, not a scan of every path.
        self.paths.create_index(
            [("expires_at", ASCENDING)], partialFilterExpression={"expires_at": {"$exists": True}}
        )
        self.history = db["path_history"].with_options(write_concern=majority)
        self.history.create_index([("env", ASCENDING), ("path", ASCENDING)], unique=True)
        self.archive = archive_collection(db)
        self.requests.create_index([("expires_at", ASCENDING)], expireAfterSeconds=0)
        self._transactions = _supports_transactions(db)
        self._updates = PathUpdates(_clock_mode(db, self._transactions))
        # New paths whose writer wants no document back, many threads' in one insert.
        self._fresh_paths: GroupCommit[dict[str, Any], bool] | None = None
        self._fresh_answered: GroupCommit[dict[str, Any], dict[str, Any] | None] | None = None
        if self._updates.mode == "cluster":
            # A duplicate key: the path exists (see outcome_unknown for other errors).
            self._fresh_paths = GroupCommit(functools.partial(insert_settled, self.paths))
            self._fresh_answered = GroupCommit(functools.partial(insert_fresh, self.paths))
        # Paths this process saw exist lately: their next put updates at once
        # rather than first trying (and failing) to insert (a KV key's overwrites).
        self._existing: SizedLRU[tuple[str, str], bool] = SizedLRU(4096, lambda _: 1)
        # Read leases need a store that can hide a file before deleting it (GridFS).
        self._leased = hasattr(resource_storage, "mark_doomed")
        self.read_leases = ReadLeases(db)
        # Inline entries by hash: the bytes of small reads without the entry's query.
        self._inline: SizedLRU[str, Resource] = SizedLRU(
            INLINE_CACHE_BYTES, lambda res: len(res.data or b"") + 256
        )
        self._spilling: set[tuple[str, str]] = set()
        self._archiving: set[tuple[str, str]] = set()
        # History documents a closing left past HISTORY_KEPT: archived after its commit.
        self._archive_due: set[tuple[str, str]] = set()
        self._spill_lock = threading.Lock()

    @property
    def catalog(self) -> ResourceCatalog:
        return self._catalog

    def environment(self, env_uuid: str) -> Environment:
        from catalog.environment import Environment

        return Environment(self, env_uuid)

    # -- reads ----------------------------------------------------------------
    def get_for_environment(self, env_uuid: str, path: str) -> tuple[BinaryIO, int]:
        """A stream of the path's bytes and their length."""
        check_env(env_uuid)
        check_path(path)
        for attempt in range(3):
            res = self._resolve(env_uuid, path)
            try:
                return self._open_content(res), res.length
            except NotFoundError:
                if attempt == 2:
                    raise
                # The path was repointed and its old bytes deleted meanwhile.
        raise AssertionError("unreachable")  # pragma: no cover

    def open_path(self, env_uuid: str, path: str) -> tuple[BinaryIO, PathInfo]:
        """A stream of the path's bytes and what the path held when it was opened."""
        check_env(env_uuid)
        check_path(path)
        for attempt in range(3):
            doc, res = self._lookup(env_uuid, path, cached=True)
            if res is None:
                if attempt < 2:
                    continue  # repointed between the two reads, its old entry gone: again
                raise NotFoundError(f"{env_uuid}: {path!r} points at missing content", path=path)
            if res.pending:
                raise UploadPendingError(f"resource {res.id} is still being uploaded")
            try:
                return self._open_content(res), _path_info(doc, res.state, res.history)
            except NotFoundError:
                if attempt == 2:
                    raise
                # The path was repointed and its old bytes deleted meanwhile.
        raise AssertionError("unreachable")  # pragma: no cover

    def stat_for_environment(self, env_uuid: str, path: str) -> PathInfo:
        check_env(env_uuid)
        check_path(path)
        doc, res = self._lookup(env_uuid, path)
        if res is None:
            return _path_info(doc, "missing", ())
        if self.dedup_scope == "environment":
            # The content's entry is shared: its history (created when, by an upload of
            # which environment?) and its id (an ObjectId: a creation time) would tell
            # that another environment held this content first.
            return dataclasses.replace(_path_info(doc, res.state, ()), resource_id="")
        return _path_info(doc, res.state, res.history)

    def list_for_environment(self, env_uuid: str, prefix: str = "") -> list[str]:
        return [doc["path"] for doc in self.iter_paths(env_uuid, prefix)]

    def iter_paths(self, env_uuid: str, prefix: str = "", *, after: str = "") -> Any:
        """Path documents of an environment in path order (for listings with hashes).

        `after`: only paths that sort after it (a page's continuation; the
        (env, path) index bounds the scan on both sides).
        """
        check_env(env_uuid)
        check_prefix(prefix)
        query: dict[str, Any] = {"env": env_uuid, "expires_at": {"$not": {"$lte": utcnow()}}}
        if prefix:
            query["path"] = {"$regex": "^" + re.escape(prefix)}
        if after:
            query.setdefault("path", {})["$gt"] = after
        return self.paths.find(query, NO_EVENTS, sort=[("path", ASCENDING)])

    def history_for_environment(self, env_uuid: str, path: str) -> list[dict[str, Any]]:
        """Every recorded event of a path, oldest first, also after it was deleted."""
        return list(self.iter_history(env_uuid, path))

    def iter_history(self, env_uuid: str, path: str) -> Iterator[dict[str, Any]]:
        """`history_for_environment` as it is read: one archive bucket at a time.

        A hot key's past may be long (history is kept by age), so it is never
        held whole. Events move from the path document to its history document
        to the archive; they are read in that order (the recent documents when
        the first event is asked for), so an event moving meanwhile is read in
        its old place or its new one, never in neither, and shown once.
        """
        check_env(env_uuid)
        check_path(path)
        recent: list[dict[str, Any]] = []
        live = self.paths.find_one({"env": env_uuid, "path": path}, {"events": EVENTS_SHOWN})
        gone = self.history.find_one({"env": env_uuid, "path": path}, {"events": HISTORY_SHOWN})
        if gone is not None:
            recent.extend(gone.get("events") or [])
        if live is not None:
            recent.extend(path_events(live))
        uploads = [e for e in recent if not e.get("revision")]
        uploads.extend(archived_uploads(self.archive, env_uuid, path))

        def changes() -> Iterator[dict[str, Any]]:
            for events in bucket_events(self.archive, env_uuid, path):
                yield from _by_revision(events)
            yield from _by_revision(recent)

        now = utcnow()
        for event in _in_order(changes(), uploads):
            state = history.shown_state(event, now)
            yield event if state == event.get("state", "ok") else {**event, "state": state}

    # -- writes ---------------------------------------------------------------
    def put_for_environment(
        self, env_uuid: str, path: str, reader: BinaryIO, length: int = -1
    ) -> Resource:
        return self._put(env_uuid, path, reader, length, None, BLIND)[0]

    def put_for_environment_and_check_hash(
        self, env_uuid: str, path: str, reader: BinaryIO, length: int, check_hash: str | None
    ) -> Resource:
        return self._put(env_uuid, path, reader, length, check_hash or None, BLIND)[0]

    def put_path(
        self,
        env_uuid: str,
        path: str,
        reader: BinaryIO,
        length: int = -1,
        *,
        check_hash: str | None = None,
        options: WriteOptions = PLAIN,
    ) -> PathInfo:
        """A put whose conditions are checked atomically with the write; the path as left.

        A failed condition raises PreconditionFailedError and changes nothing (the
        content uploaded for it is released like that of any failed put).
        """
        res, doc = self._put(env_uuid, path, reader, length, check_hash or None, options)
        return _path_info(doc, res.state, res.history)

    def remove_for_environment(self, env_uuid: str, path: str) -> None:
        self.delete_path(env_uuid, path)

    def transaction(self) -> ContentTransaction:
        """Puts, removes and moves that take effect together when the block ends, or not at all."""
        from catalog.transaction import ContentTransaction

        return ContentTransaction(self)

    def delete_path(self, env_uuid: str, path: str, *, if_match: int | str | None = None) -> int:
        """Remove a path (only if its revision or hash matches `if_match`); its last revision."""
        check_env(env_uuid)
        check_path(path)
        return self.transact(lambda s, d: self._unlink_in(env_uuid, path, if_match, s, d))

    def move_for_environment(self, env_uuid: str, src: str, dst: str) -> PathInfo:
        """Repoint `dst` at what `src` holds and drop `src`; copies no bytes."""
        return self.move_path(env_uuid, src, env_uuid, dst)

    def move_path(self, src_env: str, src: str, dst_env: str, dst: str) -> PathInfo:
        """Repoint `dst_env:dst` at what `src_env:src` holds and drop the source, atomically.

        Also across environments (as `aws s3 mv` across buckets): one
        transaction, no bytes copied, the reference carried over.
        """
        for env, path in ((src_env, src), (dst_env, dst)):
            check_env(env)
            check_path(path)
        if (src_env, src) == (dst_env, dst):
            return self.stat_for_environment(src_env, src)
        self.transact(lambda s, d: self._move_in(src_env, src, dst, s, d, dst_env=dst_env))
        return self.stat_for_environment(dst_env, dst)

    def copy_path(self, src_env: str, src: str, dst_env: str, dst: str) -> PathInfo:
        """Point `dst_env:dst` at what `src_env:src` holds: one more reference, no bytes."""
        for env, path in ((src_env, src), (dst_env, dst)):
            check_env(env)
            check_path(path)

        def copy(session: ClientSession | None, doomed: list[str]) -> None:
            doc = self.paths.find_one(self._live_query(src_env, src), NO_EVENTS, session=session)
            if doc is None:
                raise NotFoundError(f"{src_env}: no such path {src!r}", path=src)
            if self._catalog.add_ref(str(doc["resource_id"]), session=session) is None:
                raise NotFoundError(f"{src_env}: {src!r} points at missing content", path=src)
            target = {k: doc[k] for k in ("resource_id", "hash", "length")}
            options = WriteOptions(content_type=doc.get("content_type") or None)
            self._link_in(dst_env, dst, target, options, session, doomed)

        if (src_env, src) != (dst_env, dst):
            self.transact(copy)
        return self.stat_for_environment(dst_env, dst)

    def _unlink_in(
        self,
        env_uuid: str,
        path: str,
        if_match: int | str | None,
        session: ClientSession | None,
        doomed: list[str],
    ) -> int:
        query = self._live_query(env_uuid, path)
        if if_match is not None:
            query.update(_match_query(if_match))
        doc = self.paths.find_one_and_delete(query, session=session)
        if doc is None:
            self._raise_missing_or_mismatch(env_uuid, path, if_match, session)
        closed = self._close_history(env_uuid, path, doc, "delete", None, session)
        self._release_in(str(doc["resource_id"]), session, doomed)
        return int(closed["last_rev"]) if closed else 0

    def _move_in(
        self,
        env_uuid: str,
        src: str,
        dst: str,
        session: ClientSession | None,
        doomed: list[str],
        *,
        dst_env: str | None = None,
    ) -> None:
        """Move within `env_uuid`, or to `dst_env`; history says `env:path` across them."""
        dst_env = dst_env or env_uuid
        across = dst_env != env_uuid
        doc = self.paths.find_one_and_delete(self._live_query(env_uuid, src), session=session)
        if doc is None:
            raise NotFoundError(f"{env_uuid}: no such path {src!r}", path=src)
        detail = {"to": f"{dst_env}:{dst}" if across else dst}
        self._close_history(env_uuid, src, doc, "move", detail, session)
        extra = {"content_type": doc["content_type"]} if doc.get("content_type") else {}
        unset = ("expires_at", "owner") if extra else ("expires_at", "owner", "content_type")
        came = f"{env_uuid}:{src}" if across else src
        update = self._updates.link(
            doc, event="move", detail={"from": came}, extra=extra, unset=unset
        )
        self._apply_link(dst_env, dst, {}, update, True, session, doomed)

    # -- proof of access ------------------------------------------------------
    def put_for_environment_request(self, env_uuid: str, path: str, hash: str) -> RequestResponse:
        """Challenge a client that claims to hold content we have."""
        check_env(env_uuid)
        check_path(path)
        digest = parse_hash(hash)
        # Storage is shared, but whether another environment holds this content is
        # not this caller's business: with scope "environment" only its own counts,
        # and its own paths are asked first, so that content only another environment
        # holds is refused after the same one query as content nobody holds (the
        # global lookup second made that answer measurably slower: a timing oracle).
        res: Resource | None = None
        if self.dedup_scope != "environment" or self.paths.find_one(
            {"env": env_uuid, "hash": digest}, {"_id": 1}
        ):
            res = self._catalog.lookup(digest)
        if res is None:
            raise NotFoundError(f"no stored content with hash {digest}")
        if res.pending:
            if res.lease_expired():
                raise NotFoundError(f"the upload of {digest} was abandoned; upload it")
            raise UploadPendingError(f"content {digest} is still being uploaded")
        now = utcnow()
        budget_key = self._budget.take(env_uuid, digest, now)
        ranges = choose_ranges(res.length)
        expires_at = now + datetime.timedelta(seconds=self.request_expiry)
        request_id = secrets.token_urlsafe(24)
        self.requests.insert_one(
            {
                "_id": request_id,
                "env": env_uuid,
                "path": path,
                "hash": digest,
                "resource_id": object_id(res.id),
                "ranges": [[s, n] for s, n in ranges],
                "created_at": now,
                "expires_at": expires_at,
                "budget": budget_key,
            }
        )
        return RequestResponse(request_id, ranges, expires_at)

    def proof_of_access_response(
        self, response: PutResponse, *, env_uuid: str | None = None
    ) -> Resource:
        """Check a client's answer; on success its path points at the content."""
        return self._prove(response, env_uuid)[0]

    def prove_for_environment(self, env_uuid: str, request_id: str, checksum: str) -> PathInfo:
        """Answer a request made in `env_uuid`; return what the path now holds."""
        check_env(env_uuid)
        _, env, path = self._prove(new_put_response(request_id, checksum), env_uuid)
        return self.stat_for_environment(env, path)

    def ping(self) -> None:
        """Raise unless the database answers (for health checks)."""
        self.db.command("ping")

    def _prove(self, response: PutResponse, env_uuid: str | None) -> tuple[Resource, str, str]:
        request_id = getattr(response, "request_id", None)
        if not isinstance(request_id, str) or not _REQUEST_ID_RE.fullmatch(request_id):
            raise RequestExpiredError("unknown put request")
        doc = self.requests.find_one_and_delete({"_id": request_id})
        if doc is None:
            raise RequestExpiredError("unknown or already answered put request")
        if aware(doc["expires_at"]) <= utcnow():
            raise RequestExpiredError("the put request has expired")
        if env_uuid is not None and env_uuid != doc["env"]:
            raise RequestExpiredError("the put request belongs to another environment")
        try:
            checksum = parse_hash(response.checksum)
        except BadRequestError:
            raise ResponseMismatchError("the checksum is not a BLAKE3 hex digest") from None
        res = self._ready(str(doc["resource_id"]), doc["hash"])
        ranges = [(int(s), int(n)) for s, n in doc["ranges"]]
        try:
            reader = self._open_content(res)
        except NotFoundError:
            raise ResourceDeletedError("the content was deleted since the request") from None
        try:
            expected = ranges_checksum(reader, ranges)
        finally:
            reader.close()
        if not hmac.compare_digest(expected, checksum):
            raise ResponseMismatchError("the proof checksum does not match the content")
        if doc.get("budget"):
            self._budget.give_back(doc["budget"])

        def link(session: ClientSession | None, doomed: list[str]) -> Resource:
            if self._catalog.add_ref(res.id, session=session) is None:
                raise ResourceDeletedError("the content was deleted since the request")
            target = {"resource_id": object_id(res.id), "hash": res.hash, "length": res.length}
            self._link_in(doc["env"], doc["path"], target, PLAIN, session, doomed)
            return res

        return self.transact(link), doc["env"], doc["path"]

    # -- internals: put ------------------------------------------------------
    def _put(
        self,
        env_uuid: str,
        path: str,
        reader: BinaryIO,
        length: int,
        check_hash: str | None,
        options: WriteOptions,
    ) -> tuple[Resource, dict[str, Any]]:
        check_env(env_uuid)
        check_path(path)
        if not isinstance(length, int) or isinstance(length, bool):
            raise BadRequestError(f"invalid length: {length!r}")
        length = max(length, -1)
        expected = parse_hash(check_hash) if check_hash else None
        limit = max(self.inline_max, options.inline_max)
        if 0 <= length <= limit:
            with self._failure_recorded(env_uuid, path, options):
                data = read_exact(reader, length)
                if len(data) != length:
                    raise LengthMismatchError(f"expected {length} bytes, the input has {len(data)}")
                return self._put_small(env_uuid, path, data, expected, options)
        if length < 0:
            start = reader.tell() if is_seekable(reader) else None
            with self._failure_recorded(env_uuid, path, options):
                head = read_exact(reader, limit + 1)
                if len(head) <= limit:
                    return self._put_small(env_uuid, path, head, expected, options)
            if start is not None:
                reader.seek(start)
            else:
                reader = cast(BinaryIO, PrefixedReader(head, reader))
        return self._put_large(env_uuid, path, reader, length, expected, options)

    def _put_large(
        self,
        env_uuid: str,
        path: str,
        reader: BinaryIO,
        length: int,
        expected: str | None,
        options: WriteOptions,
    ) -> tuple[Resource, dict[str, Any]]:
        """A streamed upload, shown as `pending` in the path's history while it runs."""
        if options.if_none_match and options.link:
            self._check_creatable(env_uuid, path, options.pending_op)
        op = options.pending_op
        beat: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if options.link:
            lease = self._catalog.lease
            if op is None:
                op = self._start_upload(env_uuid, path)
            beat = Heartbeat(
                lambda: history.renew_upload(self.history, env_uuid, path, op, lease), lease / 4
            )
        try:
            with beat:
                result = self._put_streamed(env_uuid, path, reader, length, expected, options)
        except BaseException as exc:
            if op is not None:
                # A refused condition is no failed upload (as with a small put): its
                # pending item just goes.
                refused = isinstance(exc, PreconditionFailedError)
                with contextlib.suppress(Exception):
                    history.finish_upload(self.history, env_uuid, path, op, ok=refused)
            raise
        if op is not None:
            history.finish_upload(self.history, env_uuid, path, op, ok=True)
        return result

    def upload_abandoned(self, env_uuid: str, path: str, op: ObjectId | None = None) -> None:
        """Show an upload whose bytes never reached a put as a failed one in the path's history.

        A service receives the first block of a body before it calls put (a
        slow client then holds no worker thread); a client that goes away or
        stalls in that block never reaches `_failure_recorded`, and its upload
        would leave no trace where the contract lists every abandoned one.
        op: its pending item (`upload_started`), which turns `failed`.
        """
        check_env(env_uuid)
        check_path(path)
        if op is not None:
            history.finish_upload(self.history, env_uuid, path, op, ok=False)
        else:
            history.failed_upload(self.history, env_uuid, path)

    def upload_started(self, env_uuid: str, path: str, *, create_only: bool = False) -> ObjectId:
        """A pending item for an upload whose body is still arriving; pass it as `pending_op`.

        A service that receives a small body before it calls put would else show
        nothing while a slow client sends it: the contract lists the first
        upload of a path as pending, and a create-only put must see it running.
        create_only: PreconditionFailedError first if the path exists or an
        upload of it is running. Renew it with `upload_renew` every lease / 4.
        """
        check_env(env_uuid)
        check_path(path)
        if create_only:
            self._check_creatable(env_uuid, path)
        return self._start_upload(env_uuid, path)

    def upload_renew(self, env_uuid: str, path: str, op: ObjectId) -> None:
        history.renew_upload(self.history, env_uuid, path, op, self._catalog.lease)

    @property
    def upload_lease(self) -> float:
        """Seconds a pending item lives unless renewed."""
        return self._catalog.lease

    def _start_upload(self, env_uuid: str, path: str) -> ObjectId:
        replacing = self.paths.find_one({"env": env_uuid, "path": path}, {"_id": 1})
        return history.start_upload(
            self.history, env_uuid, path, self._catalog.lease, replacing=replacing is not None
        )

    @contextlib.contextmanager
    def _failure_recorded(self, env_uuid: str, path: str, options: WriteOptions) -> Iterator[None]:
        """A small put that fails shows as a failed `upload` in the path's history.

        As a streamed one does (its `pending` item turns `failed`); a small put
        writes no pending item, so the failed one is written only on failure.
        A refused condition is not a failed upload: nothing was stored, and a
        compare-and-swap loop under contention would fill the history with them.
        """
        op = options.pending_op
        try:
            yield
        except PreconditionFailedError:
            if op is not None:  # a refused condition: no failed upload, the item goes
                with contextlib.suppress(Exception):
                    history.finish_upload(self.history, env_uuid, path, op, ok=True)
            raise
        except BaseException:
            if options.link:
                with contextlib.suppress(Exception):
                    if op is not None:
                        history.finish_upload(self.history, env_uuid, path, op, ok=False)
                    else:
                        history.failed_upload(self.history, env_uuid, path)
            raise

    def check_creatable(self, env_uuid: str, path: str) -> None:
        """PreconditionFailedError if a create-only put of `path` would fail now.

        The path exists (and has not expired), or its first upload is running.
        Advisory: the put checks again in its own atomic step.
        """
        check_env(env_uuid)
        check_path(path)
        self._check_creatable(env_uuid, path)

    def _check_creatable(self, env_uuid: str, path: str, own: ObjectId | None = None) -> None:
        """Create-only fails early if the path exists or its first upload is running.

        own: this upload's pending item: only uploads that began before it count.
        """
        doc = self.paths.find_one({"env": env_uuid, "path": path}, NO_EVENTS)
        if doc is not None and not _expired(doc):
            raise PreconditionFailedError(f"{env_uuid}: {path!r} exists")
        if history.upload_in_progress(self.history, env_uuid, path, before=own):
            raise PreconditionFailedError(f"{env_uuid}: {path!r} is being uploaded")

    def _put_streamed(
        self,
        env_uuid: str,
        path: str,
        reader: BinaryIO,
        length: int,
        expected: str | None,
        options: WriteOptions,
    ) -> tuple[Resource, dict[str, Any]]:
        verified = False
        start = None
        if expected is None and is_seekable(reader):
            # A hashing pass is ~20x cheaper than writing, and lets known content
            # cost nothing more.
            start = reader.tell()
            expected, seen = hash_stream(reader, length)
            if length >= 0 and seen != length:
                raise LengthMismatchError(f"expected {length} bytes, the input has {seen}")
            length, verified = seen, True
        if expected is not None and length >= 0:
            return self._put_known(
                env_uuid, path, reader, length, expected, verified, start, options
            )
        if expected is not None:
            known = self._catalog.lookup(expected)
            if known is not None and not known.pending:
                # Length unknown (a chunked body) but the content is stored: hash only,
                # and the input must end exactly where the stored content does.
                return self._put_known(
                    env_uuid, path, reader, known.length, expected, False, None, options,
                    until_eof=True,
                )  # fmt: skip
        return self._put_unknown(env_uuid, path, reader, length, expected, options)

    def _put_small(
        self,
        env_uuid: str,
        path: str,
        data: bytes,
        expected: str | None,
        options: WriteOptions,
    ) -> tuple[Resource, dict[str, Any]]:
        """Two majority writes, no thread: the entry (with the bytes) and the path."""
        digest = blake3.blake3(data).hexdigest()
        if expected is not None and digest != expected:
            raise HashMismatchError(f"content hashes to {digest}, not {expected}")
        if options.if_none_match and options.link:
            self._check_creatable(env_uuid, path, options.pending_op)
        res = self._catalog.acquire_inline(digest, data)
        try:
            doc = self._link(env_uuid, path, res, options)
        except BaseException as exc:
            self._release_failed(res.id, exc)
            raise
        if options.pending_op is not None:
            history.finish_upload(self.history, env_uuid, path, options.pending_op, ok=True)
        self._keep_inline(res)
        return res, doc

    def _put_known(
        self,
        env_uuid: str,
        path: str,
        reader: BinaryIO,
        length: int,
        digest: str,
        verified: bool,
        start: int | None,
        options: WriteOptions,
        *,
        until_eof: bool = False,
    ) -> tuple[Resource, dict[str, Any]]:
        res, created = self._catalog.acquire(digest, length, uploading=True)
        rid = res.id
        try:
            with self._holding(rid):
                if res.path:
                    if not verified:
                        seen_hash, seen = hash_stream(reader, length)
                        if until_eof and seen == length:
                            seen += len(reader.read(1) or b"")
                        _check(digest, length, seen_hash, seen)
                else:
                    if start is not None:
                        reader.seek(start)
                    if not created:  # another uploader's entry: note that we upload too
                        self._catalog.renew_lease(rid, state="uploading")
                    res = self._upload(res, reader, length, digest)
                return res, self._link(env_uuid, path, res, options)
        except BaseException as exc:
            self._release_failed(rid, exc)
            raise

    def _put_unknown(
        self,
        env_uuid: str,
        path: str,
        reader: BinaryIO,
        length: int,
        expected: str | None,
        options: WriteOptions,
    ) -> tuple[Resource, dict[str, Any]]:
        """Store the bytes first (their hash is known only then), then take the entry.

        From the stored file's commit point until an entry records it, no entry
        points at the file and no pending entry's lease covers its hash: to gc it
        is an orphan, kept only by the grace period. So the file is held by a
        read lease (renewed while it uploads, as a reader's is), which gc honours
        whatever the grace; it is dropped once an entry records the file or we
        discarded it.
        """
        tmp = new_storage_path()
        lease = self.read_leases.take(tmp, durable=False) if self._leased else None
        try:
            with self._read_held(lease):
                return self._put_unknown_held(
                    env_uuid, path, reader, tmp, length, expected, options
                )
        finally:
            if lease is not None:
                # Deletes tmp if we discarded it meanwhile; if this fails, the lease runs
                # out and gc takes what is left.
                with contextlib.suppress(Exception):
                    self._reader_closed(lease)

    def _read_held(self, lease: Any) -> contextlib.AbstractContextManager[Any]:
        if lease is None:
            return contextlib.nullcontext()
        return Heartbeat(lambda: self.read_leases.renew(lease), self.read_leases.ttl / 4)

    def _put_unknown_held(
        self,
        env_uuid: str,
        path: str,
        reader: BinaryIO,
        tmp: str,
        length: int,
        expected: str | None,
        options: WriteOptions,
    ) -> tuple[Resource, dict[str, Any]]:
        counted = WatchedReader(reader)
        digest = self.resource_storage.put(tmp, counted, length)
        try:
            if expected is not None and digest != expected:
                raise HashMismatchError(f"content hashes to {digest}, not {expected}")
            res, _ = self._catalog.acquire(digest, counted.count, uploading=True)
        except BaseException:
            self._discard(tmp)
            raise
        rid = res.id
        try:
            with self._holding(rid):
                if res.path:
                    self._discard(tmp)
                else:
                    res = self._complete(res, tmp)
                return res, self._link(env_uuid, path, res, options)
        except BaseException as exc:
            self._release_failed(rid, exc)
            raise

    def _upload(self, res: Resource, reader: BinaryIO, length: int, digest: str) -> Resource:
        """Write the bytes of a pending entry; lose gracefully to a faster uploader."""
        tmp = new_storage_path()
        watched = WatchedReader(reader)
        written = self.resource_storage.put(tmp, watched, length)
        if written != digest or watched.count != length:
            self._discard(tmp)
            _check(digest, length, written, watched.count)
        return self._complete(res, tmp)

    def _holding(self, rid: str) -> Heartbeat:
        """Keep the lease of a reference no path backs yet alive until the link commits.

        gc recounts an entry only once its lease has run out, so this is what keeps
        an in-flight reference from being recounted away however slow the client.
        """
        return Heartbeat(lambda: self._catalog.renew_lease(rid), self._catalog.lease / 4)

    def _complete(self, res: Resource, storage_path: str) -> Resource:
        """Record our copy as the entry's bytes; return the entry as it now is."""
        try:
            self._catalog.upload_complete(res.id, storage_path)
        except AlreadyExistsError:
            self._discard(storage_path)  # another uploader completed first: use theirs
            return self._catalog.entry(res.id)
        except BaseException as exc:
            if not outcome_unknown(exc):  # else the entry may record them: gc decides
                self._discard(storage_path)
            raise
        return dataclasses.replace(res, path=storage_path, state=READY)

    # -- internals: references -------------------------------------------------
    def _link(
        self, env_uuid: str, path: str, res: Resource, options: WriteOptions = PLAIN
    ) -> dict[str, Any]:
        """Point a path at a resource we hold a reference to; the path document after.

        One upsert is the commit point, with the write's condition in its query;
        its pipeline keeps the resource the path held before in `prev_rid`, whose
        reference is dropped after it. A crash between the two leaves a count one
        too high, never too low (gc recounts it), so no transaction is needed.
        From the commit to the drop that reference is held by no path: gc does
        not recount an entry a path has just let go (`dropping`, recently), or
        the drop would then take a reference another path holds.
        Without pipelines (mongomock) the classic update runs through transact.
        """
        if not options.link:
            return {}
        target = {"resource_id": object_id(res.id), "hash": res.hash, "length": res.length}
        if not self._updates.pipelines:
            return self.transact(lambda s, d: self._link_in(env_uuid, path, target, options, s, d))
        if (
            self._fresh_paths is not None
            and _insertable(options)
            and self._existing.get((env_uuid, path)) is None
        ):
            extra = {"content_type": options.content_type} if options.content_type else {}
            new = fresh(env_uuid, path, target, extra)
            if not options.answer and self._fresh_paths.submit(new):
                return {}  # a new path: nothing held before, nothing to release
            if options.answer and self._fresh_answered is not None:
                inserted = self._fresh_answered.submit(new)
                if inserted is not None:
                    return inserted
            self._existing.add((env_uuid, path), True)
        query: dict[str, Any] = {"env": env_uuid, "path": path}
        if options.if_match is not None:
            query.update(_match_query(options.if_match))
            query["expires_at"] = {"$not": {"$lte": utcnow()}}
        elif options.if_none_match:
            query["$or"] = [{"resource_id": {"$exists": False}}, {"expires_at": {"$lte": utcnow()}}]
        update = self._link_update(target, options, dropping=self._catalog.lease)
        for attempt in itertools.count():
            try:
                doc = self.paths.find_one_and_update(
                    query,
                    update,
                    upsert=options.if_match is None,
                    projection=NO_EVENTS,
                    return_document=ReturnDocument.AFTER,
                )
                break
            except DuplicateKeyError:
                if options.if_none_match:
                    raise PreconditionFailedError(f"{env_uuid}: {path!r} exists") from None
                if attempt >= 5:
                    raise
                # two first writers of one path: the loser retries as an update
        if doc is None:  # only a conditional update matches nothing
            current = self.paths.find_one(self._live_query(env_uuid, path), {"rev": 1})
            if current is None:
                raise PreconditionFailedError(f"{env_uuid}: no such path {path!r}")
            raise PreconditionFailedError(
                f"{env_uuid}: {path!r} changed (revision {revision(current.get('rev'))})"
            )
        if doc.get("prev_rid") is None:  # created it: maybe while its delete committed
            raised = settle_created(self.paths, [doc], self._updates.mode)
            if doc["_id"] in raised:
                doc = {**doc, "rev": raised[doc["_id"]]}
        old = doc.get("prev_rid")
        if old is not None:
            self._existing.add((env_uuid, path), True)
            try:
                self._release(str(old))
            except Exception:
                # Past the commit point a failure must not fail the put: its caller
                # would then drop the reference the path now holds. The count left
                # one too high is gc's to recount.
                log.warning("releasing %s after a link failed", old, exc_info=True)
        self._spill_if_full(env_uuid, path, doc)
        return dict(doc)

    def letting_go(self, rid: Any, *, session: ClientSession | None = None) -> bool:
        """Has a put let this entry go and may not have dropped its reference yet?

        A put's link commits first and drops the old reference after (_link),
        within its lease (`dropping_until`). gc recounting in between, then the
        drop, would take one reference too many and delete content other paths
        hold; so gc and fsck leave such an entry's count alone until then. A put
        that died between the two leaves a count one too high, recounted once
        that lease has passed.
        """
        query = {
            "$and": [{"dropping": rid}, {"dropping": {"$type": "objectId"}}],  # partial index
            "dropping_until": {"$gt": utcnow()},
        }
        return self.paths.find_one(query, {"_id": 1}, session=session) is not None

    def _spill_if_full(self, env_uuid: str, path: str, doc: dict[str, Any]) -> None:
        """Past SPILL_AT events, move the older ones to the path's history document.

        Past the commit point: a failure is logged, not raised (the next writer
        spills, and the document is cut back at EVENTS_KEPT in any case). One
        spill per path at a time in this process; two from different processes
        copy the same events twice, which readers show once.
        """
        if int(doc.get("n_events") or 0) <= SPILL_AT:
            return
        self._history_work(self._spilling, "moving the events of", self._spill, env_uuid, path)

    def _history_work(
        self,
        running: set[tuple[str, str]],
        what: str,
        fn: Callable[[str, str], Any],
        env_uuid: str,
        path: str,
    ) -> None:
        """fn(env, path) past the commit point: once at a time per path here, failures logged."""
        key = (env_uuid, path)
        with self._spill_lock:
            if key in running:
                return
            running.add(key)
        try:
            fn(env_uuid, path)
        except Exception:
            log.warning("%s %s:%s failed", what, env_uuid, path, exc_info=True)
        finally:
            with self._spill_lock:
                running.discard(key)

    def _spill(self, env_uuid: str, path: str) -> None:
        """Copy all but the newest LIVE_EVENTS to the history document, then drop them here.

        Copied first and dropped after: a crash in between leaves some events in
        both documents (shown once), never in neither.
        """
        doc = self.paths.find_one({"env": env_uuid, "path": path}, {"events": 1})
        events = list((doc or {}).get("events") or [])
        if doc is None or len(events) <= SPILL_AT:
            return
        moved = events[: len(events) - LIVE_EVENTS]
        held = self.history.find_one_and_update(
            {"env": env_uuid, "path": path},
            self._updates.spilled(moved),
            upsert=True,
            projection={"n_events": 1},
            return_document=ReturnDocument.AFTER,
        )
        upto = max(int(e.get("revision") or 0) for e in moved)
        self.paths.update_one({"_id": doc["_id"]}, self._updates.trim(upto))
        if held is not None and int(held.get("n_events") or 0) > HISTORY_KEPT:
            self._archive_old(env_uuid, path)

    def _close_history(
        self,
        env_uuid: str,
        path: str,
        doc: dict[str, Any],
        event: str,
        detail: dict[str, Any] | None,
        session: ClientSession | None,
    ) -> dict[str, Any] | None:
        """Record that `doc`'s path went (its events and the last) in its history document.

        A document this leaves past HISTORY_KEPT events is archived once the
        transaction has committed (`transact`).
        """
        closed: dict[str, Any] | None = self.history.find_one_and_update(
            {"env": env_uuid, "path": path},
            self._updates.closing(doc, event, detail),
            upsert=True,
            projection={"last_rev": 1, "n_events": 1},
            return_document=ReturnDocument.AFTER,
            session=session,
        )
        if closed is not None and int(closed.get("n_events") or 0) > HISTORY_KEPT:
            with self._spill_lock:
                self._archive_due.add((env_uuid, path))
        return closed

    def _archive_due_now(self) -> None:
        if not self._archive_due:
            return
        with self._spill_lock:
            due, self._archive_due = self._archive_due, set()
        for env_uuid, path in due:
            self._archive_old(env_uuid, path)

    def _archive_old(self, env_uuid: str, path: str) -> None:
        """Move a full history document's oldest events to `path_archive` (catalog.archive).

        Past the commit point, as spills: a failure is logged, not raised (the
        next writer that finds the document full tries again).
        """
        archive = functools.partial(archive_old, self.history, self.archive)
        self._history_work(self._archiving, "archiving the history of", archive, env_uuid, path)

    def _link_update(
        self, target: dict[str, Any], options: WriteOptions, *, dropping: float | None = None
    ) -> Any:
        extra: dict[str, Any] = {}
        unset: tuple[str, ...] = ()
        if options.expires_at is not None:
            extra["expires_at"] = options.expires_at
            extra["owner"] = options.owner or ""
        else:
            unset = ("expires_at", "owner")
        if options.content_type:
            extra["content_type"] = options.content_type
        else:  # the type of the bytes replaced is not the type of these
            unset = (*unset, "content_type")
        return self._updates.link(target, extra=extra, unset=unset, dropping=dropping)

    def _link_in(
        self,
        env_uuid: str,
        path: str,
        target: dict[str, Any],
        options: WriteOptions,
        session: ClientSession | None,
        doomed: list[str],
    ) -> dict[str, Any]:
        """Point a path at a resource we hold a reference to; release what it held.

        Conditions are read and then written as one document update inside the
        transaction: a concurrent change of that path is a write conflict, and
        the loser's transaction reruns (and then fails its condition).
        """
        query: dict[str, Any] = {}
        if options.if_match is not None or options.if_none_match:
            current = self.paths.find_one(
                {"env": env_uuid, "path": path}, NO_EVENTS, session=session
            )
            live = current is not None and not _expired(current)
            if options.if_none_match and live:
                raise PreconditionFailedError(f"{env_uuid}: {path!r} exists")
            if options.if_match is not None:
                if current is None or not live:
                    raise PreconditionFailedError(f"{env_uuid}: no such path {path!r}")
                if not _matches(current, options.if_match):
                    raise PreconditionFailedError(
                        f"{env_uuid}: {path!r} changed (revision {revision(current.get('rev'))})"
                    )
            if current is not None:
                query["rev"] = current.get("rev")
        update = self._link_update(target, options)
        return self._apply_link(env_uuid, path, query, update, True, session, doomed)

    def _apply_link(
        self,
        env_uuid: str,
        path: str,
        query: dict[str, Any],
        update: Any,
        upsert: bool,
        session: ClientSession | None,
        doomed: list[str],
    ) -> dict[str, Any]:
        """Run a link update; release the reference the path held before."""
        query = {"env": env_uuid, "path": path, **query}
        if self._updates.pipelines:
            doc = self.paths.find_one_and_update(
                query,
                update,
                upsert=upsert,
                projection=NO_EVENTS,
                return_document=ReturnDocument.AFTER,
                session=session,
            )
            if doc is None:
                raise PreconditionFailedError(f"{env_uuid}: {path!r} changed meanwhile")
            old = doc.get("prev_rid")
        else:
            before = self.paths.find_one_and_update(
                query, update, upsert=upsert, projection=NO_EVENTS, session=session
            )
            old = before.get("resource_id") if before is not None else None
            doc = self.paths.find_one({"env": env_uuid, "path": path}, NO_EVENTS, session=session)
            assert doc is not None
        if old is not None:
            self._release_in(str(old), session, doomed)
        if session is None:
            self._spill_if_full(env_uuid, path, doc)
        return dict(doc)

    def _live_query(self, env_uuid: str, path: str) -> dict[str, Any]:
        return {"env": env_uuid, "path": path, "expires_at": {"$not": {"$lte": utcnow()}}}

    def _raise_missing_or_mismatch(
        self, env_uuid: str, path: str, if_match: int | str | None, session: ClientSession | None
    ) -> NoReturn:
        if if_match is not None:
            doc = self.paths.find_one(self._live_query(env_uuid, path), {"rev": 1}, session=session)
            if doc is not None:  # said as a put's refused condition says it
                raise PreconditionFailedError(
                    f"{env_uuid}: {path!r} changed (revision {revision(doc.get('rev'))}), "
                    f"does not match {if_match!r}"
                )
        raise NotFoundError(f"{env_uuid}: no such path {path!r}", path=path)

    def _release_in(
        self, rid: str, session: ClientSession | None, doomed: list[str], *, durable: bool = True
    ) -> None:
        try:
            deleted, storage_path = self._catalog.remove(rid, session=session, durable=durable)
        except NotFoundError:
            return
        if deleted and storage_path and storage_path != INLINE:
            doomed.append(storage_path)  # inline bytes went with their entry

    def _release_failed(self, rid: str, exc: BaseException) -> None:
        """Drop the reference of a put that failed, unless its link may have committed.

        After a database error that may hide an applied write (the answer to the
        link was lost), the path may hold this reference now: dropping it could
        delete the bytes under it. Kept, the count is at worst one too high, which
        gc recounts once the lease has run out.
        """
        if not outcome_unknown(exc):
            self._release(rid)

    def _release(self, rid: str) -> None:
        """Drop a reference no path holds: after a link's commit point, or when a put failed.

        Not a majority write (see ResourceCatalog.remove): losing it in a
        failover leaves the count one too high, as a crash just before it
        would, and gc recounts that.
        """
        doomed: list[str] = []
        self._release_in(rid, None, doomed, durable=False)
        for storage_path in doomed:
            self._discard(storage_path)

    def _discard(self, storage_path: str) -> None:
        """Delete bytes nothing references: now, or when their last reader closes."""
        if self._leased:
            if not self.resource_storage.mark_doomed(storage_path):
                return  # gone already
            if self.read_leases.live(storage_path):
                return  # the last reader deletes them (gc if it dies)
        with contextlib.suppress(NotFoundError):
            self.resource_storage.remove(storage_path)

    def transact(self, fn: Callable[[ClientSession | None, list[str]], T]) -> T:
        """Run fn(session, doomed) in a transaction when the server has them.

        fn appends to `doomed` the storage paths whose last reference it
        dropped; they are deleted once the transaction has committed.
        """
        while True:
            doomed: list[str] = []
            try:
                result = self._run_once(fn, doomed)
            except DuplicateKeyError:
                continue  # two first writers of one path: the loser retries as an update
            for storage_path in doomed:
                self._discard(storage_path)
            self._archive_due_now()
            return result

    def _run_once(self, fn: Callable[[ClientSession | None, list[str]], T], doomed: list[str]) -> T:
        if not self._transactions:
            return fn(None, doomed)

        def body(session: ClientSession) -> T:
            doomed.clear()  # with_transaction may run the body more than once
            return fn(session, doomed)

        with self.db.client.start_session() as session:
            # Killed inside it, this process's transaction is aborted by others in seconds.
            owners_of(self.db).register(session)
            return session.with_transaction(body, write_concern=WriteConcern("majority"))

    def _open_content(self, res: Resource) -> BinaryIO:
        """The bytes of a ready entry, wherever they live, held open by a read lease."""
        if res.inline:
            return io.BytesIO(res.data if res.data is not None else b"")
        if not self._leased:
            return cast(BinaryIO, self.resource_storage.get(res.path))
        lease = self.read_leases.take(res.path)
        try:
            reader = self.resource_storage.get(res.path)
        except BaseException:
            self._reader_closed(lease)
            raise
        reader.on_chunk = self.read_leases.renewer(lease)
        reader.on_close = lambda: self._reader_closed(lease)
        return cast(BinaryIO, reader)

    def _reader_closed(self, lease: Any) -> None:
        """The last reader of bytes whose last reference went deletes them."""
        storage_path = self.read_leases.drop(lease)
        if (
            storage_path is not None
            and self.resource_storage.is_doomed(storage_path)
            and not self.read_leases.live(storage_path)
        ):
            with contextlib.suppress(NotFoundError):
                self.resource_storage.remove(storage_path)

    def _path_doc(self, env_uuid: str, path: str) -> dict[str, Any]:
        doc = self.paths.find_one({"env": env_uuid, "path": path}, NO_EVENTS)
        if doc is None or _expired(doc):
            raise NotFoundError(f"{env_uuid}: no such path {path!r}", path=path)
        return dict(doc)

    def _lookup(
        self, env_uuid: str, path: str, *, cached: bool = False
    ) -> tuple[dict[str, Any], Resource | None]:
        """The live path document and its catalog entry (None if the entry is gone).

        One round trip ($lookup) where the server has aggregation joins: a small
        read is bound by per-request cost, and this halves it. cached: for
        reads of the bytes, the path document alone when its inline entry is
        one this process has read or written (see INLINE_CACHE_BYTES).
        """
        if cached:
            return self._lookup_cached(env_uuid, path)
        if not self._updates.pipelines:
            doc = self._path_doc(env_uuid, path)
            try:
                return doc, self._catalog.entry(str(doc["resource_id"]))
            except NotFoundError:
                return doc, None
        found = list(
            self.paths.aggregate(
                [
                    {"$match": {"env": env_uuid, "path": path}},
                    {"$limit": 1},
                    {"$project": NO_EVENTS},
                    {
                        "$lookup": {
                            "from": self._catalog.collection.name,
                            "localField": "resource_id",
                            "foreignField": "_id",
                            "as": "entry",
                        }
                    },
                ]
            )
        )
        if not found or _expired(found[0]):
            raise NotFoundError(f"{env_uuid}: no such path {path!r}", path=path)
        doc = found[0]
        entries = doc.pop("entry", [])
        return doc, to_resource(entries[0]) if entries else None

    def _lookup_cached(self, env_uuid: str, path: str) -> tuple[dict[str, Any], Resource | None]:
        doc = self._path_doc(env_uuid, path)
        rid = str(doc["resource_id"])
        known = self._inline.get(str(doc.get("hash", "")))
        if known is not None and known.id == rid:  # the same entry, not one made anew since
            return doc, known
        try:
            res = self._catalog.entry(rid)
        except NotFoundError:
            return doc, None
        self._keep_inline(res, read=True)
        return doc, res

    def _keep_inline(self, res: Resource, *, read: bool = False) -> None:
        """Keep small content by hash; bytes `read` from the database only if they hash to it.

        Served from here until the process ends, damaged bytes would outlive
        their repair in the database (gc or a restore); readers of them fail
        their hash check, and the next read looks again.
        """
        if res.inline and res.data is not None and not res.pending:
            if read and blake3.blake3(res.data).hexdigest() != res.hash:
                return
            self._inline.add(res.hash, res)

    def _resolve(self, env_uuid: str, path: str) -> Resource:
        _, res = self._lookup(env_uuid, path, cached=True)
        if res is None:
            raise NotFoundError(f"{env_uuid}: {path!r} points at missing content", path=path)
        if res.pending:
            raise UploadPendingError(f"resource {res.id} is still being uploaded")
        return res

    def _ready(self, rid: str, digest: str) -> Resource:
        try:
            res = self._catalog.entry(rid)
        except NotFoundError:
            raise ResourceDeletedError("the content was deleted since the request") from None
        if res.hash != digest or res.pending:
            raise ResourceDeletedError("the content was deleted since the request")
        return res

    # -- content already written elsewhere (upload sessions) --------------------
    def commit_stored(
        self,
        env_uuid: str,
        path: str,
        digest: str,
        length: int,
        *,
        store: Callable[[str], None],
        drop: Callable[[], None],
        options: WriteOptions = PLAIN,
    ) -> PathInfo:
        """Point a path at content whose bytes a caller has written already.

        store(storage_path) makes those bytes the stored file at storage_path (no
        copy: an upload session gives its chunks a files document); drop() throws
        them away. Known content keeps its stored copy and ours is dropped once the
        path is linked; new content records ours. On failure the reference is
        released, and bytes not yet stored stay with the caller.
        """
        check_env(env_uuid)
        check_path(path)
        digest = parse_hash(digest)
        res, _ = self._catalog.acquire(digest, length, uploading=True)
        rid = res.id
        known = bool(res.path)
        try:
            with self._holding(rid):
                if not known:
                    storage_path = new_storage_path()
                    store(storage_path)  # cleans up after itself if it fails
                    res = self._complete(res, storage_path)  # drops ours if another won
                doc = self._link(env_uuid, path, res, options)
        except BaseException as exc:
            self._release_failed(rid, exc)
            raise
        if known:
            drop()
        return _path_info(doc, res.state, res.history)

    def adopt_stored(
        self,
        env_uuid: str,
        path: str,
        digest: str,
        length: int,
        storage_path: str,
        options: WriteOptions = PLAIN,
    ) -> PathInfo:
        """Finish a commit_stored whose writer died after its bytes became a stored file.

        The bytes are whole and durable at `storage_path` (commit_stored stores
        them before anything refers to them), so the commit rolls forward: they
        become the entry's bytes unless the entry has some already (then ours
        go), and the path is linked with the writer's condition. The dead
        writer's reference stays one too many, which gc recounts.
        """
        check_env(env_uuid)
        check_path(path)
        digest = parse_hash(digest)
        res, _ = self._catalog.acquire(digest, length, uploading=True)
        rid = res.id
        try:
            with self._holding(rid):
                if not res.path:
                    res = self._complete(res, storage_path)  # drops ours if another won
                doc = self._link(env_uuid, path, res, options)
        except BaseException as exc:
            self._release_failed(rid, exc)
            raise
        if res.path != storage_path:
            self._discard(storage_path)  # the entry holds another copy
        return _path_info(doc, res.state, res.history)

    def delete_paths(self, env_uuid: str, paths: list[str]) -> list[str]:
        """Remove many paths in one transaction (missing ones skipped); those that went.

        What delete_path does for each, with one commit for all of them (a driver's
        directory delete).
        """
        check_env(env_uuid)
        for path in paths:
            check_path(path)

        def unlink(session: ClientSession | None, doomed: list[str]) -> list[str]:
            removed: list[str] = []
            for path in paths:
                query = self._live_query(env_uuid, path)
                doc = self.paths.find_one_and_delete(query, session=session)
                if doc is None:
                    continue
                self._close_history(env_uuid, path, doc, "delete", None, session)
                self._release_in(str(doc["resource_id"]), session, doomed)
                removed.append(path)
            return removed

        return self.transact(unlink)

    # -- for leases and fenced writes (catalog.kv) -------------------------------
    def renew_expiry(
        self, env_uuid: str, paths: list[str], owner: str, expires_at: datetime.datetime
    ) -> set[str]:
        """Move the expiry of `owner`'s live TTL paths to `expires_at`; the paths renewed.

        Renewing changes no revision and no content: the path is the same key,
        kept alive. A path that expired, was deleted or was written by anyone
        else since (another owner, or made permanent) is not renewed.
        """
        check_env(env_uuid)
        query: dict[str, Any] = {
            "env": env_uuid,
            "path": {"$in": list(paths)},
            "owner": owner,
            "expires_at": {"$gt": utcnow()},
        }
        self.paths.update_many(query, {"$set": {"expires_at": expires_at}})
        query["expires_at"] = expires_at
        return {doc["path"] for doc in self.paths.find(query, {"path": 1})}

    def delete_expired(self, env_uuid: str, path: str, revision: int) -> bool:
        """Delete a TTL path that has expired (and is still at `revision`); False if not.

        Like delete_path for a path reads no longer see: its history records the
        deletion and its content reference is released.
        """
        check_env(env_uuid)
        check_path(path)

        def unlink(session: ClientSession | None, doomed: list[str]) -> bool:
            query = {
                "env": env_uuid,
                "path": path,
                "rev": revision,
                "expires_at": {"$lte": utcnow()},
            }
            doc = self.paths.find_one_and_delete(query, session=session)
            if doc is None:
                return False
            self._close_history(env_uuid, path, doc, "delete", {"expired": True}, session)
            self._release_in(str(doc["resource_id"]), session, doomed)
            return True

        return self.transact(unlink)

    def put_guarded(
        self,
        env_uuid: str,
        path: str,
        data: bytes,
        guard: Callable[[ClientSession | None], None],
        options: WriteOptions = PLAIN,
    ) -> PathInfo:
        """Put `data`, linking it in a transaction whose first step is guard(session).

        guard raises to refuse the write (nothing changes; the reference taken
        for the content is released). What guard reads and writes commits or
        aborts with the link, so a condition on another document holds at the
        write: a fenced lock write touches its lock document there.
        """
        check_env(env_uuid)
        check_path(path)
        digest = blake3.blake3(data).hexdigest()
        if len(data) <= max(self.inline_max, options.inline_max):
            res = self._catalog.acquire_inline(digest, data)
        else:
            res, _ = self._catalog.acquire(digest, len(data), uploading=True)
        rid = res.id
        try:
            with contextlib.nullcontext() if res.inline else self._holding(rid):
                if not res.path:
                    res = self._upload(res, io.BytesIO(data), len(data), digest)
                target = {"resource_id": object_id(rid), "hash": res.hash, "length": res.length}

                def link(session: ClientSession | None, doomed: list[str]) -> dict[str, Any]:
                    guard(session)
                    return self._link_in(env_uuid, path, target, options, session, doomed)

                doc = self.transact(link)
        except BaseException as exc:
            self._release_failed(rid, exc)
            raise
        return _path_info(doc, res.state, res.history)


def outcome_unknown(exc: BaseException) -> bool:
    """Is `exc` a database error after which a write may or may not have been applied?"""
    if isinstance(exc, ConnectionFailure):
        return True
    return isinstance(exc, PyMongoError) and exc.has_error_label("UnknownTransactionCommitResult")


def _check(digest: str, length: int, seen_hash: str, seen: int) -> None:
    if seen != length:
        raise LengthMismatchError(f"expected {length} bytes, the input has {seen}")
    if seen_hash != digest:
        raise HashMismatchError(f"content hashes to {seen_hash}, not {digest}")


def _expired(doc: dict[str, Any]) -> bool:
    expires_at = doc.get("expires_at")
    return expires_at is not None and aware(expires_at) <= utcnow()


def _match_query(if_match: int | str) -> dict[str, Any]:
    if if_match == "*":  # any current content: the path must exist
        return {}
    if isinstance(if_match, int) and not isinstance(if_match, bool):
        return {"rev": revision_query(if_match)}
    return {"hash": parse_hash(str(if_match))}


def _matches(doc: dict[str, Any], if_match: int | str) -> bool:
    if if_match == "*":
        return True
    if isinstance(if_match, int) and not isinstance(if_match, bool):
        return revision(doc.get("rev")) == if_match
    return bool(doc.get("hash") == parse_hash(str(if_match)))


def _insertable(options: WriteOptions) -> bool:
    """A put that may make its path by insert (pathdocs.fresh), if the path is new.

    Only where the writer wants no path document back: reading an inserted
    path's revision back costs the writer's process more than the upsert that
    returns it (measured over HTTP, where the service's CPU is the limit: 1.57-
    1.65 ms of service CPU per new 4 KiB PUT, against 1.26-1.32 ms). If-None-Match
    would be an insert's own condition, but its writers want the revision.
    """
    return options.if_match is None and options.expires_at is None


def _by_revision(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The changes among `events` (uploads that made none have revision 0), by revision."""
    changes = [e for e in events if e.get("revision")]
    for e in changes:
        e["at"] = aware(e["at"])
    changes.sort(key=lambda e: (e["revision"], e["at"]))
    return changes


def _in_order(
    changes: Iterator[dict[str, Any]], uploads: list[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Oldest first, each once: changes by revision, and the uploads that made none
    (failed, pending) among them by time, not all before the first change.

    `changes` come in revision order; a copy (the same event in two places, left
    by a spill or an archive cut short) comes right after the event itself.
    """
    seen: set[tuple[Any, ...]] = set()
    once: list[dict[str, Any]] = []
    for e in uploads:
        key = (e.get("op"), e.get("at"), e.get("state"))
        if key not in seen:
            seen.add(key)
            e["at"] = aware(e["at"])
            once.append(e)
    once.sort(key=lambda e: e["at"])
    waiting = collections.deque(once)
    last: tuple[int, set[str]] = (0, set())
    exists = False
    for e in changes:
        rev, kind = int(e["revision"]), str(e.get("event", ""))
        if rev < last[0] or (rev == last[0] and kind in last[1]):
            continue  # a copy
        if rev > last[0]:
            last = (rev, set())
        last[1].add(kind)
        if kind == "put":  # the in-memory store's updates cannot tell; the order can
            e["event"] = "replace" if exists else "create"
        exists = kind != "delete" and not (kind == "move" and "to" in e)
        while waiting and waiting[0]["at"] < e["at"]:
            yield waiting.popleft()
        yield e
    yield from waiting


def _revision(doc: dict[str, Any]) -> int:
    if "rev" in doc:
        return revision(doc["rev"])
    return int(doc.get("rev_base", 0)) + int(doc.get("revision", 0))  # written before revs


def _path_info(
    doc: dict[str, Any], state: str, history: tuple[tuple[str, datetime.datetime], ...]
) -> PathInfo:
    expires_at = doc.get("expires_at")
    return PathInfo(
        env_uuid=doc["env"],
        path=doc["path"],
        hash=doc["hash"],
        length=int(doc["length"]),
        created_at=aware(doc["created_at"]),
        updated_at=aware(doc["updated_at"]),
        revision=_revision(doc),
        resource_id=str(doc["resource_id"]),
        state=state,
        history=history,
        content_type=str(doc.get("content_type") or ""),
        expires_at=aware(expires_at) if expires_at is not None else None,
    )


def _clock_mode(db: Database[Any], replica_set: bool) -> str:
    if type(db.client).__module__.startswith("mongomock"):
        return "local"
    return "cluster" if replica_set else "server"


def _supports_transactions(db: Database[Any]) -> bool:
    client = db.client
    if type(client).__module__.startswith("mongomock"):
        return False
    try:
        hello = client.admin.command("hello")
    except OperationFailure:
        return False
    return "setName" in hello or hello.get("msg") == "isdbgrid"
