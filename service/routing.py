"""The route table's vocabulary, and dispatch over the raw request path.

An `Endpoint` declares everything about one route: methods, template,
handler, whether it needs a token, its parameters, request body and answers.
The dispatcher (`Router`), the OpenAPI document (`service.openapi`), /docs and
the metrics labels all read the same table, so they cannot disagree.

Templates are Starlette's (`starlette.routing.compile_path`), but they are
matched against the *raw*, still percent-encoded path: a router that matches
the decoded path would send `%2F` in an environment id, or `%0A` in a path, to
a 404 or to another route, where the contract wants 400 invalid_path however
the name is encoded. Each path parameter is therefore captured raw and decoded
and validated by its own `Param.decode`. Every template prefix that ends in a
parameter is also a guard: `/v1/environments/{bad}/anything` is refused as an
invalid environment before it is refused as an unknown route.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel
from starlette.convertors import CONVERTOR_TYPES, Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path

from catalog.errors import InvalidPathError

if TYPE_CHECKING:
    from service.app import CallRecord, ServiceApp

B = TypeVar("B", bound="BaseModel | None")


class SegmentConvertor(Convertor[str]):
    """One path segment, possibly empty (so that an empty id is refused by its own check)."""

    regex = "[^/]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


if "segment" not in CONVERTOR_TYPES:
    register_url_convertor("segment", SegmentConvertor())


@dataclass(frozen=True)
class Param:
    """A path, query or header parameter: how it is documented and, in a path, decoded.

    `decode` turns the raw (percent-encoded, latin-1 decoded) capture into the
    value handlers see, or raises the error the contract wants for it.
    `convertor` is the Starlette convertor that captures it: `segment` (one
    segment, possibly empty) or `path` (the rest of the path, `/` included).
    """

    name: str
    where: Literal["path", "query", "header"]
    description: str
    schema: dict[str, Any]
    decode: Callable[[str], str] | None = None
    convertor: str = "segment"
    required: bool = False
    error: str | None = None  # the error code an invalid value gets, for the document


@dataclass(frozen=True)
class Answer:
    """A success answer: status, description, and the body's JSON type or media types."""

    status: int
    description: str
    json: Any = None  # a TypedDict or model: the body's JSON schema comes from it
    media: tuple[str, ...] = ()  # non-JSON bodies
    headers: tuple[str, ...] = ()  # names from service.openapi.RESPONSE_HEADERS


@dataclass
class Ctx(Generic[B]):
    """What a handler gets: the app, the request, decoded parameters and the parsed body."""

    app: ServiceApp
    request: Request
    params: dict[str, str]
    body: B
    call: CallRecord

    @property
    def method(self) -> str:
        return self.request.method


@dataclass(frozen=True)
class Endpoint(Generic[B]):
    """One route: a row of the table.

    `methods` that include GET also answer HEAD (as Starlette routes do): the
    handler sees `ctx.method`. `auth`: needs a bearer token (else open, like
    /healthz). `body`: a pydantic model the JSON request body is validated
    into (`ctx.body`), or None, of at most `body_max` bytes; `raw_body`
    documents a streamed byte body.
    `errors`: the error codes the handler itself may answer with; those that
    follow from the declaration (invalid parameters, tokens, JSON bodies, the
    database) are added by the document generator.
    """

    methods: tuple[str, ...]
    template: str
    handler: Callable[[Ctx[B]], Awaitable[Response]]
    summary: str
    answers: tuple[Answer, ...]
    errors: tuple[str, ...] = ()
    auth: bool = True
    body: type[B] | None = None
    body_max: int = 64 * 1024  # bytes of a JSON body (413 too_large beyond)
    raw_body: str | None = None  # description of a streamed request body
    query: tuple[Param, ...] = ()
    headers: tuple[Param, ...] = ()
    database: bool = True  # touches MongoDB: may answer 503 unavailable
    description: str = ""
    tag: str = "resources"
    name: str = ""
    # derived
    path_format: str = field(init=False)
    regex: re.Pattern[str] = field(init=False)
    path_params: tuple[Param, ...] = field(init=False)

    def __post_init__(self) -> None:
        methods = tuple(m.upper() for m in self.methods)
        if "GET" in methods and "HEAD" not in methods:
            methods += ("HEAD",)
        object.__setattr__(self, "methods", methods)
        names = re.findall(r"{([A-Za-z_][A-Za-z0-9_]*)}", self.template)
        unknown = [name for name in names if name not in PATH_PARAMS]
        if unknown:
            raise ValueError(f"{self.template}: declare a path Param for {unknown}")
        params = tuple(PATH_PARAMS[name] for name in names)
        typed = self.template
        for param in params:
            typed = typed.replace(f"{{{param.name}}}", f"{{{param.name}:{param.convertor}}}")
        regex, path_format, _ = compile_path(typed)
        object.__setattr__(self, "regex", regex)
        object.__setattr__(self, "path_format", path_format)
        object.__setattr__(self, "path_params", params)
        if not self.name:
            object.__setattr__(self, "name", self.handler.__name__)


