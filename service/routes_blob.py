"""Blob-server routes: a path's history, and the seed's own API (go-storage-server).

`BLOB_ROUTES` are part of every service. `compat_store_routes(env)` are the
seed's routes (`/store/{location}`) over one environment, mounted by
`rescat serve --compat-store ENV`: create (201; 409 if it exists), replace
(200; 404 if absent), read (200/404) and delete (204/404), each one atomic
step of the core (a create is `If-None-Match: *`, a replace `If-Match: *`, or
the client's own If-Match / If-None-Match: 412 when they fail), with the same
bearer token as /v1 (a token for another environment is 403).
"""

from __future__ import annotations

import functools
import itertools
from typing import Annotated, Any, Literal

from pydantic import WithJsonSchema
from starlette.concurrency import iterate_in_threadpool
from starlette.responses import Response, StreamingResponse
from typing_extensions import TypedDict

from catalog import history
from catalog.errors import (
    AlreadyExistsError,
    InvalidPathError,
    NotFoundError,
    PreconditionFailedError,
    TooLargeError,
)
from catalog.managed import WriteOptions
from catalog.names import MAX_PATH_BYTES
from service.conditions import (
    Condition,
    Stat,
    content_type,
    holds,
    revision_header,
    stat_or_none,
    write_condition,
)
from service.ranges import etag_for
from service.routing import Answer, Ctx, Endpoint, Param, path_param
from service.schemas import _SEG_ANY, _SEG_ASCII, decode_path

__all__ = ["BLOB_ROUTES", "compat_store_routes"]


# -- history ------------------------------------------------------------------------------
class HistoryItemOut(TypedDict):
    """One operation on a path."""

    at: Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
    event: Annotated[
        Literal["create", "replace", "move", "delete", "upload", "put"],
        WithJsonSchema(
            {"type": "string", "enum": ["create", "replace", "move", "delete", "upload", "put"]}
        ),
    ]
    state: Annotated[
        Literal["ok", "failed", "pending"],
        WithJsonSchema({"type": "string", "enum": ["ok", "failed", "pending"]}),
    ]
    hash: Annotated[
        str,
        WithJsonSchema(
            {
                "type": "string",
                "pattern": "^(?:[0-9a-f]{64})?$",
                "description": "BLAKE3 hex (empty for an upload that did not complete)",
            }
        ),
    ]
    length: Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0})]
    revision: Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0})]


class HistoryOut(TypedDict):
    """A path's operations, oldest first."""

    items: list[HistoryItemOut]


async def path_history(ctx: Ctx[None]) -> Response:
    env, path = ctx.params["env"], ctx.params["path"]
    managed = ctx.app.managed
    events = managed.iter_history(env, path)
    first = await ctx.app.sync(next, events, None)
    if first is None:
        raise NotFoundError(f"{env}: no history for {path!r}", path=path)
    # Sent as read (a bucket of the archive at a time): a hot key's past may be long.
    pieces = history.json_items(itertools.chain((first,), events))
    return StreamingResponse(iterate_in_threadpool(pieces), media_type="application/json")


BLOB_ROUTES: tuple[Endpoint[Any], ...] = (
    Endpoint(
        ("GET",),
        "/v1/environments/{env}/history/{path}",
        path_history,
        "A path's history: one item per operation, oldest first (also after it was deleted)",
        (Answer(200, "The operations", HistoryOut),),
        errors=("not_found",),
        description="`event`: create, replace, move, delete, or upload (an upload that failed, "
        "was abandoned or is running); `state`: ok, failed, or pending while it runs. "
        "Kept in the database for `--history-days` (gc trims older items).",
    ),
)


# -- the seed's API: /store/{location} on one environment --------------------------------
def decode_location(raw: str) -> str:
    """A seed name: one path segment (a decoded `/` is refused like any invalid name)."""
    name = decode_path(raw)  # says what is wrong with it (not valid UTF-8, say)
    if "/" in name:
        raise InvalidPathError(f"invalid name {name!r}: one path segment")
    return name


