"""Routes for the CLI's data commands over HTTP: a paged listing, stat, move and copy.

* `GET /v1/environments/{env}/resources?prefix=&limit=&after=&delimiter=&detail=` lists
  in pages (`catalog.listing`): `limit` keys after `after`, and `"next"` (the
  value to pass as `after`) while more remain. `delimiter` folds the paths that
  have it after the prefix into folder keys, answered in `"prefixes"` (as S3's
  CommonPrefixes). Without `limit`, every path in one answer, as before;
  `detail=true` adds each path's `updated_at` (items are `{"path","hash","length"}`
  otherwise, as the contract has them).
* `GET /v1/environments/{env}/stat/{path}`: what a path holds, with its times,
  revision and its content's state (what `rescat stat --json` prints).
* `POST /v1/environments/{env}/move` `{"from","to"}`: repoints `to` at what
  `from` holds and drops `from`; no bytes move.
* `POST /v1/environments/{env}/copy` `{"from","to","from_env"?}`: `to` in
  `{env}` gets one more reference to what `from_env:from` holds (default
  `from_env`: `{env}`); no bytes move. A token must allow both environments.

Move and copy answer 201 with the destination's stat, as a PUT answers 201.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Callable, Iterator
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.concurrency import iterate_in_threadpool
from starlette.responses import JSONResponse, Response, StreamingResponse
from typing_extensions import NotRequired, TypedDict

from catalog.clock import aware
from catalog.errors import InvalidArgumentError
from catalog.listing import MAX_LIMIT, check_delimiter, list_page
from catalog.managed import PathInfo
from catalog.names import check_env, check_path, check_prefix
from service.ranges import etag_for
from service.routing import Answer, Ctx, Endpoint, Param, query_params
from service.schemas import (
    ENV_RULE,
    ENV_SCHEMA,
    PATH_OUT_SCHEMA,
    PATH_RULE,
    PATH_SCHEMA,
    PREFIX,
    PREFIX_SCHEMA,
    ResourceOut,
)

__all__ = ["LIST_QUERY", "REMOTE_ROUTES", "ListPageOut", "list_resources"]

# -- parameters -----------------------------------------------------------------------
LIMIT = Param(
    "limit",
    "query",
    f"At most this many keys (paths and folders) in the answer, 1-{MAX_LIMIT}; `next` "
    "is set when more remain. Without it, every path in one answer.",
    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
    error="invalid_argument",
)
AFTER = Param(
    "after",
    "query",
    "Continue after this key: the `next` of the previous page (any string: keys that "
    "sort after it, byte-wise in UTF-8).",
    PREFIX_SCHEMA,
    error="invalid_path",
)
DELIMITER = Param(
    "delimiter",
    "query",
    "One character (`/`): paths with it after `prefix` are listed once per folder, "
    "`prefix` + up to and including the delimiter, in `prefixes`. Empty: no folders.",
    {"type": "string", "maxLength": 1, "pattern": r"^[^\x00-\x1f\x7f-\x9f]*$"},
    error="invalid_argument",
)
DETAIL = Param(
    "detail",
    "query",
    "`true`: each item also carries `updated_at`, when its path last changed (`ls -l`).",
    {"type": "boolean"},
    error="invalid_argument",
)
LIST_QUERY = (PREFIX, LIMIT, AFTER, DELIMITER, DETAIL)

# -- bodies and answers -----------------------------------------------------------------
_PathIn = Annotated[str, WithJsonSchema({**PATH_SCHEMA, "description": PATH_RULE})]
_Time = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
_PathOut = Annotated[str, WithJsonSchema(PATH_OUT_SCHEMA)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class MoveBody(_Body):
    """Move `from_env:from` to `to` (replacing `to`; `from_env` defaults to the URL's)."""

    from_: _PathIn = Field(alias="from")
    to: _PathIn
    from_env: Annotated[
        str, WithJsonSchema({**ENV_SCHEMA, "description": f"Source environment: {ENV_RULE}"})
    ] = ""


class CopyBody(_Body):
    """Point `to` at what `from_env:from` holds (`from_env` defaults to the URL's)."""

    from_: _PathIn = Field(alias="from")
    to: _PathIn
    from_env: Annotated[
        str, WithJsonSchema({**ENV_SCHEMA, "description": f"Source environment: {ENV_RULE}"})
    ] = ""


# Paths per bulk delete, as S3's DeleteObjects: one transaction each. Its body
# can hold that many of the longest paths, escaped (\uXXXX) at worst.
DELETE_MAX = 1000
DELETE_BODY_MAX = 8 * 1024 * 1024


class DeleteBody(_Body):
    """Delete these paths of the environment together (missing ones are skipped)."""

    paths: Annotated[
        list[_PathIn],
        WithJsonSchema(
            {
                "type": "array",
                "items": {**PATH_SCHEMA, "description": PATH_RULE},
                "minItems": 1,
                "maxItems": DELETE_MAX,
            }
        ),
    ]


class DeletedOut(TypedDict):
    deleted: list[_PathOut]
    missing: list[_PathOut]


class ListedOut(ResourceOut):
    """A path of a listing: what it holds (and with `detail=true`, when it last changed)."""

    updated_at: NotRequired[_Time]


class ListPageOut(TypedDict):
    """Paths sorted by path; with a delimiter, folder keys in `prefixes`; `next` if more."""

    items: list[ListedOut]
    prefixes: NotRequired[list[str]]
    next: NotRequired[str]


class StateAt(TypedDict):
    state: str
    at: _Time


class PathInfoOut(TypedDict):
    """What a path holds, its times and revision, and its content's state and history."""

    env: str
    path: _PathOut
    hash: Annotated[str, WithJsonSchema({"type": "string", "pattern": r"^[0-9a-f]{64}$"})]
    length: Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0})]
    created_at: _Time
    updated_at: _Time
    revision: int
    resource_id: str
    state: str
    history: list[StateAt]


