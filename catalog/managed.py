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

import contextlib
import dataclasses
import datetime
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from pymongo import ASCENDING, ReturnDocument, WriteConcern
from pymongo.client_session import ClientSession
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, OperationFailure

from catalog.clock import aware, utcnow
from catalog.errors import (
    AlreadyExistsError,
    BadRequestError,
    HashMismatchError,
    LengthMismatchError,
    NotFoundError,
    RequestExpiredError,
    ResourceDeletedError,
    ResponseMismatchError,
    UploadPendingError,
)
from catalog.names import check_env, check_path, check_prefix, parse_hash
from catalog.proof import (
    PutResponse,
    RequestResponse,
    choose_ranges,
    new_put_response,
    ranges_checksum,
)
from catalog.resources import DEFAULT_LEASE, READY, Resource, ResourceCatalog, object_id
from catalog.streams import Heartbeat, WatchedReader, hash_stream, is_seekable

if TYPE_CHECKING:
    from catalog.environment import Environment

T = TypeVar("T")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]{16,64}")


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
    ) -> None:
        self.db = db
        self.resource_storage = resource_storage
        self.request_expiry = request_expiry
        self._catalog = ResourceCatalog(db, lease=lease)
        majority = WriteConcern("majority")
        self.paths = db["paths"].with_options(write_concern=majority)
        self.requests = db["put_requests"].with_options(write_concern=majority)
        self.paths.create_index([("env", ASCENDING), ("path", ASCENDING)], unique=True)
        self.paths.create_index([("resource_id", ASCENDING)])
        self.requests.create_index([("expires_at", ASCENDING)], expireAfterSeconds=0)
        self._transactions = _supports_transactions(db)

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
                return self.resource_storage.get(res.path), res.length
            except NotFoundError:
                if attempt == 2:
                    raise
                # The path was repointed and its old bytes deleted meanwhile.
        raise AssertionError("unreachable")  # pragma: no cover

    def stat_for_environment(self, env_uuid: str, path: str) -> PathInfo:
        check_env(env_uuid)
        check_path(path)
        doc = self.paths.find_one({"env": env_uuid, "path": path})
        if doc is None:
            raise NotFoundError(f"{env_uuid}: no such path {path!r}")
        try:
            res = self._catalog.entry(str(doc["resource_id"]))
            state, history = res.state, res.history
        except NotFoundError:
            state, history = "missing", ()
        return _path_info(doc, state, history)

    def list_for_environment(self, env_uuid: str, prefix: str = "") -> list[str]:
        return [doc["path"] for doc in self.iter_paths(env_uuid, prefix)]

    def iter_paths(self, env_uuid: str, prefix: str = "") -> Any:
        """Path documents of an environment in path order (for listings with hashes)."""
        check_env(env_uuid)
        check_prefix(prefix)
        query: dict[str, Any] = {"env": env_uuid}
        if prefix:
            query["path"] = {"$regex": "^" + re.escape(prefix)}
        return self.paths.find(query, sort=[("path", ASCENDING)])

    # -- writes ---------------------------------------------------------------
    def put_for_environment(
        self, env_uuid: str, path: str, reader: BinaryIO, length: int = -1
    ) -> Resource:
        return self._put(env_uuid, path, reader, length, None)

    def put_for_environment_and_check_hash(
        self, env_uuid: str, path: str, reader: BinaryIO, length: int, check_hash: str | None
    ) -> Resource:
        return self._put(env_uuid, path, reader, length, check_hash or None)

    def remove_for_environment(self, env_uuid: str, path: str) -> None:
        check_env(env_uuid)
        check_path(path)

        def unlink(session: ClientSession | None, doomed: list[str]) -> None:
            doc = self.paths.find_one_and_delete({"env": env_uuid, "path": path}, session=session)
            if doc is None:
                raise NotFoundError(f"{env_uuid}: no such path {path!r}")
            self._release_in(str(doc["resource_id"]), session, doomed)

        self.transact(unlink)

    def move_for_environment(self, env_uuid: str, src: str, dst: str) -> PathInfo:
        """Repoint `dst` at what `src` holds and drop `src`; copies no bytes."""
        check_env(env_uuid)
        check_path(src)
        check_path(dst)
        if src == dst:
            return self.stat_for_environment(env_uuid, src)

        def move(session: ClientSession | None, doomed: list[str]) -> None:
            doc = self.paths.find_one_and_delete({"env": env_uuid, "path": src}, session=session)
            if doc is None:
                raise NotFoundError(f"{env_uuid}: no such path {src!r}")
            old = self._point(env_uuid, dst, doc, session)
            if old is not None:
                self._release_in(str(old["resource_id"]), session, doomed)

        self.transact(move)
        return self.stat_for_environment(env_uuid, dst)

    # -- proof of access ------------------------------------------------------
    def put_for_environment_request(self, env_uuid: str, path: str, hash: str) -> RequestResponse:
        """Challenge a client that claims to hold content we have."""
        check_env(env_uuid)
        check_path(path)
        digest = parse_hash(hash)
        res = self._catalog.lookup(digest)
        if res is None:
            raise NotFoundError(f"no stored content with hash {digest}")
        if res.pending:
            if res.lease_expired():
                raise NotFoundError(f"the upload of {digest} was abandoned; upload it")
            raise UploadPendingError(f"content {digest} is still being uploaded")
        ranges = choose_ranges(res.length)
        now = utcnow()
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
            reader = self.resource_storage.get(res.path)
        except NotFoundError:
            raise ResourceDeletedError("the content was deleted since the request") from None
        try:
            expected = ranges_checksum(reader, ranges)
        finally:
            reader.close()
        if not hmac.compare_digest(expected, checksum):
            raise ResponseMismatchError("the proof checksum does not match the content")

        def link(session: ClientSession | None, doomed: list[str]) -> Resource:
            if self._catalog.add_ref(res.id, session=session) is None:
                raise ResourceDeletedError("the content was deleted since the request")
            return self._link_in(doc["env"], doc["path"], res.id, session, doomed)

        return self.transact(link), doc["env"], doc["path"]

    # -- internals: put ------------------------------------------------------
    def _put(
        self,
        env_uuid: str,
        path: str,
        reader: BinaryIO,
        length: int,
        check_hash: str | None,
    ) -> Resource:
        check_env(env_uuid)
        check_path(path)
        if not isinstance(length, int) or isinstance(length, bool):
            raise BadRequestError(f"invalid length: {length!r}")
        length = max(length, -1)
        expected = parse_hash(check_hash) if check_hash else None
        verified = False
        start: int | None = None
        if expected is None and is_seekable(reader):
            # A hashing pass is ~20x cheaper than writing, and lets known content
            # cost nothing more.
            start = reader.tell()
            expected, seen = hash_stream(reader, length)
            if length >= 0 and seen != length:
                raise LengthMismatchError(f"expected {length} bytes, the input has {seen}")
            length, verified = seen, True
        if expected is not None and length >= 0:
            return self._put_known(env_uuid, path, reader, length, expected, verified, start)
        if expected is not None:
            known = self._catalog.lookup(expected)
            if known is not None and not known.pending:
                # Length unknown (a chunked body) but the content is stored: hash only,
                # and the input must end exactly where the stored content does.
                return self._put_known(
                    env_uuid, path, reader, known.length, expected, False, None, until_eof=True
                )
        return self._put_unknown(env_uuid, path, reader, length, expected)

    def _put_known(
        self,
        env_uuid: str,
        path: str,
        reader: BinaryIO,
        length: int,
        digest: str,
        verified: bool,
        start: int | None,
        *,
        until_eof: bool = False,
    ) -> Resource:
        res, created = self._catalog.acquire(digest, length, uploading=True, durable=False)
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
                return self._link(env_uuid, path, res)
        except BaseException:
            self._release(rid)
            raise

    def _put_unknown(
        self, env_uuid: str, path: str, reader: BinaryIO, length: int, expected: str | None
    ) -> Resource:
        tmp = new_storage_path()
        counted = WatchedReader(reader)
        digest = self.resource_storage.put(tmp, counted, length)
        try:
            if expected is not None and digest != expected:
                raise HashMismatchError(f"content hashes to {digest}, not {expected}")
            res, _ = self._catalog.acquire(digest, counted.count, uploading=True, durable=False)
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
                return self._link(env_uuid, path, res)
        except BaseException:
            self._release(rid)
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
            self._catalog.upload_complete(res.id, storage_path, durable=False)
        except AlreadyExistsError:
            self._discard(storage_path)  # another uploader completed first: use theirs
            return self._catalog.entry(res.id)
        except BaseException:
            self._discard(storage_path)
            raise
        return dataclasses.replace(res, path=storage_path, state=READY)

    # -- internals: references -------------------------------------------------
    def _link(self, env_uuid: str, path: str, res: Resource) -> Resource:
        """Point a path at a resource we hold a reference to.

        A new path releases nothing, so one insert is enough; only repointing a
        path, which drops another reference, needs the transaction.
        """
        now = utcnow()
        try:
            self.paths.insert_one(
                {
                    "env": env_uuid,
                    "path": path,
                    "resource_id": object_id(res.id),
                    "hash": res.hash,
                    "length": res.length,
                    "created_at": now,
                    "updated_at": now,
                    "revision": 1,
                    "rev_base": time.time_ns() // 1000,
                }
            )
        except DuplicateKeyError:
            return self.transact(lambda s, d: self._link_in(env_uuid, path, res.id, s, d))
        return res

    def _link_in(
        self,
        env_uuid: str,
        path: str,
        rid: str,
        session: ClientSession | None,
        doomed: list[str],
    ) -> Resource:
        """Point a path at a resource we hold a reference to; release what it held."""
        res = self._catalog.entry(rid, session=session)
        target = {"resource_id": object_id(rid), "hash": res.hash, "length": res.length}
        old = self._point(env_uuid, path, target, session)
        if old is not None:
            self._release_in(str(old["resource_id"]), session, doomed)
        return res

    def _point(
        self,
        env_uuid: str,
        path: str,
        target: dict[str, Any],
        session: ClientSession | None,
    ) -> dict[str, Any] | None:
        now = utcnow()
        return self.paths.find_one_and_update(
            {"env": env_uuid, "path": path},
            {
                "$set": {
                    "resource_id": target["resource_id"],
                    "hash": target["hash"],
                    "length": target["length"],
                    "updated_at": now,
                },
                "$inc": {"revision": 1},
                # rev_base keeps revisions growing across delete and re-create.
                "$setOnInsert": {"created_at": now, "rev_base": time.time_ns() // 1000},
            },
            upsert=True,
            return_document=ReturnDocument.BEFORE,
            session=session,
        )

    def _release_in(self, rid: str, session: ClientSession | None, doomed: list[str]) -> None:
        try:
            deleted, storage_path = self._catalog.remove(rid, session=session)
        except NotFoundError:
            return
        if deleted and storage_path:
            doomed.append(storage_path)

    def _release(self, rid: str) -> None:
        doomed: list[str] = []
        self._release_in(rid, None, doomed)
        for storage_path in doomed:
            self._discard(storage_path)

    def _discard(self, storage_path: str) -> None:
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
            return result

    def _run_once(self, fn: Callable[[ClientSession | None, list[str]], T], doomed: list[str]) -> T:
        if not self._transactions:
            return fn(None, doomed)

        def body(session: ClientSession) -> T:
            doomed.clear()  # with_transaction may run the body more than once
            return fn(session, doomed)

        with self.db.client.start_session() as session:
            return session.with_transaction(body)

    def _resolve(self, env_uuid: str, path: str) -> Resource:
        doc = self.paths.find_one({"env": env_uuid, "path": path})
        if doc is None:
            raise NotFoundError(f"{env_uuid}: no such path {path!r}")
        try:
            return self._catalog.get(str(doc["resource_id"]))
        except NotFoundError:
            raise NotFoundError(f"{env_uuid}: {path!r} points at missing content") from None

    def _ready(self, rid: str, digest: str) -> Resource:
        try:
            res = self._catalog.entry(rid)
        except NotFoundError:
            raise ResourceDeletedError("the content was deleted since the request") from None
        if res.hash != digest or res.pending:
            raise ResourceDeletedError("the content was deleted since the request")
        return res


def _check(digest: str, length: int, seen_hash: str, seen: int) -> None:
    if seen != length:
        raise LengthMismatchError(f"expected {length} bytes, the input has {seen}")
    if seen_hash != digest:
        raise HashMismatchError(f"content hashes to {seen_hash}, not {digest}")


def _path_info(
    doc: dict[str, Any], state: str, history: tuple[tuple[str, datetime.datetime], ...]
) -> PathInfo:
    return PathInfo(
        env_uuid=doc["env"],
        path=doc["path"],
        hash=doc["hash"],
        length=int(doc["length"]),
        created_at=aware(doc["created_at"]),
        updated_at=aware(doc["updated_at"]),
        revision=int(doc.get("rev_base", 0)) + int(doc.get("revision", 0)),
        resource_id=str(doc["resource_id"]),
        state=state,
        history=history,
    )


def _supports_transactions(db: Database[Any]) -> bool:
    client = db.client
    if type(client).__module__.startswith("mongomock"):
        return False
    try:
        hello = client.admin.command("hello")
    except OperationFailure:
        return False
    return "setName" in hello or hello.get("msg") == "isdbgrid"
