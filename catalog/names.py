"""Validation of what users name: environments, paths and content hashes.

Every public operation validates its inputs through these functions before it
touches the database, so a bad name can never reach a query or half a write.
"""

from __future__ import annotations

import re

from catalog.errors import BadRequestError, InvalidPathError

_ENV_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
_HEX_RE = re.compile(r"[0-9a-f]{64}")
MAX_PATH_BYTES = 1024
HASH_PREFIX = "blake3:"


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or o == 0x7F or 0x80 <= o < 0xA0 or 0xD800 <= o <= 0xDFFF


def check_env(env_uuid: object) -> str:
    """Return `env_uuid` if it is a valid environment id, else raise InvalidPathError."""
    if not isinstance(env_uuid, str) or not _ENV_RE.fullmatch(env_uuid):
        raise InvalidPathError(f"invalid environment id: {env_uuid!r}")
    if env_uuid in (".", ".."):
        raise InvalidPathError(f"invalid environment id: {env_uuid!r}")
    return env_uuid


def check_path(path: object) -> str:
    """Return `path` if it is a valid resource path, else raise InvalidPathError."""
    if not isinstance(path, str) or not path:
        raise InvalidPathError(f"invalid path: {path!r}")
    if any(_is_control(ch) for ch in path):
        raise InvalidPathError(f"invalid path (control character): {path!r}")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError as exc:  # pragma: no cover - surrogates caught above
        raise InvalidPathError(f"invalid path: {path!r}") from exc
    if size > MAX_PATH_BYTES:
        raise InvalidPathError(f"invalid path: longer than {MAX_PATH_BYTES} bytes")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidPathError(f"invalid path (empty, '.' or '..' segment): {path!r}")
    return path


def check_prefix(prefix: object) -> str:
    """A list prefix is a plain string prefix: any valid path start, or ''."""
    if prefix == "":
        return ""
    if not isinstance(prefix, str) or any(_is_control(ch) for ch in prefix):
        raise InvalidPathError(f"invalid prefix: {prefix!r}")
    if len(prefix.encode("utf-8")) > MAX_PATH_BYTES:
        raise InvalidPathError("invalid prefix: too long")
    return prefix


def parse_hash(value: object) -> str:
    """Accept bare hex or `blake3:<hex>` (any case); return bare lowercase hex."""
    if not isinstance(value, str):
        raise BadRequestError(f"invalid hash: {value!r}")
    text = value.strip()
    if text[: len(HASH_PREFIX)].lower() == HASH_PREFIX:
        text = text[len(HASH_PREFIX) :]
    text = text.lower()
    if not _HEX_RE.fullmatch(text):
        raise BadRequestError(f"invalid hash: {value!r} (want blake3:<64 hex digits>)")
    return text


def format_hash(hex_digest: str) -> str:
    """The printed form of a hash: `blake3:<hex>`."""
    return HASH_PREFIX + hex_digest
