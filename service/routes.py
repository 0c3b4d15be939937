"""The service's routes: one table, and a small handler per route.

Each handler parses what the dispatcher has not (headers, query), calls one
catalog method on a worker thread, and shapes the answer. Everything else
about a route (template, methods, token, parameters, bodies, answers and
errors) is its row in `ROUTES`, which the dispatcher, the OpenAPI document,
/docs and the metrics labels all read.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from typing import Any, BinaryIO, cast
from urllib.parse import quote

from bson import ObjectId
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from swagger_ui_bundle import swagger_ui_path

from catalog.clock import aware
from catalog.errors import (
    BadRequestError,
    HashMismatchError,
    LengthMismatchError,
    NotFoundError,
    PreconditionFailedError,
    RequestExpiredError,
    ResourceDeletedError,
    ResponseMismatchError,
    TooLargeError,
)
from catalog.managed import PathInfo, WriteOptions
from catalog.names import check_path, parse_hash
from service.body import HOP_BYTES, OUT_HOP_BYTES, declared_length, iter_content
from service.conditions import (
    Condition,
    check_tags,
    content_type,
    guess_type,
    holds,
    none_match_holds,
    parse_tag,
    revision_header,
    write_condition,
)
from service.errors import RangeNotSatisfiableError, UnsupportedEncodingError, with_headers
from service.ranges import (
    Unsatisfiable,
    etag_for,
    http_date,
    if_range_holds,
    parse_http_date,
    parse_range,
    tag_list,
)
from service.routes_blob import BLOB_ROUTES
from service.routes_remote import LIST_QUERY, REMOTE_ROUTES, ListPageOut
from service.routes_remote import list_resources as list_page
from service.routes_uploads import UPLOAD_ROUTES
from service.routes_watch import WATCH_ROUTES
from service.routing import Answer, Ctx, Endpoint
from service.schemas import (
    DOCS_ASSETS,
    IF_MATCH,
    IF_MODIFIED_SINCE,
    IF_NONE_MATCH_READ,
    IF_NONE_MATCH_WRITE,
    IF_RANGE,
    IF_UNMODIFIED_SINCE,
    RANGE,
    X_CONTENT_HASH,
    AnswerBody,
    ChallengeOut,
    HealthOut,
    PutRequestBody,
    ResourceOut,
)

__all__ = ["ROUTES"]


# -- service routes ---------------------------------------------------------------------------
async def health(ctx: Ctx[None]) -> Response:
    await ctx.app.ping()
    return JSONResponse(HealthOut(status="ok"))


async def metrics(ctx: Ctx[None]) -> Response:
    return Response(ctx.app.metrics.render(), media_type=ctx.app.metrics.content_type)


async def openapi(ctx: Ctx[None]) -> Response:
    return Response(ctx.app.openapi_json, media_type="application/json")


async def docs(ctx: Ctx[None]) -> Response:
    return Response(DOCS_HTML, media_type="text/html")


async def docs_asset(ctx: Ctx[None]) -> Response:
    name = ctx.params["asset"]
    return FileResponse(
        str(swagger_ui_path / name),
        media_type=DOCS_ASSETS[name],
        headers={"cache-control": "public, max-age=86400"},
    )


# -- resources ------------------------------------------------------------------------------------
async def list_resources(ctx: Ctx[None]) -> Response:
    return await list_page(ctx)  # paged: service.routes_remote


async def get_resource(ctx: Ctx[None]) -> Response:
    env, path = ctx.params["env"], ctx.params["path"]
    reader, info = await ctx.app.sync(ctx.app.managed.open_path, env, path)
    try:
        status, start, count, headers = _selection(ctx.request, info)
        headers.update(revision_header(info))
        if status == 304:
            reader.close()
            return Response(status_code=304, headers=headers)
        # Set as a header, not media_type: Starlette would add a charset to text/* types.
        # A path written with no type (by the CLI, the KV store, the driver, a dedup
        # upload) is served by its name, as one a PUT gave no type is stored.
        headers["content-type"] = info.content_type or guess_type(info.path) or OCTETS
        # Stored content is whatever a token holder sent: a browser must not sniff it
        # into something else (text/plain into HTML, say), also behind a signed URL.
        headers["x-content-type-options"] = "nosniff"
        # ...nor run it as a page of this service's origin (HTML with scripts a signed
        # URL hands to anyone): shown, if at all, in a sandbox of its own.
        headers["content-security-policy"] = "sandbox"
        if ctx.method == "HEAD" or count == 0:
            reader.close()
            return Response(status_code=status, headers=headers)
        if isinstance(reader, io.BytesIO):  # inline content: the bytes are here already
            data = reader.getbuffer()[start : start + count].tobytes()
            reader.close()
            return Response(data, status_code=status, headers=headers)
    except BaseException:
        reader.close()
        raise
    read_ahead = ctx.app.read_ahead if count > OUT_HOP_BYTES else None
    return StreamingResponse(
        iter_content(reader, start, count, ctx.app.io_limiter, read_ahead),
        status_code=status,
        headers=headers,
    )


async def put_resource(ctx: Ctx[None]) -> Response:
    env, path = ctx.params["env"], ctx.params["path"]
    app, request = ctx.app, ctx.request
    header = request.headers.get("x-content-hash")
    expected = parse_hash(header) if header is not None else None
    length = declared_length(request.headers)
    if app.max_size is not None and length > app.max_size:
        raise TooLargeError(f"the body has {length} bytes; the limit is {app.max_size}")
    condition = await _write_condition(ctx, env, path)
    if condition.any and not 0 <= length <= HOP_BYTES:
        await _fail_early(ctx, env, path, condition)  # before a large body is sent for nothing
    options = WriteOptions(
        if_match=condition.if_match,
        if_none_match=condition.if_none_match,
        # Stored on every put, so that a replace never keeps the type of the old bytes.
        content_type=content_type(request.headers.get("content-type"), path) or OCTETS,
    )
    info = await store_body(ctx, env, path, length, expected, options)
    return JSONResponse(
        ResourceOut(path=path, hash=info.hash, length=info.length),
        status_code=201,
        headers={
            "etag": etag_for(info.hash),
            "location": f"/v1/environments/{env}/resources/{quote(path)}",
            **revision_header(info),
        },
    )


async def store_body(
    ctx: Ctx[Any], env: str, path: str, length: int, expected: str | None, options: WriteOptions
) -> PathInfo:
    """Stream the request body into `path` (conditions checked with the write)."""
    if "content-range" in ctx.request.headers:
        # RFC 9110 14.5: a partial PUT must be refused; stored whole, the fragment
        # would replace everything around it.
        raise BadRequestError(
            "a PUT replaces the whole content: Content-Range is refused (use the "
            "resumable uploads for pieces)"
        )
    coding = ctx.request.headers.get("content-encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        # Stored as sent, gzip bytes would be served back as the content itself.
        raise with_headers(
            UnsupportedEncodingError(
                f"Content-Encoding {coding!r}: send the content itself (identity)"
            ),
            {"accept-encoding": "identity"},
        )
    app = ctx.app
    managed = app.managed
    body = app.body_reader(ctx.request)

    def put(pending: ObjectId | None) -> PathInfo:
        with_pending = dataclasses.replace(options, pending_op=pending) if pending else options
        reader = cast(BinaryIO, body)
        return managed.put_path(
            env, path, reader, length, check_hash=expected, options=with_pending
        )

    try:
        return await app.upload(
            body,
            length,
            put,
            abandoned=functools.partial(managed.upload_abandoned, env, path),
            started=functools.partial(
                managed.upload_started, env, path, create_only=options.if_none_match
            ),
            renew=functools.partial(managed.upload_renew, env, path),
        )
    except LengthMismatchError as exc:
        if expected is not None:  # the declared hash is for content of another length
            raise HashMismatchError(f"the body does not hash to {expected}: {exc}") from None
        raise
    finally:
        ctx.call.bytes_in = body.count


async def delete_resource(ctx: Ctx[None]) -> Response:
    env, path = ctx.params["env"], ctx.params["path"]
    condition = await _write_condition(ctx, env, path)
    if condition.if_none_match:  # only if absent: then there is nothing to delete
        if await _stat(ctx, env, path) is not None:
            raise PreconditionFailedError(f"{env}: {path!r} exists")
        raise NotFoundError(f"{env}: no such path {path!r}", path=path)
    await ctx.app.sync(
        functools.partial(ctx.app.managed.delete_path, env, path, if_match=condition.if_match)
    )
    return Response(status_code=204)


# -- proof of access ------------------------------------------------------------------------------
async def create_put_request(ctx: Ctx[PutRequestBody]) -> Response:
    env = ctx.params["env"]
    path = check_path(ctx.body.path)
    digest = parse_hash(ctx.body.hash)
    rr = await ctx.app.sync(ctx.app.managed.put_for_environment_request, env, path, digest)
    return JSONResponse(
        ChallengeOut(
            request_id=rr.request_id,
            ranges=[[start, size] for start, size in rr.ranges],
            expires_at=rr.expires_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        ),
        status_code=201,
    )


async def answer_put_request(ctx: Ctx[AnswerBody]) -> Response:
    env, request_id = ctx.params["env"], ctx.params["request_id"]
    app = ctx.app
    # A checksum that is no hash is a malformed body (400, as a missing one is), not a
    # wrong answer: it is refused before the request is looked up, so it stays open.
    parse_hash(ctx.body.checksum)
    try:
        info = await app.sync(app.managed.prove_for_environment, env, request_id, ctx.body.checksum)
    except (RequestExpiredError, ResponseMismatchError, ResourceDeletedError) as exc:
        app.metrics.proof_failures.labels(exc.code).inc()
        raise
    app.metrics.dedup_hits.inc()
    app.metrics.dedup_bytes.inc(info.length)
    return JSONResponse(
        ResourceOut(path=info.path, hash=info.hash, length=info.length),
        status_code=201,
        headers={"etag": etag_for(info.hash), **revision_header(info)},
    )


# -- helpers -------------------------------------------------------------------------------------
OCTETS = "application/octet-stream"


def _selection(request: Request, info: PathInfo) -> tuple[int, int, int, dict[str, str]]:
    """(status, start, count, headers) a GET answers with, from its conditions and Range.

    304 when If-None-Match matches; 412 (raised) when If-Match (ETag or
    revision) fails; one satisfiable range is 206, an unsatisfiable one 416
    (raised), a malformed or multi-range header is ignored, and a stale
    If-Range falls back to 200.
    """
    etag, size = etag_for(info.hash), info.length
    modified = int(aware(info.updated_at).timestamp())  # HTTP dates have whole seconds
    # Never after the answer's Date (the database's clock may be ahead of this host's).
    modified = min(modified, request.scope.get("rescat.date", modified))
    headers = {"etag": etag, "accept-ranges": "bytes", "last-modified": http_date(modified)}
    conditions = request.headers
    if_match, if_none_match = conditions.get("if-match"), conditions.get("if-none-match")
    check_tags("If-Match", if_match)
    check_tags("If-None-Match", if_none_match)
    if if_match is not None and not any(
        tag is not None and holds(info, tag) for tag in map(parse_tag, tag_list(if_match))
    ):
        raise PreconditionFailedError("If-Match does not match the current content")
    if if_match is None:  # RFC 9110 §13.2.2: the date only when there is no If-Match
        since = parse_http_date(conditions.get("if-unmodified-since"))
        if since is not None and modified > since:
            raise PreconditionFailedError("the content was modified since If-Unmodified-Since")
    if none_match_holds(info, if_none_match):
        return 304, 0, 0, headers
    if if_none_match is None:
        since = parse_http_date(conditions.get("if-modified-since"))
        if since is not None and modified <= since:
            return 304, 0, 0, headers
    start, count, status = 0, size, 200
    range_header = conditions.get("range")
    if range_header is not None and if_range_holds(conditions.get("if-range"), etag):
        try:
            selected = parse_range(range_header, size)
        except Unsatisfiable:
            raise with_headers(
                RangeNotSatisfiableError(f"range {range_header!r}: content has {size} B"),
                {**headers, **revision_header(info), "content-range": f"bytes */{size}"},
            ) from None
        if selected is not None:
            start, end = selected
            count, status = end - start + 1, 206
            headers["content-range"] = f"bytes {start}-{end}/{size}"
    headers["content-length"] = str(count)
    return status, start, count, headers


async def _write_condition(ctx: Ctx[Any], env: str, path: str) -> Condition:
    """If-Match / If-None-Match of a write, as the core checks them atomically with it."""
    headers = ctx.request.headers
    return await write_condition(
        headers.get("if-match"),
        headers.get("if-none-match"),
        lambda: _stat(ctx, env, path),
        headers.get("if-unmodified-since"),
    )


async def _stat(ctx: Ctx[Any], env: str, path: str) -> PathInfo | None:
    try:
        return await ctx.app.sync(ctx.app.managed.stat_for_environment, env, path)
    except NotFoundError:
        return None


async def _fail_early(ctx: Ctx[Any], env: str, path: str, condition: Condition) -> None:
    """412 now when the condition already fails (the write checks it again, atomically).

    Before the body is read, so a client that waits for `100 Continue` (curl
    does past 1 MiB) never sends a large body only to have it refused. The
    refusal says what the catalog's own check says (`env: 'p' exists`, `env:
    no such path 'p'`, `env: 'p' changed (revision N)`), so a chunked upload
    refused here reads as one refused by the write itself, or on the database.
    """
    managed = ctx.app.managed
    if condition.if_none_match:
        # The catalog's create-only check itself (an existing path, or a first upload running).
        await ctx.app.sync(managed.check_creatable, env, path)
        return
    info = await _stat(ctx, env, path)
    if info is None:
        raise PreconditionFailedError(f"{env}: no such path {path!r}")  # as ManagedStorage._link
    if condition.if_match is not None and not holds(info, condition.if_match):
        raise PreconditionFailedError(f"{env}: {path!r} changed (revision {info.revision})")


def _docs_page() -> bytes:
    """The /docs page: Swagger UI from the files shipped in the wheel (no CDN)."""
    return b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>rescat API</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/favicon-32x32.png" sizes="32x32">
<link rel="icon" type="image/png" href="docs/favicon-16x16.png" sizes="16x16">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout"
});
</script>
</body>
</html>
"""


DOCS_HTML = _docs_page()

# -- the table ---------------------------------------------------------------------------------
_OBJECT = "/v1/environments/{env}/resources/{path}"
_READ_HEADERS = (
    RANGE, IF_RANGE, IF_MATCH, IF_NONE_MATCH_READ, IF_MODIFIED_SINCE, IF_UNMODIFIED_SINCE
)  # fmt: skip

ROUTES: tuple[Endpoint[Any], ...] = (
    Endpoint(
        ("GET",),
        "/healthz",
        health,
        "The service and its database answer (no token; 503 within 2 s when the database is down)",
        (Answer(200, "Healthy", HealthOut),),
        errors=("unavailable",),
        auth=False,
        tag="service",
    ),
    Endpoint(
        ("GET",),
        "/metrics",
        metrics,
        "Prometheus metrics (no token); labels are route templates, methods and statuses",
        (Answer(200, "Text exposition format", media=("text/plain",)),),
        auth=False,
        database=False,
        tag="service",
    ),
    Endpoint(
        ("GET",),
        "/openapi.json",
        openapi,
        "This document (no token)",
        (Answer(200, "OpenAPI 3.0 document", media=("application/json",)),),
        auth=False,
        database=False,
        tag="service",
    ),
    Endpoint(
        ("GET",),
        "/docs",
        docs,
        "Interactive API documentation (Swagger UI, served from the package; no token)",
        (Answer(200, "HTML page", media=("text/html",)),),
        auth=False,
        database=False,
        tag="service",
    ),
    Endpoint(
        ("GET",),
        "/docs/{asset}",
        docs_asset,
        "A file of the Swagger UI bundle that /docs loads (no token)",
        (Answer(200, "The file", media=tuple(sorted(set(DOCS_ASSETS.values())))),),
        errors=("not_found",),
        auth=False,
        database=False,
        tag="service",
    ),
    Endpoint(
        ("GET",),
        "/v1/environments/{env}/resources",
        list_resources,
        "List paths, sorted by path; prefix is a plain string prefix; in pages with limit",
        (Answer(200, "The paths (a page of them with limit)", ListPageOut),),
        errors=("invalid_argument",),
        query=LIST_QUERY,
    ),
    Endpoint(
        ("GET",),
        _OBJECT,
        get_resource,
        "Read a resource's bytes (streamed)",
        (
            Answer(
                200,
                "The content, as the media type stored with it (else application/octet-stream)",
                media=("*/*",),
                headers=("ETag", "X-Revision", "Content-Length", "Last-Modified", "Accept-Ranges"),
            ),
            Answer(
                206,
                "One byte range of the content",
                media=("*/*",),
                headers=(
                    "ETag",
                    "X-Revision",
                    "Content-Length",
                    "Last-Modified",
                    "Content-Range",
                    "Accept-Ranges",
                ),
            ),
            Answer(
                304,
                "If-None-Match matched the current ETag (or it did not change since "
                "If-Modified-Since)",
                headers=("ETag", "X-Revision", "Last-Modified"),
            ),
        ),
        errors=("bad_request", "not_found", "precondition_failed", "range_not_satisfiable"),
        headers=_READ_HEADERS,
    ),
    Endpoint(
        ("PUT",),
        _OBJECT,
        put_resource,
        "Store a resource (body streamed; Content-Length or chunked); replaces the path",
        (
            Answer(
                201,
                "Stored (also when it replaced the path)",
                ResourceOut,
                headers=("ETag", "X-Revision"),
            ),
        ),
        errors=(
            "bad_request",
            "length_mismatch",
            "precondition_failed",
            "too_large",
            "hash_mismatch",
            "request_timeout",
        ),
        raw_body="The content, streamed (`Content-Length` or chunked). Its `Content-Type` is "
        "stored and served back, unless it is missing or generic (`application/octet-stream`): "
        "then the type is guessed from the path's name.",
        description="`If-None-Match: *` creates only; `If-Match` replaces only while the ETag "
        "or revision is current. The condition is checked in the same atomic step as the "
        "write: of concurrent writers with one condition, exactly one succeeds.",
        headers=(X_CONTENT_HASH, IF_MATCH, IF_NONE_MATCH_WRITE),
    ),
    Endpoint(
        ("DELETE",),
        _OBJECT,
        delete_resource,
        "Remove a path (its content goes with its last reference)",
        (Answer(204, "Removed"),),
        description="`If-Match` (ETag or revision) is checked atomically with the delete.",
        errors=("bad_request", "not_found", "precondition_failed"),
        headers=(IF_MATCH, IF_NONE_MATCH_WRITE),
    ),
    Endpoint(
        ("POST",),
        "/v1/environments/{env}/put-requests",
        create_put_request,
        "Ask for a new path to content the service already has (dedup): a challenge",
        (Answer(201, "A proof-of-access challenge", ChallengeOut),),
        errors=("invalid_path", "not_found", "upload_pending", "too_many_requests"),
        body=PutRequestBody,
        tag="proof of access",
    ),
    Endpoint(
        ("POST",),
        "/v1/environments/{env}/put-requests/{request_id}/response",
        answer_put_request,
        "Answer a challenge; any answer, right or wrong, consumes the request",
        (Answer(201, "The path now points at the content", ResourceOut, headers=("ETag",)),),
        errors=("response_mismatch", "request_expired", "resource_deleted", "not_found"),
        body=AnswerBody,
        tag="proof of access",
    ),
    *REMOTE_ROUTES,
    *UPLOAD_ROUTES,  # resumable uploads and signed URLs (service.routes_uploads)
    *WATCH_ROUTES,
)
ROUTES += BLOB_ROUTES  # a path's history (service.routes_blob)
