"""Python client of the rescat HTTP service, on httpx.

`CatalogClient.upload` runs the dedup workflow: hash the file locally
(streaming), ask for a put request, answer the server's challenge (BLAKE3 of
random byte ranges) from the local file, and stream the bytes, with
X-Content-Hash, only when the server lacks the content. `download` streams to
a file, checks Content-Length and BLAKE3, and resumes with Range (a partial
file left by an earlier attempt, or a connection that broke mid-transfer).

Errors raise the `catalog.errors` class of the service's error code, so a
caller sees the same exceptions as with the in-process library.
"""

from __future__ import annotations

import contextlib
import glob
import heapq
import io
import json
import math
import os
import re
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO
from urllib.parse import quote

import blake3
import httpx

from catalog.errors import (
    BadRequestError,
    CatalogError,
    HashMismatchError,
    InvalidPathError,
    LengthMismatchError,
    NotFoundError,
    OffsetMismatchError,
    RequestExpiredError,
    ResourceDeletedError,
    UploadPendingError,
)
from catalog.names import check_env, check_path, check_prefix, format_hash, parse_hash
from catalog.pathevents import resume_since
from catalog.proof import ranges_checksum
from catalog.streams import hash_into
from service.errors import ServiceError, error_classes, exception_from
from service.localfiles import Output, is_regular_source, open_source, resolve_target, target_kind

BLOCK = 1024 * 1024
HASH_BLOCK = 4 * 1024 * 1024
PAGE_SIZE = 1000  # paths per page of a listing
# `upload` sends content larger than this through a resumable upload session.
RESUMABLE_THRESHOLD = 64 * 1024 * 1024
UPLOAD_PART = 256 * 1024 * 1024  # bytes per PATCH: the service checkpoints after each

# progress(phase, done, total): phase is "hash", "upload", "verify" or "download";
# `done` counts bytes of that phase so far; `total` is None when unknown. A resumable
# upload that resumes after a dropped connection reports ("resume", offset, total).
Progress = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class UploadResult:
    path: str
    hash: str
    length: int
    deduplicated: bool
    bytes_sent: int  # body bytes that went over the wire (0 when deduplicated)
    # The path's revision after a put (its X-Revision); not compared, so that results
    # compare as the contract's five fields.
    revision: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DownloadResult:
    path: str
    hash: str
    length: int
    bytes_received: int  # body bytes received (less than length when resumed)
    resumed: bool


class ServiceUnavailableError(ServiceError):
    """The service cannot be reached (connection refused, reset, timed out)."""


# A path's history items, as `GET .../history/{path}` sends them (the class's
# own `list` method shadows the builtin inside it).
History = list[dict[str, Any]]


class NotAServiceError(ServiceError):
    """The base URL answered, but not as a rescat service's root (another server, or /v1 added).

    `advice` says what to give instead; the CLI prefixes it with the option to fix.
    """

    def __init__(self, base: str, what: str, advice: str, response: httpx.Response) -> None:
        super().__init__(
            f"{base} is not a rescat service ({what}); {advice}",
            status=response.status_code,
            code="not_rescat",
        )
        self.base = base
        self.what = what
        self.advice = advice


