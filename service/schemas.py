"""The contract's names as JSON Schema, the service's parameters, and its JSON bodies.

`catalog.names` is the authority on what a valid environment id, path, prefix
or hash is; the schemas here state the same rules for the OpenAPI document.
A *request* schema is never wider than what the checks accept (a request the
document calls valid is never refused as invalid); a *response* schema is
never narrower than what the service sends. Where JSON Schema cannot say a
rule exactly (paths are limited in UTF-8 bytes, JSON Schema counts
characters), a request schema admits a subset: ASCII paths up to 1024
characters, any other path up to 256 characters (256 x 4 bytes at most).
`tests/test_service_schemas.py` checks the patterns against `catalog.names`.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

from pydantic import BaseModel, ConfigDict, WithJsonSchema
from typing_extensions import TypedDict

from catalog.errors import InvalidPathError, NotFoundError
from catalog.names import MAX_PATH_BYTES, check_env, check_path, check_prefix
from service.routing import Param, path_param

# Characters no name may contain: C0 controls, DEL, C1 controls. (Lone surrogates
# are refused too; they cannot be written in UTF-8, so no pattern needs to say so.)
_CTRL = r"\x00-\x1f\x7f-\x9f"


def _names(char: str, not_dot: str) -> str:
    """Non-empty names of `char`s that are not `.` or `..` (as a path segment must be)."""
    return rf"(?:{not_dot}{char}*|\.{not_dot}{char}*|\.\.{char}+)"


_SEG_ANY = _names(rf"[^/{_CTRL}]", rf"[^./{_CTRL}]")
_SEG_ASCII = _names(r"[\x20-\x2e\x30-\x7e]", r"[\x20-\x2d\x30-\x7e]")  # printable, no "/"
ENV_PATTERN = "^" + _names("[A-Za-z0-9._-]", "[A-Za-z0-9_-]") + "$"
PATH_PATTERN = rf"^{_SEG_ANY}(?:/{_SEG_ANY})*$"
PATH_ASCII_PATTERN = rf"^{_SEG_ASCII}(?:/{_SEG_ASCII})*$"
PREFIX_PATTERN = rf"^[^{_CTRL}]*$"
PREFIX_ASCII_PATTERN = r"^[\x20-\x7e]*$"
HASH_PATTERN = r"^(?:[Bb][Ll][Aa][Kk][Ee]3:)?[0-9A-Fa-f]{64}$"
HEX_PATTERN = r"^[0-9a-f]{64}$"
_SHORT = MAX_PATH_BYTES // 4  # characters that fit in MAX_PATH_BYTES whatever they are

ENV_RULE = "1-128 characters of `[A-Za-z0-9._-]`, not `.` or `..`"
PATH_RULE = (
    f"1-{MAX_PATH_BYTES} bytes of UTF-8, `/`-separated, no leading or trailing `/`, no "
    "empty, `.` or `..` segment, no control characters (C0, DEL, C1) or lone surrogates"
)
PREFIX_RULE = (
    f"a plain string prefix of paths: 0-{MAX_PATH_BYTES} bytes of UTF-8, no control characters"
)
HASH_RULE = "BLAKE3-256 as 64 hex digits, bare or as `blake3:<hex>` (any case)"

ENV_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "pattern": ENV_PATTERN,
}
PATH_SCHEMA: dict[str, Any] = {
    "type": "string",
    "anyOf": [
        {"minLength": 1, "maxLength": MAX_PATH_BYTES, "pattern": PATH_ASCII_PATTERN},
        {"minLength": 1, "maxLength": _SHORT, "pattern": PATH_PATTERN},
    ],
}
PREFIX_SCHEMA: dict[str, Any] = {
    "type": "string",
    "anyOf": [
        {"maxLength": MAX_PATH_BYTES, "pattern": PREFIX_ASCII_PATTERN},
        {"maxLength": _SHORT, "pattern": PREFIX_PATTERN},
    ],
}
HASH_SCHEMA: dict[str, Any] = {"type": "string", "pattern": HASH_PATTERN}
# What the service sends: every stored path, and hashes as bare lowercase hex.
PATH_OUT_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_PATH_BYTES,
    "pattern": PATH_PATTERN,
}
HEX_SCHEMA: dict[str, Any] = {"type": "string", "pattern": HEX_PATTERN}


# -- raw path parameter decoding ---------------------------------------------------------
def _segment(raw: str) -> str:
    """One raw path segment, percent-decoded and UTF-8 checked."""
    if "%" not in raw and raw.isascii():  # nothing to decode (most names)
        return raw
    try:
        return unquote_to_bytes(raw.encode("latin-1")).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPathError("a path segment is not valid UTF-8") from None


def decode_env(raw: str) -> str:
    return check_env(_segment(raw))


def decode_path(raw: str) -> str:
    """Each segment is decoded on its own: `%2F` is a `/` like any other, `%2e%2e` is `..`."""
    return check_path("/".join(_segment(part) for part in raw.split("/")))


def decode_lenient(raw: str) -> str:
    """An opaque id: a malformed one is simply unknown (the core answers for it)."""
    try:
        return _segment(raw)
    except InvalidPathError:
        return ""


def decode_prefix(value: str) -> str:
    return check_prefix(value)


# -- parameters --------------------------------------------------------------------------
ENV = path_param(
    Param(
        "env",
        "path",
        f"Environment id: {ENV_RULE}.",
        ENV_SCHEMA,
        decode=decode_env,
        required=True,
        error="invalid_path",
    )
)
PATH = path_param(
    Param(
        "path",
        "path",
        f"Resource path: {PATH_RULE}. Each segment is percent-decoded on its own, so "
        "`%2F` is a separator like `/`.",
        PATH_SCHEMA,
        decode=decode_path,
        convertor="path",
        required=True,
        error="invalid_path",
    )
)
REQUEST_ID = path_param(
    Param(
        "request_id",
        "path",
        "The id of a put request; an unknown or malformed one is `request_expired` (410).",
        {"type": "string", "minLength": 1},
        decode=decode_lenient,
        required=True,
    )
)
PREFIX = Param(
    "prefix",
    "query",
    f"List only paths that start with this string: {PREFIX_RULE}.",
    PREFIX_SCHEMA,
    error="invalid_path",
)
X_CONTENT_HASH = Param(
    "X-Content-Hash",
    "header",
    f"The content's hash ({HASH_RULE}): 422 hash_mismatch and nothing stored if the "
    "body hashes to something else; a malformed value is 400 bad_request.",
    HASH_SCHEMA,
    error="bad_request",
)
RANGE = Param(
    "Range",
    "header",
    "One byte range: `bytes=a-b`, `bytes=a-` or `bytes=-n` (206; 416 when it lies "
    "outside the content). Several ranges or a malformed header: the whole content (200).",
    {"type": "string"},
)
IF_RANGE = Param(
    "If-Range",
    "header",
    "Serve the Range only if this is still the ETag (else the whole content).",
    {"type": "string"},
)
_TAG = r'(?:(?:W/)?"[^"]*"|[0-9]{1,19}|blake3:[0-9a-fA-F]{64})'
# RFC 9110 §8.8.3 (quoted, maybe weak), or a bare revision or blake3:<hex>; malformed: 400.
TAG_LIST_SCHEMA = {
    "type": "string",
    "pattern": rf"^\s*(?:\*|{_TAG}(?:\s*,\s*{_TAG})*)\s*$",
}
IF_MATCH = Param(
    "If-Match",
    "header",
    'Only if the current ETag (`"blake3:<hex>"`) or revision (`"<n>"`, as in X-Revision) '
    "is one of these, or `*` for any (412 otherwise).",
    TAG_LIST_SCHEMA,
    error="bad_request",
)
IF_NONE_MATCH_READ = Param(
    "If-None-Match",
    "header",
    "304 Not Modified when the current ETag is one of these (or `*`).",
    TAG_LIST_SCHEMA,
    error="bad_request",
)
IF_MODIFIED_SINCE = Param(
    "If-Modified-Since",
    "header",
    "An HTTP-date: 304 Not Modified unless the path changed after it (not looked at "
    "with If-None-Match; a value that is not a date is ignored).",
    {"type": "string"},
)
IF_UNMODIFIED_SINCE = Param(
    "If-Unmodified-Since",
    "header",
    "An HTTP-date: 412 if the path changed after it (not looked at with If-Match; a value "
    "that is not a date is ignored).",
    {"type": "string"},
)
IF_NONE_MATCH_WRITE = Param(
    "If-None-Match",
    "header",
    "`*`: only if the path does not exist and its first upload is not in progress; ETags: "
    "only if none is current (412 otherwise).",
    TAG_LIST_SCHEMA,
    error="bad_request",
)


def decode_asset(raw: str) -> str:
    name = decode_lenient(raw)
    if name not in DOCS_ASSETS:
        raise NotFoundError(f"no such asset: {name!r}")
    return name


# Files of the Swagger UI wheel that /docs uses, with their media types.
DOCS_ASSETS: dict[str, str] = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
ASSET = path_param(
    Param(
        "asset",
        "path",
        "A file of the Swagger UI bundle shipped with rescat.",
        {"type": "string", "enum": sorted(DOCS_ASSETS)},
        decode=decode_asset,
        required=True,
    )
)


# -- JSON bodies ---------------------------------------------------------------------------
class _Body(BaseModel):
    """Request bodies: fields are checked for type here, for meaning by catalog.names."""

    model_config = ConfigDict(strict=True, extra="ignore")


class PutRequestBody(_Body):
    """Ask for a new path to content the service already has."""

    path: Annotated[str, WithJsonSchema({**PATH_SCHEMA, "description": PATH_RULE})]
    hash: Annotated[str, WithJsonSchema({**HASH_SCHEMA, "description": HASH_RULE})]


class AnswerBody(_Body):
    """The answer to a challenge: BLAKE3 of the requested ranges' bytes, concatenated."""

    checksum: Annotated[str, WithJsonSchema({**HASH_SCHEMA, "description": "BLAKE3 hex"})]


