"""Resumable uploads over HTTP (the writer sessions' HTTP face) and signed URLs.

Uploads: `POST .../uploads {"path"}` opens a session (catalog.sessions), each
`PATCH` appends the next bytes at `Upload-Offset` (streamed to a worker thread
through a BodyReader, never whole in memory), `HEAD` tells the durable offset,
`POST .../commit` makes the path point at the content in one step, `DELETE`
cancels. A PATCH whose connection drops keeps what arrived (the session
checkpoints it), so the client resumes at the offset HEAD then reports. Nothing
is visible until commit. Sessions live in MongoDB: any instance serves any step.

Signed URLs: `GET|HEAD /v1/signed/environments/{env}/resources/{path}?expires=
&signature=` (the URL `service.signing.URLSigner.sign` makes) serves the path's
current content like the resource GET, without a token, until it expires; the
secret is RESCAT_SIGNING_SECRET, else the database's shared one. `POST
.../sign` makes such a URL for a token holder, so clients never hold the secret.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Annotated, Any, BinaryIO, Literal, cast
from urllib.parse import parse_qs, quote

import anyio.to_thread
from pydantic import BaseModel, ConfigDict, WithJsonSchema
from starlette.responses import JSONResponse, Response
from typing_extensions import TypedDict

from catalog.errors import (
    BadRequestError,
    ForbiddenError,
    NotFoundError,
    OffsetMismatchError,
    TooLargeError,
)
from catalog.names import check_path, parse_hash
from catalog.sessions import UPLOAD, Session, SessionStore
from service.body import HOP_BYTES, declared_length
from service.conditions import revision_header
from service.errors import with_headers
from service.openapi import RESPONSE_HEADERS
from service.ranges import etag_for
from service.routing import Answer, Ctx, Endpoint, Param, path_param
from service.schemas import (
    IF_MATCH,
    IF_NONE_MATCH_READ,
    IF_RANGE,
    PATH_RULE,
    PATH_SCHEMA,
    RANGE,
    X_CONTENT_HASH,
    ResourceOut,
    decode_lenient,
)
from service.signing import EXPIRES, SIGNATURE, SIGNED_BY, URLSigner, shared_secret

if TYPE_CHECKING:
    from service.app import ServiceApp

__all__ = ["UPLOAD_ROUTES"]

MAX_SIGN_SECONDS = 7 * 24 * 3600
_MAX_OFFSET_DIGITS = 19

RESPONSE_HEADERS.setdefault(
    "Upload-Offset",
    {
        "description": "Bytes of the upload received and kept so far",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
)

# -- per-app state ------------------------------------------------------------------
_LOCK = threading.Lock()
_STORES: weakref.WeakKeyDictionary[ServiceApp, SessionStore] = weakref.WeakKeyDictionary()
_SECRETS: weakref.WeakKeyDictionary[ServiceApp, str] = weakref.WeakKeyDictionary()


def _store(app: ServiceApp) -> SessionStore:
    """The app's SessionStore (made once: it checks its indexes). Call on a worker thread."""
    with _LOCK:
        store = _STORES.get(app)
        if store is None:
            store = _STORES[app] = SessionStore(app.managed)
        return store


def _signer(app: ServiceApp, base_url: str = "") -> URLSigner:
    """A signer with RESCAT_SIGNING_SECRET, else the database's secret (worker thread).

    The secret is read once per app and kept only in memory (never logged).
    """
    with _LOCK:
        secret = _SECRETS.get(app)
        if secret is None:
            secret = _SECRETS[app] = shared_secret(app.managed.db)
    return URLSigner(base_url, secret)


def _upload_session(app: ServiceApp, env: str, upload_id: str) -> Session:
    """The HTTP upload session `upload_id` of `env` (a driver's session is not one)."""
    session = _store(app).get(env, upload_id)
    if session.kind != UPLOAD:
        raise NotFoundError(f"{env}: no upload session {upload_id!r}")
    return session