class CatalogClient:
    """A client of one rescat service. `base_url` is the service root (no /v1)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        held_wait: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        # How long a resumable upload waits, in all, for its session to be let go by
        # a writer that holds it (an instance killed mid-PATCH holds it for its lease).
        self.held_wait = held_wait
        headers = {"user-agent": "rescat-client/1"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            follow_redirects=False,
        )

    # -- lifecycle ----------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CatalogClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- simple calls -------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")  # type: ignore[no-any-return]

    def list(self, env: str, prefix: str = "") -> list[dict[str, Any]]:
        """[{"path", "hash", "length", ...}, ...] sorted by path (fetched in pages)."""
        return [item for item in self.iter_list(env, prefix) if "path" in item]

    def stat(self, env: str, path: str) -> dict[str, Any]:
        """{"path", "hash", "length", "etag", "revision"} of a path (a HEAD request).

        `revision` (for `put(..., if_match=)`) is None from a service that sends
        no X-Revision.
        """
        try:
            response = self._send("HEAD", _object_url(env, path))
        except NotFoundError as exc:  # a HEAD answer has no body to say which
            raise NotFoundError(f"{env}: no such path {path!r}", path=path) from exc
        etag = response.headers.get("etag", "")
        return {
            "path": path,
            "hash": parse_hash(etag.strip('"')),
            "length": int(response.headers["content-length"]),
            "etag": etag,
            "revision": _revision_of(response),
        }

    def remove(self, env: str, path: str, *, if_match: int | str | None = None) -> None:
        """Delete the path.

        if_match: only at that revision or ETag, checked with the delete
        (otherwise PreconditionFailedError, and nothing changed).
        """
        headers = _conditions(if_match, False)
        self._send("DELETE", _object_url(env, path), headers=headers)

    def remove_many(self, env: str, paths: Sequence[str]) -> dict[str, Any]:
        """Delete up to 1,000 paths in one transaction: {"deleted": [...], "missing": [...]}."""
        for path in paths:
            check_path(path)
        body = {"paths": list(paths)}
        return self._json("POST", _env_url(env, "delete"), json=body)  # type: ignore[no-any-return]

    def read(self, env: str, path: str) -> bytes:
        """A path's whole content in memory (small objects; use download for files)."""
        buffer = io.BytesIO()
        self.download(env, path, buffer)
        return buffer.getvalue()

    def history(self, env: str, path: str) -> History:
        """Every operation on a path, oldest first (NotFoundError if it never had one)."""
        return list(self.iter_history(env, path))

    def iter_history(self, env: str, path: str) -> Iterator[dict[str, Any]]:
        """`history` one item at a time, parsed as the answer arrives.

        A hot key's history is kept by age, not cut, so it may hold millions of
        items; this never holds more than one piece of the answer and one item.
        NotFoundError (before the first item) if the path never had one.
        """
        url = _env_url(env, "history", _encoded(path))
        try:
            with self._http.stream("GET", url) as response:
                _raise_for(response, self.base_url)
                yield from _listed_items(response.iter_text())
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def request_put(self, env: str, path: str, hash: str) -> dict[str, Any]:
        """POST a put request: {"request_id", "ranges", "expires_at"} (NotFoundError if unknown)."""
        check_env(env)
        check_path(path)
        body = {"path": path, "hash": format_hash(parse_hash(hash))}
        return self._json("POST", _env_url(env, "put-requests"), json=body)  # type: ignore[no-any-return]

    def answer(self, env: str, request_id: str, checksum: str) -> dict[str, Any]:
        """Answer a put request: {"path", "hash", "length"} on success."""
        return _decoded(self._answered(env, request_id, checksum))  # type: ignore[no-any-return]

    def _answered(self, env: str, request_id: str, checksum: str) -> httpx.Response:
        check_env(env)
        url = _env_url(env, "put-requests", quote(request_id, safe=""), "response")
        return self._send("POST", url, json={"checksum": checksum})

    # -- uploads ------------------------------------------------------------------
    def put(
        self,
        env: str,
        path: str,
        file: str | os.PathLike[str] | BinaryIO | bytes,
        *,
        hash: str | None = None,
        progress: Progress | None = None,
        if_match: int | str | None = None,
        if_none_match: bool = False,
    ) -> UploadResult:
        """Plain PUT of the bytes (no dedup round trip). `hash`: sent as X-Content-Hash.

        if_match: write only if the path is at this revision (an int), holds
        this content (its ETag, `blake3:<hex>` or the hex) or exists at all
        (`"*"`); if_none_match: only if the path does not exist. Checked
        atomically with the write; otherwise PreconditionFailedError and
        nothing changed. The result's `revision` is the path's revision after
        the write.
        """
        check_env(env)
        check_path(path)
        conditions = _conditions(if_match, if_none_match)
        if isinstance(file, bytes):
            file = io.BytesIO(file)
        if isinstance(file, (str, os.PathLike)) and not is_regular_source(file):
            with open_source(os.fspath(file)) as pipe:
                return self.put(
                    env, path, pipe, hash=hash, progress=progress,
                    if_match=if_match, if_none_match=if_none_match,
                )  # fmt: skip
        if not isinstance(file, (str, os.PathLike)) and _tell(file) < 0:
            return self._put_pipe(env, path, file, hash, progress, conditions)
        with _source(file) as (reader, start):
            length = _remaining(reader, start)
            response, sent = self._put_stream(env, path, reader, length, hash, progress, conditions)
        doc = _decoded(response)
        return UploadResult(
            path, doc["hash"], int(doc["length"]), False, sent, _revision_of(response)
        )

    def _put_pipe(
        self,
        env: str,
        path: str,
        pipe: BinaryIO,
        hash: str | None,
        progress: Progress | None,
        conditions: dict[str, str],
    ) -> UploadResult:
        """A chunked PUT straight from a pipe: nothing spooled, the hash checked after.

        Without the hash up front there is no dedup round trip; the service still
        stores the content once. The local BLAKE3 must match the one the service
        computed, so a pipe that broke mid-way cannot leave a wrong object.
        """
        hasher = blake3.blake3()
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            while data := pipe.read(BLOCK):
                hasher.update(data)
                sent += len(data)
                if progress is not None:
                    progress("upload", sent, None)
                yield data

        headers = {"content-type": "application/octet-stream", **conditions}
        if hash:
            headers["x-content-hash"] = format_hash(parse_hash(hash))
        response = self._send("PUT", _object_url(env, path), content=body(), headers=headers)
        doc = _decoded(response)
        if doc["hash"] != hasher.hexdigest() or int(doc["length"]) != sent:
            raise HashMismatchError(
                f"{path}: the service stored {doc['length']} bytes hashing to {doc['hash']}, "
                f"but {sent} bytes hashing to {hasher.hexdigest()} were sent"
            )
        return UploadResult(
            path, doc["hash"], int(doc["length"]), False, sent, _revision_of(response)
        )

    def upload(
        self,
        env: str,
        path: str,
        file: str | os.PathLike[str] | BinaryIO,
        *,
        progress: Progress | None = None,
        resumable: bool | None = None,
    ) -> UploadResult:
        """Create `path` with the content of `file`, sending its bytes only if need be.

        Content larger than RESUMABLE_THRESHOLD (or any, with `resumable=True`) goes
        through an upload session that resumes after a dropped connection.
        """
        check_env(env)
        check_path(path)
        with _source(file) as (reader, start):
            digest, length = _hash_file(reader, start, progress)
            for _ in range(3):
                try:
                    challenge = self.request_put(env, path, digest)
                except (NotFoundError, UploadPendingError):
                    # Unknown content, or being uploaded by someone else right now:
                    # uploading never waits on another uploader, the first wins.
                    break
                ranges = [(int(s), int(n)) for s, n in challenge["ranges"]]
                checksum = _ranges_checksum(reader, start, ranges)
                try:
                    response = self._answered(env, challenge["request_id"], checksum)
                except (RequestExpiredError, ResourceDeletedError):
                    continue  # expired or deleted meanwhile: ask again
                if progress is not None:
                    progress("upload", length, length)
                doc = _decoded(response)
                return UploadResult(
                    path, doc["hash"], int(doc["length"]), True, 0, _revision_of(response)
                )
            reader.seek(start)
            if resumable or (resumable is None and length > RESUMABLE_THRESHOLD):
                doc, sent = self._upload_resumable(
                    env, path, reader, start, length, digest, progress
                )
                revision = doc.pop("revision", None)
            else:
                response, sent = self._put_stream(env, path, reader, length, digest, progress)
                doc, revision = _decoded(response), _revision_of(response)
        return UploadResult(path, doc["hash"], int(doc["length"]), False, sent, revision)

    def _put_stream(
        self,
        env: str,
        path: str,
        reader: BinaryIO,
        length: int,
        hash: str | None,
        progress: Progress | None,
        conditions: dict[str, str] | None = None,
    ) -> tuple[httpx.Response, int]:
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            left = length
            while left > 0:
                data = reader.read(min(BLOCK, left))
                if not data:
                    raise LengthMismatchError(f"the file ended {left} bytes early")
                left -= len(data)
                sent += len(data)
                if progress is not None:
                    progress("upload", sent, length)
                yield data

        headers = {
            "content-length": str(length),
            "content-type": "application/octet-stream",
            **(conditions or {}),
        }
        if hash:
            headers["x-content-hash"] = format_hash(parse_hash(hash))
        return self._send("PUT", _object_url(env, path), content=body(), headers=headers), sent

    # -- resumable uploads ---------------------------------------------------------
    def create_upload(self, env: str, path: str) -> dict[str, Any]:
        """Open a resumable upload of `path`: {"upload_id", "path", "offset"}."""
        check_path(path)
        return self._json("POST", _env_url(env, "uploads"), json={"path": path})  # type: ignore[no-any-return]

    def upload_offset(self, env: str, upload_id: str) -> int:
        """Bytes of the upload the service has kept (where to resume); NotFoundError if gone."""
        response = self._send("HEAD", _upload_url(env, upload_id))
        return _offset_of(response)

    def append_upload(
        self, env: str, upload_id: str, offset: int, data: bytes | Iterator[bytes], length: int
    ) -> int:
        """PATCH `length` bytes at `offset`; the new offset (OffsetMismatchError if not current)."""
        headers = {
            "upload-offset": str(offset),
            "content-length": str(length),
            "content-type": "application/octet-stream",
        }
        response = self._send("PATCH", _upload_url(env, upload_id), content=data, headers=headers)
        return _offset_of(response)

    def commit_upload(self, env: str, upload_id: str, hash: str | None = None) -> dict[str, Any]:
        """Make the path point at the upload's content: {"path", "hash", "length"}.

        Also "revision", the path's revision after (its X-Revision), if the service sent it.
        """
        headers = {"x-content-hash": format_hash(parse_hash(hash))} if hash else {}
        url = _upload_url(env, upload_id) + "/commit"
        response = self._send("POST", url, headers=headers)
        doc: dict[str, Any] = _decoded(response)
        revision = _revision_of(response)
        if revision is not None:
            doc["revision"] = revision
        return doc

    def cancel_upload(self, env: str, upload_id: str) -> None:
        self._send("DELETE", _upload_url(env, upload_id))

    def sign(self, env: str, path: str, *, expires_in: float = 3600, method: str = "GET") -> str:
        """A URL that reads `path` without a token for `expires_in` s (the service signs it)."""
        check_path(path)
        body = {"path": path, "method": method.upper(), "expires_in": max(1, math.ceil(expires_in))}
        return str(self._json("POST", _env_url(env, "sign"), json=body)["url"])

    def _upload_resumable(
        self,
        env: str,
        path: str,
        reader: BinaryIO,
        start: int,
        length: int,
        digest: str,
        progress: Progress | None,
    ) -> tuple[dict[str, Any], int]:
        """Send the content through an upload session, resuming after dropped connections.

        Each PATCH carries up to UPLOAD_PART bytes. When one fails (connection
        dropped, service unavailable, the session still held by the request that
        broke), ask the service where it stands (HEAD) and PATCH from there, with
        backoff; `self.retries` failures in a row without progress give up. The
        session is cancelled when the upload fails for good.
        """
        upload_id = str(self.create_upload(env, path)["upload_id"])
        sent = 0
        offset = 0
        failures = 0
        held_until = time.monotonic() + self.held_wait
        try:
            while True:
                try:
                    if offset < length:
                        end = min(length, offset + UPLOAD_PART)
                        counted = [0]
                        try:
                            body = _part(reader, start, offset, end, length, counted, progress)
                            new = self.append_upload(env, upload_id, offset, body, end - offset)
                        finally:
                            sent += counted[0]
                        if new <= offset:  # nothing was kept: as good as a failure
                            failures += 1
                            if failures > self.retries:
                                raise ServiceError(
                                    f"upload {upload_id} does not advance past {offset}",
                                    status=204,
                                )
                        else:
                            failures = 0
                        offset = new
                        continue
                    doc = self._commit_resumed(env, path, upload_id, digest)
                    if progress is not None:
                        progress("upload", length, length)
                    return doc, sent
                except (ServiceError, OffsetMismatchError, UploadPendingError) as exc:
                    if not _resumable_failure(exc):
                        raise
                    wait = _held_for(exc, held_until)
                    if wait is None:
                        failures += 1
                        if failures > self.retries:
                            raise
                        wait = min(0.25 * 2**failures, 8.0)
                    time.sleep(wait)
                    try:
                        resumed = self.upload_offset(env, upload_id)
                    except ServiceUnavailableError:
                        continue  # counted on the next round
                    if progress is not None:
                        progress("resume", resumed, length)
                    if resumed > offset:
                        failures = 0
                    offset = resumed
        except BaseException:
            with contextlib.suppress(CatalogError, httpx.HTTPError):
                self.cancel_upload(env, upload_id)
            raise

    def _commit_resumed(self, env: str, path: str, upload_id: str, digest: str) -> dict[str, Any]:
        """Commit; if the answer was lost and the session is gone, the path tells."""
        try:
            return self.commit_upload(env, upload_id, digest)
        except ServiceUnavailableError:
            pass
        try:
            return self.commit_upload(env, upload_id, digest)
        except NotFoundError:
            info = self.stat(env, path)
            if info["hash"] != digest:
                raise
            return {"path": path, "hash": info["hash"], "length": info["length"]}

    # -- downloads ------------------------------------------------------------------
    def download(
        self,
        env: str,
        path: str,
        file: str | os.PathLike[str] | BinaryIO,
        *,
        progress: Progress | None = None,
        resume: bool = True,
    ) -> DownloadResult:
        """Stream `path` into `file` and verify it.

        A file named by path is never rewritten in place: the bytes go to a
        partial file beside it, `.NAME.<hash>.rescat-part`, renamed over it once
        verified. The partial file is named after the content it holds a prefix
        of, so an interrupted download resumes (Range) only into bytes of this
        very content; a different file at the target is replaced, never taken
        for a partial one. A target that already holds the content costs one
        local hash and no transfer. Devices and FIFOs are written through; a
        symlink is followed. A file object is written from its current position.
        """
        url = _object_url(env, path)
        if isinstance(file, (str, os.PathLike)):
            return self._download_to_path(url, env, path, file, progress, resume)
        start = _tell(file)
        return self._download_into(url, path, file, start, 0, progress)

    def _download_to_path(
        self,
        url: str,
        env: str,
        path: str,
        target: str | os.PathLike[str],
        progress: Progress | None,
        resume: bool,
    ) -> DownloadResult:
        kind = target_kind(target)
        if kind == "special":
            with Output(target) as special:
                result = self._download_into(url, path, special.file, -1, 0, progress)
                special.commit()
            return result
        real = resolve_target(target)
        info = self.stat(env, path)
        digest, length = str(info["hash"]), int(info["length"])
        if resume and kind == "regular" and real.stat().st_size == length:
            with open(real, "rb") as current:
                hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
                _hash_into(hasher, current, -1, progress, length)
            if hasher.hexdigest() == digest:
                return DownloadResult(path, digest, length, 0, True)
        part_name = f".{real.name[:100]}.{digest}.rescat-part"
        part = real.parent / part_name
        if not resume:
            with contextlib.suppress(OSError):
                part.unlink()
        existing = 0
        with contextlib.suppress(OSError):
            existing = part.stat().st_size
        if existing > length:
            existing = 0
        out = Output(target, temp_name=part_name)
        keep = False
        try:
            result = self._download_into(
                url, path, out.file, 0, existing, progress, etag=f'"blake3:{digest}"'
            )
            out.commit()
        except BaseException:
            # Keep what arrived for the next attempt to resume; never an empty file.
            with contextlib.suppress(OSError, ValueError):
                out.file.flush()
                keep = os.fstat(out.file.fileno()).st_size > 0
            out.abort(keep=keep)
            raise
        for stale in real.parent.glob(f".{glob.escape(real.name[:100])}.*.rescat-part"):
            with contextlib.suppress(OSError):
                stale.unlink()
        return result

    def _download_into(
        self,
        url: str,
        path: str,
        out: BinaryIO,
        base: int,
        existing: int,
        progress: Progress | None,
        *,
        etag: str | None = None,
    ) -> DownloadResult:
        hasher = blake3.blake3()
        if existing:
            out.seek(base)
            _hash_into(hasher, out, existing, progress)
        offset = existing
        resumed = existing > 0
        received = 0
        attempts = 0
        while True:
            attempts += 1
            headers = {"accept-encoding": "identity"}  # the ETag is of the bytes as stored
            if offset > 0:
                headers["range"] = f"bytes={offset}-"
                if etag is not None:
                    headers["if-range"] = etag
            try:
                with self._http.stream("GET", url, headers=headers) as response:
                    if response.status_code == 416 and offset > 0:
                        # The local part is as long as the content, or longer.
                        size = _unsatisfied_size(response)
                        etag = response.headers.get("etag")
                        if size == offset and etag and _etag_hash(etag) == hasher.hexdigest():
                            return DownloadResult(path, _etag_hash(etag), size, received, True)
                        hasher, offset = _restart(out, base)
                        continue
                    _raise_for(response, self.base_url)
                    new_etag = response.headers.get("etag")
                    if new_etag is None:
                        raise ServiceError("the response has no ETag", status=200)
                    total = _total_length(response, offset)
                    if response.status_code == 200 and offset > 0:
                        # The content changed since the first attempt (If-Range), or
                        # the server ignored the range: start over.
                        hasher, offset = _restart(out, base)
                        resumed = False
                    etag = new_etag
                    if base >= 0:  # else a pipe: it is where it is
                        out.seek(base + offset)
                    writer = _HashingWriter(out, hasher)
                    try:
                        for chunk in response.iter_raw():
                            writer.write(chunk)
                            offset += len(chunk)
                            received += len(chunk)
                            if progress is not None:
                                progress("download", offset, total)
                    except httpx.TransportError as exc:
                        if attempts > self.retries:
                            # The service answered, then broke off: not an unreachable one.
                            raise ServiceError(
                                f"the service broke off {path} at byte {offset} of {total} "
                                f"({attempts} tries; {type(exc).__name__}); run again to resume, "
                                "and if it keeps breaking there, check its copy with rescat fsck",
                                status=response.status_code,
                                code="broken_off",
                            ) from exc
                        continue  # resume from offset
                    finally:
                        writer.close()
            except httpx.TransportError as exc:
                if attempts > self.retries:
                    raise self._unreachable(exc) from exc
                continue
            if offset < total:
                if attempts > self.retries:
                    raise LengthMismatchError(f"received {offset} of {total} bytes")
                continue
            if base >= 0:
                _truncate(out, base + offset)
            digest = _etag_hash(etag)
            if offset != total or hasher.hexdigest() != digest:
                if resumed and attempts <= self.retries:
                    resumed = False  # the old part was stale: fetch everything
                    hasher, offset = _restart(out, base)
                    continue
                raise HashMismatchError(
                    f"downloaded {offset} bytes hashing to {hasher.hexdigest()}, expected "
                    f"{total} bytes hashing to {digest}"
                )
            return DownloadResult(path, digest, total, received, resumed)

    # -- listing in pages, stat, move, copy -------------------------------------------
    def list_page(
        self,
        env: str,
        prefix: str = "",
        *,
        after: str = "",
        limit: int = PAGE_SIZE,
        delimiter: str | None = None,
        detail: bool = False,
    ) -> dict[str, Any]:
        """One page: {"items": [...], "prefixes": [...] (with a delimiter), "next"?}.

        `detail`: items also carry `updated_at` (RFC 3339).
        """
        check_env(env)
        check_prefix(prefix)
        params: dict[str, Any] = {"prefix": prefix, "limit": limit}
        if after:
            params["after"] = after
        if delimiter:
            params["delimiter"] = delimiter
        if detail:
            params["detail"] = "true"
        return self._json("GET", _env_url(env, "resources"), params=params)  # type: ignore[no-any-return]

    def iter_list(
        self,
        env: str,
        prefix: str = "",
        *,
        delimiter: str | None = None,
        page_size: int = PAGE_SIZE,
        detail: bool = False,
    ) -> Iterator[dict[str, Any]]:
        """Every path, page after page, in order; with a delimiter, folders as {"prefix"}.

        Only one page is held at a time, so a million paths list in bounded memory.
        """
        after = ""
        while True:
            page = self.list_page(
                env, prefix, after=after, limit=page_size, delimiter=delimiter, detail=detail
            )
            folders = [{"prefix": p} for p in page.get("prefixes") or []]
            yield from heapq.merge(page["items"], folders, key=_listing_key)
            after = page.get("next") or ""
            if not after:
                return

    def path_info(self, env: str, path: str) -> dict[str, Any]:
        """What `rescat stat --json` prints: hash, length, times, revision, content state."""
        return self._json("GET", _env_url(env, "stat", _encoded(path)))  # type: ignore[no-any-return]

    def move(self, env: str, src: str, dst: str, *, dst_env: str | None = None) -> dict[str, Any]:
        """Move `env:src` to `dst` in `dst_env` (default `env`) on the service; dst's stat.

        No bytes move; across environments the token must allow both.
        """
        check_env(env)
        check_path(src)
        check_path(dst)
        body = {"from": src, "to": dst, "from_env": env}
        url = _env_url(dst_env or env, "move")
        return self._json("POST", url, json=body)  # type: ignore[no-any-return]

    def copy(self, src_env: str, src: str, dst_env: str, dst: str) -> dict[str, Any]:
        """Point `dst_env:dst` at what `src_env:src` holds (no bytes move); dst's stat."""
        check_env(src_env)
        check_path(src)
        check_path(dst)
        body = {"from": src, "to": dst, "from_env": src_env}
        return self._json("POST", _env_url(dst_env, "copy"), json=body)  # type: ignore[no-any-return]

    # -- transport ------------------------------------------------------------------
    def _unreachable(self, exc: BaseException) -> ServiceUnavailableError:
        """The one error of a service that did not answer (connection refused, reset...)."""
        return ServiceUnavailableError(
            f"{self.base_url}: {type(exc).__name__}: {exc}", code="unavailable"
        )

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if method == "HEAD" and response.status_code in (401, 403):
            response = self._explained(url, response, kwargs.get("headers"))
        _raise_for(response, self.base_url)
        return response

    def _explained(
        self, url: str, head: httpx.Response, headers: dict[str, str] | None
    ) -> httpx.Response:
        """The same refusal with its message: a HEAD answer has no body to carry one.

        Asked of GET (one byte of it): "this token is not valid for environment
        'x'" says more than "HTTP 403 forbidden". Only a GET refused the same
        way is used; otherwise the HEAD answer stands.
        """
        try:
            with self._http.stream(
                "GET", url, headers={**(headers or {}), "range": "bytes=0-0"}
            ) as got:
                if got.status_code == head.status_code:
                    got.read()
                    return got
        except httpx.TransportError:
            pass
        return head

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        return _decoded(self._send(method, url, **kwargs))

    # -- watch (Server-Sent Events) -----------------------------------------------------
    def watch(
        self,
        env: str,
        *,
        key: str | None = None,
        prefix: str | None = None,
        since: int | None = None,
        stop: threading.Event | None = None,
        reconnect_for: float = 60.0,
    ) -> Iterator[dict[str, Any]]:
        """Changes of `key` (or of the paths starting with `prefix`) as they happen.

        Yields `{"type": "put", "path", "hash", "length", "revision"}` and
        `{"type": "delete", "path", "revision"}`. With `since`, the changes after
        that revision come first (RequestExpiredError when the service no longer
        keeps them). When the connection drops or the service restarts, it
        reconnects and nothing is lost: not with the last revision received as
        `since` (across paths events come in commit order, and a change that
        commits later can have a smaller revision), but a window before it
        (`catalog.pathevents.resume_since`); what it had already is dropped by
        (path, revision, type), so no event is yielded twice. Gives up with
        ServiceUnavailableError after `reconnect_for` seconds without a
        connection, and at once if the first connection fails (a wrong URL or
        a service that is not running is said, not waited out in silence).
        Ends when `stop` is set (promptly, even while waiting).
        """
        url = _env_url(env, "watch")
        if key is not None and prefix is not None:
            raise InvalidPathError("give key or prefix, not both")
        params: dict[str, str] = {}
        if key is not None:
            params["key"] = check_path(key)
        elif prefix is not None:
            params["prefix"] = check_prefix(prefix)
        floor = since  # nothing at or below it is wanted; else where the first stream opened
        newest = since  # the largest revision yielded (or the floor)
        # What was yielded, within the resume window: (path, revision, type), as a delete
        # and the put that re-created its path as it committed can share a revision.
        recent: deque[tuple[str, int, str]] = deque()
        seen: set[tuple[str, int, str]] = set()
        down_since: float | None = None
        delay = 0.1
        connected = False
        # A heartbeat comes every 15 s: a silent connection past this is dead.
        timeout = httpx.Timeout(60.0, connect=10.0)
        while stop is None or not stop.is_set():
            query = dict(params)
            if newest is not None:
                query["since"] = str(resume_since(newest, floor or 0))
            try:
                with self._http.stream("GET", url, params=query, timeout=timeout) as response:
                    _raise_for(response, self.base_url)
                    down_since, delay, connected = None, 0.1, True
                    with _closed_on(stop, response):
                        for ident, event in _sse_messages(response.iter_lines()):
                            if event is None:  # the block that opens the stream: its start
                                if floor is None and ident.isdigit():
                                    floor = newest = int(ident)
                                continue
                            mark = (
                                str(event.get("path", "")),
                                int(event["revision"]),
                                str(event.get("type", "")),
                            )
                            if floor is None:  # a service that says not where it opened
                                floor = mark[1] - 1
                            if mark in seen or mark[1] <= floor:
                                continue
                            seen.add(mark)
                            recent.append(mark)
                            newest = max(newest or 0, mark[1])
                            horizon = resume_since(newest)
                            while recent and recent[0][1] <= horizon:
                                seen.discard(recent.popleft())
                            yield event
                            if stop is not None and stop.is_set():
                                return
            except (httpx.TransportError, httpx.StreamError, ServiceError) as exc:
                if stop is not None and stop.is_set():
                    return
                if isinstance(exc, ServiceError) and not _retryable(exc):
                    raise
                if not connected and isinstance(exc, httpx.TransportError):
                    raise self._unreachable(exc) from exc
                now = time.monotonic()
                down_since = now if down_since is None else down_since
                if now - down_since > reconnect_for:
                    raise ServiceUnavailableError(
                        f"{self.base_url}: the watch could not reconnect: {exc}",
                        code="unavailable",
                    ) from exc
            except Exception:
                if stop is not None and stop.is_set():
                    return  # closed under the read by stop
                raise
            # The stream ended (or broke): reconnect from the last revision received.
            if stop is not None:
                if stop.wait(delay):
                    return
            else:
                time.sleep(delay)
            delay = min(delay * 2, 2.0)