PATH_PARAMS: dict[str, Param] = {}
"""Path parameters by name (`service.schemas` declares them with `path_param`)."""


def path_param(param: Param) -> Param:
    PATH_PARAMS[param.name] = param
    return param


@dataclass(frozen=True)
class Guard:
    """A template prefix ending in a parameter: its parameters are checked before routing."""

    regex: re.Pattern[str]
    params: tuple[Param, ...]


@dataclass(frozen=True)
class Match:
    """What the raw path selected: the endpoints of one template, and their parameters."""

    endpoints: tuple[Endpoint[Any], ...]
    raw_params: dict[str, str]

    @property
    def path_format(self) -> str:
        return self.endpoints[0].path_format

    @property
    def auth(self) -> bool:
        return any(e.auth for e in self.endpoints)

    def endpoint(self, method: str) -> Endpoint[Any] | None:
        for endpoint in self.endpoints:
            if method in endpoint.methods:
                return endpoint
        return None

    def allowed(self) -> list[str]:
        return [m for e in self.endpoints for m in e.methods]


class Router:
    """Matches raw request paths against the table (in table order)."""

    def __init__(self, endpoints: Sequence[Endpoint[Any]]) -> None:
        self.endpoints = tuple(endpoints)
        by_template: dict[str, list[Endpoint[Any]]] = {}
        for endpoint in self.endpoints:
            by_template.setdefault(endpoint.path_format, []).append(endpoint)
        for group in by_template.values():
            seen: set[str] = set()
            for endpoint in group:
                clash = seen.intersection(endpoint.methods)
                if clash:
                    raise ValueError(f"{endpoint.path_format}: {sorted(clash)} declared twice")
                seen.update(endpoint.methods)
        self._groups = [(group[0].regex, tuple(group)) for group in by_template.values()]
        self._auth_roots = {_root(e.path_format) for e in self.endpoints if e.auth}
        self._guards = _guards(self.endpoints)

    def match(self, raw_path: str) -> Match | None:
        for regex, group in self._groups:
            found = regex.match(raw_path)
            if found:
                return Match(group, found.groupdict())
        return None

    def needs_auth(self, raw_path: str, match: Match | None, method: str) -> bool:
        """A route that needs a token, or any path under a root whose routes do (/v1/...).

        An unknown route or method there is 401 without a token, so that what
        exists is not told to those who may not use it.
        """
        if match is None:
            return _root(raw_path) in self._auth_roots
        endpoint = match.endpoint(method)
        return endpoint.auth if endpoint is not None else match.auth

    def guarded(self, raw_path: str) -> dict[str, str]:
        """Decode (and so validate) the parameters of every guard prefix the path starts with."""
        values: dict[str, str] = {}
        for guard in self._guards:
            found = guard.regex.match(raw_path)
            if not found:
                continue
            for param in guard.params:
                if param.name not in values and param.decode is not None:
                    values[param.name] = param.decode(found.group(param.name))
        return values


def decode_params(match: Match, known: dict[str, str]) -> dict[str, str]:
    """Every path parameter of the matched template, decoded and validated."""
    params = dict(known)
    for param in match.endpoints[0].path_params:
        if param.name not in params:
            raw = match.raw_params[param.name]
            params[param.name] = param.decode(raw) if param.decode is not None else raw
    return params


def _root(path: str) -> str:
    """The first segment: `v1` of `/v1/environments/...`."""
    return path[1:].split("/", 1)[0] if path.startswith("/") else path


def _guards(endpoints: Sequence[Endpoint[Any]]) -> list[Guard]:
    guards: dict[str, Guard] = {}
    for endpoint in endpoints:
        parts = endpoint.path_format.split("/")
        for i, part in enumerate(parts):
            if not (part.startswith("{") and part.endswith("}")):
                continue
            prefix = "/".join(parts[: i + 1])
            if prefix in guards or PATH_PARAMS[part[1:-1]].convertor != "segment":
                continue
            pattern = "^"
            params: list[Param] = []
            for piece in parts[1 : i + 1]:
                if piece.startswith("{") and piece.endswith("}"):
                    params.append(PATH_PARAMS[piece[1:-1]])
                    pattern += f"/(?P<{piece[1:-1]}>[^/]*)"
                else:
                    pattern += "/" + re.escape(piece)
            guards[prefix] = Guard(re.compile(pattern + "(?:/|$)"), tuple(params))
    return list(guards.values())


def query_params(request: Request) -> dict[str, str]:
    """The query string as a dict; a query that is not UTF-8 is an invalid name (400)."""
    raw: bytes = request.scope.get("query_string", b"")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise InvalidPathError("the query string is not valid UTF-8") from None
    return dict(pairs)