def _offset_header(value: int) -> dict[str, str]:
    return {"upload-offset": str(value), "cache-control": "no-store"}


# -- uploads --------------------------------------------------------------------------
async def create_upload(ctx: Ctx[UploadBody]) -> Response:
    env = ctx.params["env"]
    path = check_path(ctx.body.path)
    app = ctx.app
    session = await app.sync(lambda: _store(app).create(env, path, kind=UPLOAD))
    return JSONResponse(
        UploadOut(upload_id=session.id, path=session.path, offset=session.offset),
        status_code=201,
        headers={
            **_offset_header(session.offset),
            "location": f"/v1/environments/{env}/uploads/{quote(session.id, safe='')}",
        },
    )


async def upload_offset(ctx: Ctx[None]) -> Response:
    env, upload_id = ctx.params["env"], ctx.params["upload_id"]
    session = await ctx.app.sync(_upload_session, ctx.app, env, upload_id)
    return Response(status_code=204, headers=_offset_header(session.offset))


async def append_upload(ctx: Ctx[None]) -> Response:
    env, upload_id = ctx.params["env"], ctx.params["upload_id"]
    app, request = ctx.app, ctx.request
    offset = _parse_offset(request.headers.get("upload-offset"))
    length = declared_length(request.headers)
    session = await app.sync(_upload_session, app, env, upload_id)
    if offset != session.offset:  # refused before a byte of the body is read
        raise _mismatch(upload_id, offset, session.offset)
    room: int | None = None
    if app.max_size is not None:
        room = max(0, app.max_size - offset)
        if length > room:
            raise TooLargeError(
                f"the upload would have {offset + length} bytes; the limit is {app.max_size}"
            )
    # The service's deadlines, min_rate too: a PATCH trickled a byte a minute held a
    # worker thread (and its session) for as long as it liked.
    body = app.body_reader(request, max_size=room)
    try:
        if 0 <= length <= HOP_BYTES:
            await body.fill(length)
        new_offset = await anyio.to_thread.run_sync(
            _store(app).append,
            env,
            upload_id,
            offset,
            cast(BinaryIO, body),
            length,
            limiter=app.upload_limiter,
        )
    except OffsetMismatchError as exc:
        raise _mismatch(upload_id, offset, exc.expected) from None
    finally:
        ctx.call.bytes_in = body.count
    return Response(status_code=204, headers=_offset_header(new_offset))


async def commit_upload(ctx: Ctx[None]) -> Response:
    env, upload_id = ctx.params["env"], ctx.params["upload_id"]
    app = ctx.app
    header = ctx.request.headers.get("x-content-hash")
    expected = parse_hash(header) if header is not None else None
    await app.sync(_upload_session, app, env, upload_id)
    info = await anyio.to_thread.run_sync(
        _store(app).commit, env, upload_id, expected, limiter=app.upload_limiter
    )
    return JSONResponse(
        ResourceOut(path=info.path, hash=info.hash, length=info.length),
        status_code=201,
        headers={
            "etag": etag_for(info.hash),
            "location": "/v1/environments/{}/resources/{}".format(
                quote(env, safe=""), "/".join(quote(s, safe="") for s in info.path.split("/"))
            ),
            **revision_header(info),
        },
    )


async def cancel_upload(ctx: Ctx[None]) -> Response:
    env, upload_id = ctx.params["env"], ctx.params["upload_id"]
    app = ctx.app

    def cancel() -> None:
        _upload_session(app, env, upload_id)
        _store(app).cancel(env, upload_id)

    await app.sync(cancel)
    return Response(status_code=204)