# -- handlers ---------------------------------------------------------------------------
async def list_resources(ctx: Ctx[None]) -> Response:
    env = ctx.params["env"]
    query = query_params(ctx.request)
    prefix = check_prefix(query.get("prefix", ""))
    after = check_prefix(query.get("after", ""))
    delimiter = check_delimiter(query.get("delimiter"))
    limit = _limit(query.get("limit"))
    detail = _flag("detail", query.get("detail"))
    managed = ctx.app.managed
    if limit is None and delimiter is None:
        # Every path in one answer (the contract's form), streamed from the cursor: a
        # tenant's million paths were one list in memory per request (~320 MiB for
        # 200,000), a few concurrent listings enough to exhaust the service.
        cursor = await ctx.app.sync(functools.partial(managed.iter_paths, env, prefix, after=after))
        return StreamingResponse(
            iterate_in_threadpool(_items_json(cursor, detail)), media_type="application/json"
        )

    def page() -> ListPageOut:
        found = list_page(managed, env, prefix, after=after, limit=limit, delimiter=delimiter)
        out = ListPageOut(items=[_listed(doc, detail) for doc in found.items])
        if delimiter is not None:
            out["prefixes"] = found.prefixes
        if found.next is not None:
            out["next"] = found.next
        return out

    return JSONResponse(await ctx.app.sync(page))


async def stat_resource(ctx: Ctx[None]) -> Response:
    env, path = ctx.params["env"], ctx.params["path"]
    info = await ctx.app.sync(ctx.app.managed.stat_for_environment, env, path)
    return JSONResponse(path_info_json(info), headers={"etag": etag_for(info.hash)})


async def move_resource(ctx: Ctx[MoveBody]) -> Response:
    return await _repoint(ctx, ctx.app.managed.move_path)


async def copy_resource(ctx: Ctx[CopyBody]) -> Response:
    return await _repoint(ctx, ctx.app.managed.copy_path)


async def _repoint(ctx: Ctx[Any], fn: Callable[[str, str, str, str], PathInfo]) -> Response:
    """Move or copy `from_env:from` to `to` here: fn(src_env, src, dst_env, dst)."""
    env = ctx.params["env"]
    src_env = await _source_env(ctx, ctx.body.from_env)
    src, dst = check_path(ctx.body.from_), check_path(ctx.body.to)
    info = await ctx.app.sync(fn, src_env, src, env, dst)
    return _created(env, info)


async def delete_resources(ctx: Ctx[DeleteBody]) -> Response:
    """Many deletes in one transaction: all of them (those that exist), or none."""
    env = ctx.params["env"]
    given = ctx.body.paths
    if not given or len(given) > DELETE_MAX:  # counted as sent, repeats included
        raise InvalidArgumentError(f"give 1 to {DELETE_MAX} paths, not {len(given)}")
    paths = list(dict.fromkeys(check_path(p) for p in given))
    deleted = await ctx.app.sync(ctx.app.managed.delete_paths, env, paths)
    gone = set(deleted)
    return JSONResponse(DeletedOut(deleted=deleted, missing=[p for p in paths if p not in gone]))