# -- helpers ------------------------------------------------------------------------
def _env_url(env: str, *parts: str) -> str:
    check_env(env)
    return "/v1/environments/" + "/".join([quote(env, safe=""), *parts])


def _object_url(env: str, path: str) -> str:
    return _env_url(env, "resources", _encoded(path))


def _encoded(path: str) -> str:
    check_path(path)
    return "/".join(quote(segment, safe="") for segment in path.split("/"))


def _listing_key(item: dict[str, Any]) -> str:
    return str(item.get("path") or item.get("prefix"))


def _upload_url(env: str, upload_id: str) -> str:
    return _env_url(env, "uploads", quote(upload_id, safe=""))


def _offset_of(response: httpx.Response) -> int:
    value = response.headers.get("upload-offset", "")
    if not value.isdigit():
        raise ServiceError(f"bad Upload-Offset: {value!r}", status=response.status_code)
    return int(value)


def _part(
    reader: BinaryIO,
    start: int,
    offset: int,
    end: int,
    total: int,
    counted: list[int],
    progress: Progress | None,
) -> Iterator[bytes]:
    """The bytes [offset, end) of the content, counting in counted[0] what was handed out."""
    reader.seek(start + offset)
    position = offset
    while position < end:
        data = reader.read(min(BLOCK, end - position))
        if not data:
            raise LengthMismatchError(f"the file ended {end - position} bytes early")
        position += len(data)
        counted[0] += len(data)
        if progress is not None:
            progress("upload", position, total)
        yield data