_PathOut = Annotated[str, WithJsonSchema(PATH_OUT_SCHEMA)]
_HexOut = Annotated[str, WithJsonSchema({**HEX_SCHEMA, "description": "BLAKE3 hex"})]
_Length = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0})]


class ResourceOut(TypedDict):
    """What a path holds."""

    path: _PathOut
    hash: _HexOut
    length: _Length


class ListingOut(TypedDict):
    """Paths of an environment, sorted."""

    items: list[ResourceOut]


_Range = Annotated[
    list[int],
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0},
            "minItems": 2,
            "maxItems": 2,
            "description": "[start, length]",
        }
    ),
]


class ChallengeOut(TypedDict):
    """A proof-of-access challenge: answer with BLAKE3 of these ranges' bytes, in order."""

    request_id: str
    ranges: list[_Range]
    expires_at: Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


class HealthOut(TypedDict):
    """The service and its database answer."""

    status: str


__all__ = [
    "ASSET",
    "DOCS_ASSETS",
    "ENV",
    "ENV_SCHEMA",
    "HASH_SCHEMA",
    "PATH",
    "PATH_SCHEMA",
    "PREFIX",
    "PREFIX_SCHEMA",
    "REQUEST_ID",
    "AnswerBody",
    "ChallengeOut",
    "HealthOut",
    "ListingOut",
    "PutRequestBody",
    "ResourceOut",
    "decode_prefix",
]