LOCATION = path_param(
    Param(
        "location",
        "path",
        "The blob's name: one path segment of the environment served (`--compat-store`).",
        {
            "type": "string",
            "anyOf": [
                {"minLength": 1, "maxLength": MAX_PATH_BYTES, "pattern": f"^{_SEG_ASCII}$"},
                {"minLength": 1, "maxLength": MAX_PATH_BYTES // 4, "pattern": f"^{_SEG_ANY}$"},
            ],
        },
        decode=decode_location,
        required=True,
        error="invalid_path",
    )
)


def compat_store_routes(env: str) -> tuple[Endpoint[Any], ...]:
    """The seed's routes over environment `env` (its /healthz is the service's own)."""

    async def authorize(ctx: Ctx[Any]) -> str:
        if ctx.app.auth:  # the token was checked; here: is it for this environment?
            token = await ctx.app._authenticate(ctx.request)
            if token is not None:
                token.check_env(env)
        ctx.call.env = env
        return ctx.params["location"]

    async def write(ctx: Ctx[Any], options: WriteOptions) -> Any:
        from service.body import declared_length
        from service.routes import store_body

        name = ctx.params["location"]  # authorized by the caller
        length = declared_length(ctx.request.headers)
        app = ctx.app
        if app.max_size is not None and length > app.max_size:
            raise TooLargeError(f"the body has {length} bytes; the limit is {app.max_size}")
        typed = WriteOptions(
            if_match=options.if_match,
            if_none_match=options.if_none_match,
            content_type=content_type(ctx.request.headers.get("content-type"), name)
            or "application/octet-stream",
        )
        return await store_body(ctx, env, name, length, None, typed)

    def large(ctx: Ctx[Any]) -> bool:
        """A body worth refusing before it is sent (curl waits for 100 Continue past 1 MiB)."""
        from service.body import HOP_BYTES, declared_length

        return not 0 <= declared_length(ctx.request.headers) <= HOP_BYTES

    async def store_create(ctx: Ctx[None]) -> Response:
        name = await authorize(ctx)
        if large(ctx):  # 409 now, not after the whole body (the write checks it again, atomically)
            managed = ctx.app.managed
            running = functools.partial(history.upload_in_progress, managed.history, env, name)
            if await stat(ctx, name)() is not None or await ctx.app.sync(running):
                raise AlreadyExistsError(f"{name!r} exists")
        try:
            info = await write(ctx, WriteOptions(if_none_match=True))
        except PreconditionFailedError:
            raise AlreadyExistsError(f"{ctx.params['location']!r} exists") from None
        return Response(status_code=201, headers=_written(info))

    async def condition(ctx: Ctx[Any]) -> Condition | None:
        """The client's own If-Match / If-None-Match (None: it sent neither).

        /store hands out ETags and revisions: a replace or delete conditioned on
        one must not go through once the blob changed (a lost update). An absent
        blob stays 404, as without a condition (RFC 9110 §13.2.1).
        """
        headers = ctx.request.headers
        if headers.get("if-match") is None and headers.get("if-none-match") is None:
            return None
        name = ctx.params["location"]
        try:
            found = await write_condition(
                headers.get("if-match"), headers.get("if-none-match"), stat(ctx, name)
            )
        except PreconditionFailedError:
            await _exists(ctx, name)
            raise
        if found.if_none_match:  # the blob must be absent, and then there is nothing to change
            await _exists(ctx, name)
            raise PreconditionFailedError(f"{name!r} exists")
        return found

    def stat(ctx: Ctx[Any], name: str) -> Stat:
        return stat_or_none(lambda: ctx.app.sync(ctx.app.managed.stat_for_environment, env, name))

    async def _exists(ctx: Ctx[Any], name: str) -> None:
        if await stat(ctx, name)() is None:
            raise NotFoundError(f"no such blob {name!r}", path=name)

    async def store_replace(ctx: Ctx[None]) -> Response:
        name = await authorize(ctx)
        given = await condition(ctx)
        if_match = given.if_match if given is not None else None
        if large(ctx):  # 404 / 412 now, not after the whole body (the write checks it again)
            info = await stat(ctx, name)()
            if info is None:
                raise NotFoundError(f"no such blob {name!r}", path=name)
            if if_match is not None and not holds(info, if_match):
                raise PreconditionFailedError("If-Match does not match the current content")
        try:
            info = await write(ctx, WriteOptions(if_match="*" if if_match is None else if_match))
        except PreconditionFailedError:
            if given is not None:
                await _exists(ctx, name)  # absent: 404; present: its tag did not match
                raise
            raise NotFoundError(f"no such blob {name!r}", path=name) from None
        return Response(status_code=200, headers=_written(info))

    async def store_get(ctx: Ctx[None]) -> Response:
        """/v1's read of the blob: its ETag is honoured (If-None-Match 304, If-Match 412,
        RFC 9110 §13.1), with Range and Last-Modified, HEAD as GET without the body."""
        name = await authorize(ctx)
        ctx.params.update(env=env, path=name)
        return await get_resource(ctx)

    async def store_delete(ctx: Ctx[None]) -> Response:
        name = await authorize(ctx)
        given = await condition(ctx)
        if_match = given.if_match if given else None
        try:
            await ctx.app.sync(
                functools.partial(ctx.app.managed.delete_path, env, name, if_match=if_match)
            )
        except PreconditionFailedError:
            await _exists(ctx, name)
            raise
        return Response(status_code=204)

    from service.routes import ROUTES, get_resource

    read = next(e for e in ROUTES if e.handler is get_resource)
    template = "/store/{location}"
    body = "The blob's bytes (streamed; `Content-Length` or chunked)."
    # forbidden: a token for another environment (the path names none, so it is declared here).
    write_errors = ("forbidden", "bad_request", "length_mismatch", "too_large", "request_timeout")
    return (
        Endpoint(
            ("POST",),
            template,
            store_create,
            f"Create a blob in environment {env} (the seed's API)",
            (Answer(201, "Created", headers=("ETag", "X-Revision")),),
            errors=("already_exists", *write_errors),
            raw_body=body,
            tag="compat store",
        ),
        Endpoint(
            ("PUT",),
            template,
            store_replace,
            f"Replace a blob in environment {env} (the seed's API)",
            (Answer(200, "Replaced", headers=("ETag", "X-Revision")),),
            errors=("not_found", "precondition_failed", *write_errors),
            raw_body=body,
            tag="compat store",
        ),
        Endpoint(
            ("GET",),
            template,
            store_get,
            f"Read a blob of environment {env} (the seed's API)",
            read.answers,  # /v1's read: conditions, Range, Last-Modified
            errors=("forbidden", *read.errors),
            headers=read.headers,
            tag="compat store",
        ),
        Endpoint(
            ("DELETE",),
            template,
            store_delete,
            f"Delete a blob of environment {env} (the seed's API)",
            (Answer(204, "Deleted"),),
            errors=("forbidden", "not_found", "precondition_failed", "bad_request"),
            tag="compat store",
        ),
    )


def _written(info: Any) -> dict[str, str]:
    return {"etag": etag_for(info.hash), **revision_header(info)}