def _conditions(if_match: int | str | None, if_none_match: bool) -> dict[str, str]:
    """The precondition headers of a PUT: a revision or ETag to match, or absence."""
    headers: dict[str, str] = {}
    if if_match is not None:
        if isinstance(if_match, bool) or not isinstance(if_match, (int, str)) or not if_match:
            raise BadRequestError(f"if_match: a revision or an ETag, not {if_match!r}")
        text = str(if_match)
        if text != "*" and not text.startswith(('"', "W/")):  # a revision, or content
            text = f'"{text if text.isdigit() else format_hash(parse_hash(text))}"'
        headers["if-match"] = text
    if if_none_match:
        headers["if-none-match"] = "*"
    return headers


def _decoded(response: httpx.Response) -> Any:
    """The JSON body of an answer; ServiceError when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        request = response.request
        raise ServiceError(
            f"{request.method} {request.url.path}: the service sent no JSON",
            status=response.status_code,
        ) from None


def _revision_of(response: httpx.Response) -> int | None:
    value = response.headers.get("x-revision")
    return int(value) if value is not None and value.isdigit() else None


def _held_for(exc: CatalogError, until: float) -> float | None:
    """How long to wait for a session another writer holds, or None: not that, or too long.

    The service says when the holder's lease runs out (Retry-After): a writer
    that died, such as an instance killed mid-PATCH, lets go of it only then.
    Waiting for that is not a failure of the upload, up to `until` in all.
    """
    wait = getattr(exc, "retry_after", None)
    if not isinstance(exc, UploadPendingError) or not isinstance(wait, int):
        return None
    if time.monotonic() + wait > until:
        return None
    return float(wait)


def _resumable_failure(exc: CatalogError) -> bool:
    """A failure a resumable upload recovers from by asking where it stands."""
    if isinstance(exc, (OffsetMismatchError, UploadPendingError, ServiceUnavailableError)):
        return True
    return isinstance(exc, ServiceError) and exc.status in (408, 429, 502, 503, 504)


def _retryable(exc: ServiceError) -> bool:
    """A failure of the service or of what is in front of it (5xx), not of the request."""
    if exc.code == "not_rescat":  # the wrong URL stays wrong
        return False
    return exc.code == "unavailable" or int(getattr(exc, "status", 0) or 0) >= 500


def _sse_messages(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(id, JSON data) of each Server-Sent Event; (id, None) for a block with an id alone."""
    data: list[str] = []
    ident: str | None = None
    for line in lines:
        if not line:
            if data:
                yield ident or "", json.loads("\n".join(data))
            elif ident is not None:
                yield ident, None
            data, ident = [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            data.append(value)
        elif name == "id":
            ident = value


@contextlib.contextmanager
def _closed_on(stop: threading.Event | None, response: httpx.Response) -> Iterator[None]:
    """While inside, `response` is closed as soon as `stop` is set (a blocked read ends)."""
    if stop is None:
        yield
        return
    done = threading.Event()

    def watch_stop() -> None:
        while not done.is_set():
            if stop.wait(0.1):
                # Closing a socket does not wake a thread blocked reading it; shutting it down does.
                with contextlib.suppress(Exception):
                    stream = response.extensions.get("network_stream")
                    sock = stream.get_extra_info("socket") if stream is not None else None
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
                    else:
                        response.close()
                return

    thread = threading.Thread(target=watch_stop, name="rescat-watch-stop", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


_ITEMS_OPEN = re.compile(r'\s*\{\s*"items"\s*:\s*\[')
_BETWEEN_ITEMS = re.compile(r"[\s,]*")


def _listed_items(chunks: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The items of a `{"items": [...]}` answer, each as soon as it has arrived whole.

    Layout-blind (the service may break lines anywhere or nowhere): after the
    opening, each item is one JSON value, decoded once its text is complete; a
    value cut by the end of a piece is decoded again with the next piece.
    """
    decoder = json.JSONDecoder()
    text, at, opened = "", 0, False
    for chunk in chunks:
        text, at = text[at:] + chunk, 0
        if not opened:
            start = _ITEMS_OPEN.match(text)
            if start is None:
                if len(text) > 256:  # longer than any spacing of the opening
                    raise ServiceError("the answer is not a list of items", status=200)
                continue
            at, opened = start.end(), True
        while True:
            gap = _BETWEEN_ITEMS.match(text, at)  # whitespace and the comma between items
            at = gap.end() if gap else at
            if text.startswith("]", at):
                return
            try:
                item, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                break  # the rest of this item is in the next piece
            yield item
    if not opened:
        raise ServiceError("the answer is not a list of items", status=200)
    raise ServiceError("the answer ended before its list of items did", status=200)


def _raise_for(response: httpx.Response, base_url: str = "") -> None:
    if response.status_code < 400:
        return
    body = b""
    if response.request.method != "HEAD":
        with contextlib.suppress(httpx.HTTPError):
            body = response.read()
    code = response.headers.get("x-rescat-error", "")
    if not code and _not_rescat(response.status_code, body):
        raise _wrong_root(base_url, response, "")
    exc = exception_from(response.status_code, body)
    if isinstance(exc, NotFoundError) and str(exc) == "no such route":
        # The service's router: this client's routes all exist on the root, so the
        # URL is not the root (often the root with /v1 appended).
        raise _wrong_root(base_url, response, ", no such route")
    if isinstance(exc, ServiceError) and code in error_classes():
        exc = error_classes()[code](f"HTTP {response.status_code} {code}")
    wait = response.headers.get("retry-after", "")
    if wait.isascii() and wait.isdigit():  # seconds (the service never sends a date)
        exc.retry_after = int(wait)  # type: ignore[attr-defined]
    raise exc


def _not_rescat(status: int, body: bytes) -> bool:
    """An error that no rescat service sends: no x-rescat-error header, no JSON error.

    Only statuses that say "wrong place" (4xx, 501 Not Implemented): a 502-504
    from a proxy in front of the service stays a (retryable) unavailable service.
    """
    if not (400 <= status < 500 or status == 501):
        return False
    try:
        return not isinstance(json.loads(body)["error"]["code"], str)
    except (ValueError, KeyError, TypeError):
        return True


def _wrong_root(base_url: str, response: httpx.Response, detail: str) -> NotAServiceError:
    """The error of a base URL that is not a rescat service's root: say which, and what to give."""
    base = base_url or f"{response.request.url.scheme}://{response.request.url.netloc.decode()}"
    advice = "give the service root, without /v1"
    if base.endswith("/v1"):
        advice = f"give the service root, {base[:-3]}"
    return NotAServiceError(base, f"HTTP {response.status_code}{detail}", advice, response)


@contextlib.contextmanager
def _source(file: str | os.PathLike[str] | BinaryIO) -> Iterator[tuple[BinaryIO, int]]:
    """A seekable reader of the upload and the offset its content starts at."""
    if isinstance(file, (str, os.PathLike)):
        with open_source(os.fspath(file)) as reader:
            if is_regular_source(file):
                yield reader, 0
            else:  # a FIFO or /dev/stdin named by path: its size means nothing
                with _source(reader) as spooled:
                    yield spooled
        return
    start = _tell(file)
    if start >= 0:
        yield file, start
        return
    with tempfile.TemporaryFile() as spool:  # a pipe: keep a copy to answer challenges
        while data := file.read(HASH_BLOCK):
            spool.write(data)
        spool.seek(0)
        yield spool, 0  # type: ignore[misc]


def _tell(file: Any) -> int:
    try:
        if file.seekable():
            return int(file.tell())
    except (AttributeError, OSError, ValueError):
        pass
    return -1


def _remaining(reader: BinaryIO, start: int) -> int:
    end = reader.seek(0, io.SEEK_END)
    reader.seek(start)
    return int(end) - start


def _hash_file(reader: BinaryIO, start: int, progress: Progress | None) -> tuple[str, int]:
    reader.seek(start)
    total = _remaining(reader, start)
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    done = _hash_into(hasher, reader, -1, progress, total, phase="hash")
    return hasher.hexdigest(), done


def _hash_into(
    hasher: Any,
    reader: BinaryIO,
    length: int,
    progress: Progress | None,
    total: int | None = None,
    phase: str = "verify",
) -> int:
    if progress is None:
        return hash_into(hasher, reader, length)
    of = total if total is not None else length
    return hash_into(hasher, reader, length, lambda done: progress(phase, done, of))


def _ranges_checksum(reader: BinaryIO, start: int, ranges: list[tuple[int, int]]) -> str:
    try:
        return ranges_checksum(reader, [(start + offset, size) for offset, size in ranges])
    except EOFError:
        raise LengthMismatchError("the local file is shorter than the challenge") from None


class _HashingWriter:
    """Writes and hashes on a worker thread, so both overlap with network reads.

    Pieces are gathered into blocks of about 1 MiB; at most a few blocks are in
    flight, so memory stays bounded. `close` waits for everything and re-raises
    a write error.
    """

    MAX_IN_FLIGHT = 4

    def __init__(self, out: BinaryIO, hasher: Any) -> None:
        self._out = out
        self._hasher = hasher
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rescat-download")
        self._pending: deque[Future[None]] = deque()
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= BLOCK:
            self._flush()

    def _flush(self) -> None:
        if not self._parts:
            return
        block = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts, self._size = [], 0
        self._pending.append(self._pool.submit(self._consume, block))
        while len(self._pending) > self.MAX_IN_FLIGHT:
            self._pending.popleft().result()

    def _consume(self, block: bytes) -> None:
        self._out.write(block)
        self._hasher.update(block)

    def close(self) -> None:
        try:
            self._flush()
            while self._pending:
                self._pending.popleft().result()
        finally:
            for future in self._pending:
                future.cancel()
            self._pool.shutdown(wait=True)


def _etag_hash(etag: str | None) -> str:
    text = (etag or "").strip()
    if text.startswith("W/"):
        text = text[2:]
    return parse_hash(text.strip('"'))


def _total_length(response: httpx.Response, offset: int) -> int:
    if response.status_code == 206:
        content_range = response.headers.get("content-range", "")
        try:
            span, _, size = content_range.removeprefix("bytes ").partition("/")
            first = int(span.split("-")[0])
            total = int(size)
        except ValueError:
            raise ServiceError(f"bad Content-Range: {content_range!r}", status=206) from None
        if first != offset:
            raise ServiceError(f"asked for bytes from {offset}, got {content_range!r}", status=206)
        return total
    return int(response.headers["content-length"])


def _unsatisfied_size(response: httpx.Response) -> int:
    content_range = response.headers.get("content-range", "")
    try:
        return int(content_range.rpartition("/")[2])
    except ValueError:
        return -1


def _restart(out: BinaryIO, base: int) -> tuple[Any, int]:
    try:
        if base < 0:
            raise OSError("not seekable")
        out.seek(base)
        out.truncate(base)
    except (OSError, ValueError):
        raise CatalogError("the download must restart but the target cannot rewind") from None
    return blake3.blake3(), 0


def _truncate(out: BinaryIO, size: int) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if out.seekable():
            out.truncate(size)


__all__ = ["CatalogClient", "DownloadResult", "ServiceUnavailableError", "UploadResult"]
