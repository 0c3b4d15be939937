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


ENV_RULE = "1-128 characters of A-Z a-z 0-9 . _ - (not '.' or '..')"
PATH_RULE = (
    "1-1024 bytes of UTF-8, '/'-separated, relative (no leading '/'), "
    "no empty, '.' or '..' segment, no control characters"
)


def _bad_character(text: str) -> str | None:
    """Why `text` holds a character no name may hold, or None.

    A byte that is not UTF-8 reaches Python from argv or a file name as a lone
    surrogate (U+DC80-U+DCFF, PEP 383): it is reported as the byte it was, not
    as a control character, so the user knows to look at the encoding.
    """
    for index, ch in enumerate(text):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            return f"not valid UTF-8 (byte 0x{o - 0xDC00:02x} at position {index})"
        if 0xD800 <= o <= 0xDFFF:
            return f"not valid UTF-8 (lone surrogate U+{o:04X} at position {index})"
        if _is_control(ch):
            return f"no control characters allowed (U+{o:04X} at position {index})"
    return None


def check_env(env_uuid: object) -> str:
    """Return `env_uuid` if it is a valid environment id, else raise InvalidPathError."""
    if not isinstance(env_uuid, str) or not _ENV_RE.fullmatch(env_uuid) or env_uuid in (".", ".."):
        raise InvalidPathError(f"invalid environment id {env_uuid!r}: use {ENV_RULE}")
    return env_uuid


def check_path(path: object) -> str:
    """Return `path` if it is a valid resource path, else raise InvalidPathError.

    The message names the rule that was broken, so the user can fix the name
    without reading the documentation.
    """
    if not isinstance(path, str) or not path:
        raise InvalidPathError(f"invalid path {path!r}: a path is {PATH_RULE}")
    bad = _bad_character(path)
    if bad is not None:
        raise InvalidPathError(f"invalid path {path!r}: {bad}")
    size = len(path.encode("utf-8"))
    if size > MAX_PATH_BYTES:
        raise InvalidPathError(
            f"invalid path: {size} bytes of UTF-8, longer than {MAX_PATH_BYTES} bytes"
        )
    if path.startswith("/"):
        raise InvalidPathError(
            f"invalid path {path!r}: paths are relative, no leading '/'"
            + (f" (write {path.lstrip('/')!r})" if path.strip("/") else "")
        )
    for segment in path.split("/"):
        if segment == "":
            raise InvalidPathError(
                f"invalid path {path!r}: no empty segment allowed ('//' or a trailing '/')"
            )
        if segment in (".", ".."):
            raise InvalidPathError(f"invalid path {path!r}: no '.' or '..' segment allowed")
    return path


def check_prefix(prefix: object) -> str:
    """A list prefix is a plain string prefix: any valid path start, or ''."""
    if prefix == "":
        return ""
    if not isinstance(prefix, str):
        raise InvalidPathError(f"invalid prefix: {prefix!r}")
    bad = _bad_character(prefix)
    if bad is not None:
        raise InvalidPathError(f"invalid prefix {prefix!r}: {bad}")
    if len(prefix.encode("utf-8")) > MAX_PATH_BYTES:
        raise InvalidPathError(f"invalid prefix: longer than {MAX_PATH_BYTES} bytes")
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