async def _source_env(ctx: Ctx[Any], from_env: str) -> str:
    """The body's source environment (default: the URL's), which the token must allow too."""
    env: str = ctx.params["env"]
    src_env = check_env(from_env) if from_env else env
    if src_env != env and ctx.app.auth:
        # The URL's environment was checked by the dispatcher; the source's is checked here.
        token = await ctx.app._authenticate(ctx.request)  # the token, checked again
        if token is not None:
            token.check_env(src_env)
    return src_env


# -- helpers ----------------------------------------------------------------------------
def rfc3339(value: datetime.datetime) -> str:
    """As the CLI prints times in JSON: ISO 8601, UTC as `Z`."""
    return aware(value).isoformat().replace("+00:00", "Z")


def path_info_json(info: PathInfo) -> PathInfoOut:
    return PathInfoOut(
        env=info.env_uuid,
        path=info.path,
        hash=info.hash,
        length=info.length,
        created_at=rfc3339(info.created_at),
        updated_at=rfc3339(info.updated_at),
        revision=info.revision,
        resource_id=info.resource_id,
        state=info.state,
        history=[StateAt(state=state, at=rfc3339(at)) for state, at in info.history],
    )


def _items_json(cursor: Any, detail: bool, batch: int = 1000) -> Iterator[bytes]:
    """`{"items": [...]}` from a cursor of path documents, a batch of items at a time."""
    cursor.batch_size(batch)  # pymongo's own batches are up to 16 MiB of documents
    try:
        yield b'{"items":['
        first = True
        items: list[bytes] = []
        for doc in cursor:
            items.append(_compact(_listed(doc, detail)))
            if len(items) >= batch:
                yield (b"" if first else b",") + b",".join(items)
                first, items = False, []
        if items:
            yield (b"" if first else b",") + b",".join(items)
        yield b"]}"
    finally:
        cursor.close()


def _compact(item: Any) -> bytes:
    """As JSONResponse renders JSON."""
    return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode()


def _listed(doc: dict[str, Any], detail: bool) -> ListedOut:
    item = ListedOut(path=doc["path"], hash=doc["hash"], length=int(doc["length"]))
    if detail:
        item["updated_at"] = rfc3339(doc["updated_at"])
    return item


def _created(env: str, info: PathInfo) -> Response:
    encoded = "/".join(quote(segment, safe="") for segment in info.path.split("/"))
    return JSONResponse(
        path_info_json(info),
        status_code=201,
        headers={
            "etag": etag_for(info.hash),
            "location": f"/v1/environments/{quote(env, safe='')}/resources/{encoded}",
        },
    )


def _limit(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 6:
        raise InvalidArgumentError(f"invalid limit {value!r}: an integer from 1 to {MAX_LIMIT}")
    limit = int(value)
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgumentError(f"invalid limit {limit}: from 1 to {MAX_LIMIT}")
    return limit


def _flag(name: str, value: str | None) -> bool:
    if value is None or value == "false":
        return False
    if value == "true":
        return True
    raise InvalidArgumentError(f"invalid {name} {value!r}: true or false")


# -- the rows ---------------------------------------------------------------------------
_DEST = "The destination now points at the content (its stat)"

REMOTE_ROUTES: tuple[Endpoint[Any], ...] = (
    Endpoint(
        ("GET",),
        "/v1/environments/{env}/stat/{path}",
        stat_resource,
        "What a path holds: hash, length, times, revision, and its content's state",
        (Answer(200, "The path's stat", PathInfoOut, headers=("ETag",)),),
        errors=("not_found",),
    ),
    Endpoint(
        ("POST",),
        "/v1/environments/{env}/move",
        move_resource,
        "Move a path here, from this environment or `from_env` (replacing the destination); "
        "moves no bytes",
        (Answer(201, _DEST, PathInfoOut, headers=("ETag",)),),
        errors=("invalid_path", "not_found"),
        body=MoveBody,
    ),
    Endpoint(
        ("POST",),
        "/v1/environments/{env}/delete",
        delete_resources,
        f"Delete up to {DELETE_MAX} paths in one transaction (as S3's DeleteObjects); "
        "missing ones are listed, not an error",
        (Answer(200, "The paths deleted and those that were missing", DeletedOut),),
        errors=("invalid_path", "invalid_argument"),
        body=DeleteBody,
        body_max=DELETE_BODY_MAX,
    ),
    Endpoint(
        ("POST",),
        "/v1/environments/{env}/copy",
        copy_resource,
        "Copy a path, also from another environment (`from_env`, if the token allows it); "
        "moves no bytes",
        (Answer(201, _DEST, PathInfoOut, headers=("ETag",)),),
        errors=("invalid_path", "not_found", "forbidden"),
        body=CopyBody,
    ),
)