# -- signed URLs --------------------------------------------------------------------------
async def sign_url(ctx: Ctx[SignBody]) -> Response:
    env = ctx.params["env"]
    path = check_path(ctx.body.path)
    if not 1 <= ctx.body.expires_in <= MAX_SIGN_SECONDS:
        raise BadRequestError(f"expires_in must be 1-{MAX_SIGN_SECONDS} seconds")
    base = str(ctx.request.base_url).rstrip("/")
    signer = await ctx.app.sync(_signer, ctx.app, base)
    # Bound to the token that asks (if any): revoking it ends the URLs it was given.
    url = signer.sign(
        ctx.body.method, env, path, ttl=float(ctx.body.expires_in), token_id=ctx.call.token_id
    )
    expires = int(parse_qs(url.split("?", 1)[1])[EXPIRES][0])
    return JSONResponse(SignedOut(url=url, expires=expires))


async def signed_get(ctx: Ctx[None]) -> Response:
    env, path = ctx.params["env"], ctx.params["path"]
    raw: bytes = ctx.request.scope.get("query_string", b"")
    query = parse_qs(raw.decode("latin-1"), keep_blank_values=True)
    signer = await ctx.app.sync(_signer, ctx.app)
    token_id = signer.verify(ctx.method, env, path, query)
    if token_id is not None and not await ctx.app.sync(ctx.app.tokens.exists, token_id):
        raise ForbiddenError("the token this URL was signed for has been revoked")
    from service.routes import get_resource  # the same Range / ETag answers as a GET

    return await get_resource(ctx)


# -- helpers -------------------------------------------------------------------------------
def _parse_offset(value: str | None) -> int:
    if value is None:
        raise BadRequestError("an Upload-Offset header is required")
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > _MAX_OFFSET_DIGITS:
        raise BadRequestError(f"invalid Upload-Offset: {value!r} (bytes received so far)")
    return int(text)


def _mismatch(upload_id: str, offset: int, current: int) -> OffsetMismatchError:
    return with_headers(
        OffsetMismatchError(
            f"upload {upload_id} is at offset {current}, not {offset}",
            offset=offset,
            expected=current,
        ),
        _offset_header(current),
    )


# -- schemas -------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class UploadBody(_Body):
    """Open a resumable upload of `path` (nothing is visible until commit)."""

    path: Annotated[str, WithJsonSchema({**PATH_SCHEMA, "description": PATH_RULE})]


class SignBody(_Body):
    """Ask for a signed URL that reads `path` without a token until it expires."""

    path: Annotated[str, WithJsonSchema({**PATH_SCHEMA, "description": PATH_RULE})]
    method: Annotated[
        Literal["GET", "HEAD"],
        WithJsonSchema({"type": "string", "enum": ["GET", "HEAD"], "default": "GET"}),
    ] = "GET"
    expires_in: Annotated[
        int,
        WithJsonSchema(
            {
                "type": "integer",
                "minimum": 1,
                "maximum": MAX_SIGN_SECONDS,
                "default": 3600,
                "description": "Seconds the URL stays valid",
            }
        ),
    ] = 3600


_Offset = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0})]


class UploadOut(TypedDict):
    """A new resumable upload."""

    upload_id: str
    path: Annotated[str, WithJsonSchema({"type": "string", "minLength": 1})]
    offset: _Offset


class SignedOut(TypedDict):
    """A signed URL and when it expires (Unix seconds)."""

    url: str
    expires: Annotated[int, WithJsonSchema({"type": "integer"})]


UPLOAD_ID = path_param(
    Param(
        "upload_id",
        "path",
        "The id of a resumable upload; an unknown, finished or reclaimed one is 404.",
        {"type": "string", "minLength": 1},
        decode=decode_lenient,
        required=True,
    )
)
UPLOAD_OFFSET = Param(
    "Upload-Offset",
    "header",
    "The offset the body's bytes start at: the upload's current offset (409 "
    "offset_mismatch otherwise; a malformed value is 400 bad_request).",
    {"type": "string", "pattern": "^[0-9]{1,19}$"},
    required=True,
    error="bad_request",
)
SIGNED_EXPIRES = Param(
    EXPIRES,
    "query",
    "When the URL expires (Unix seconds), as signed.",
    {"type": "string"},
    required=True,
    error="forbidden",
)
SIGNED_BY_TOKEN = Param(
    SIGNED_BY,
    "query",
    "The id of the token the URL was signed for, as signed: the URL is 403 once that "
    "token is revoked.",
    {"type": "string"},
    error="forbidden",
)
SIGNED_SIGNATURE = Param(
    SIGNATURE,
    "query",
    "The URL's signature (HMAC-SHA256, hex); a wrong or expired one is 403 forbidden.",
    {"type": "string"},
    required=True,
    error="forbidden",
)

# -- the rows -------------------------------------------------------------------------------
_UPLOADS = "/v1/environments/{env}/uploads"
_UPLOAD = _UPLOADS + "/{upload_id}"
_SIGNED = "/v1/signed/environments/{env}/resources/{path}"

UPLOAD_ROUTES: tuple[Endpoint[Any], ...] = (
    Endpoint(
        ("POST",),
        _UPLOADS,
        create_upload,
        "Open a resumable upload of a path; nothing is visible until it is committed",
        (Answer(201, "The upload, at offset 0", UploadOut, headers=("Upload-Offset",)),),
        errors=("invalid_path",),
        body=UploadBody,
        tag="uploads",
    ),
    Endpoint(
        ("HEAD",),
        _UPLOAD,
        upload_offset,
        "How many bytes of the upload were received and kept (where to resume)",
        (Answer(204, "The upload's offset", headers=("Upload-Offset",)),),
        errors=("not_found",),
        tag="uploads",
    ),
    Endpoint(
        ("PATCH",),
        _UPLOAD,
        append_upload,
        "Append the body at Upload-Offset (streamed); a dropped connection keeps what arrived",
        (Answer(204, "Appended: the new offset", headers=("Upload-Offset",)),),
        errors=(
            "bad_request",
            "not_found",
            "offset_mismatch",
            "upload_pending",
            "too_large",
            "request_timeout",
        ),
        raw_body="The next bytes of the content, streamed (`Content-Length` or chunked).",
        headers=(UPLOAD_OFFSET,),
        tag="uploads",
    ),
    Endpoint(
        ("DELETE",),
        _UPLOAD,
        cancel_upload,
        "Cancel the upload and discard its bytes",
        (Answer(204, "Cancelled"),),
        errors=("not_found", "upload_pending"),
        tag="uploads",
    ),
    Endpoint(
        ("POST",),
        _UPLOAD + "/commit",
        commit_upload,
        "Make the path point at the upload's content in one step (deduplicated like a PUT)",
        (Answer(201, "Stored", ResourceOut, headers=("ETag",)),),
        errors=("bad_request", "not_found", "hash_mismatch", "upload_pending"),
        headers=(X_CONTENT_HASH,),
        tag="uploads",
    ),
    Endpoint(
        ("POST",),
        "/v1/environments/{env}/sign",
        sign_url,
        "A signed URL that reads a path without a token until it expires",
        (Answer(200, "The URL", SignedOut),),
        errors=("invalid_path",),
        body=SignBody,
        database=True,
        tag="signed URLs",
    ),
    Endpoint(
        ("GET",),
        _SIGNED,
        signed_get,
        "Read a resource through a signed URL (no token; 403 once expired or if altered)",
        (
            Answer(
                200,
                "The content",
                media=("application/octet-stream",),
                headers=("ETag", "Content-Length", "Accept-Ranges"),
            ),
            Answer(
                206,
                "One byte range of the content",
                media=("application/octet-stream",),
                headers=("ETag", "Content-Length", "Content-Range", "Accept-Ranges"),
            ),
            Answer(304, "If-None-Match matched the current ETag", headers=("ETag",)),
        ),
        errors=("forbidden", "not_found", "precondition_failed", "range_not_satisfiable"),
        auth=False,
        query=(SIGNED_EXPIRES, SIGNED_BY_TOKEN, SIGNED_SIGNATURE),
        headers=(RANGE, IF_RANGE, IF_MATCH, IF_NONE_MATCH_READ),
        tag="signed URLs",
    ),
)
