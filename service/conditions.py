"""Conditional writes and stored media types: what a request's headers ask of a write.

`If-Match` and `If-None-Match` become `WriteOptions` (or the `if_match` of a
delete) that the core checks in the same atomic step as the write, so that of
concurrent writers with the same condition exactly one wins. A condition the
core cannot state directly is narrowed to one it can, from one read: a list
of ETags becomes the one that is current, `If-None-Match: <etags>` on an
existing path becomes "still at the revision just read". Narrowing only ever
makes a condition stricter (a concurrent change in between fails it), never
looser.

An entity tag is the content's `"blake3:<hex>"` or the path's revision
`"<n>"` (the KV face's CAS); `*` is any. Weak tags never match a write
(strong comparison).
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from catalog.clock import aware
from catalog.errors import BadRequestError, NotFoundError, PreconditionFailedError
from catalog.managed import PathInfo
from service.ranges import parse_http_date, tag_list

_HEX_RE = re.compile(r"[0-9a-fA-F]{64}")
_MEDIA_RE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
    r"(?:\s*;\s*[A-Za-z0-9!#$&^_.+-]+=(?:[A-Za-z0-9!#$&^_.+-]+|\"[^\"\\]*\"))*"
)
MAX_MEDIA_TYPE = 255
# Types a client sends when it says nothing about the content: the name says more.
GENERIC_TYPES = frozenset(
    {"application/octet-stream", "application/x-www-form-urlencoded", "binary/octet-stream"}
)

Stat = Callable[[], Awaitable[PathInfo | None]]


@dataclass(frozen=True)
class Condition:
    """A write's condition as the core takes it."""

    if_match: int | str | None = None
    if_none_match: bool = False

    @property
    def any(self) -> bool:
        return self.if_match is not None or self.if_none_match


def parse_tag(tag: str) -> int | str | None:
    """A revision (int), a content hash (bare hex) or `*`; None for a tag that never matches.

    BadRequestError for a malformed one (RFC 9110 §8.8.3: a tag is quoted, maybe
    `W/`-prefixed; a bare revision or `blake3:<hex>` is taken too), so that a
    typo is not silently a condition that never matches (or always does).
    """
    tag = tag.strip()
    if tag == "*":
        return "*"
    quoted = _quoted(tag)
    if tag.startswith("W/"):
        if not _quoted(tag[2:]):
            raise BadRequestError(f"malformed entity tag {tag!r}")
        return None  # weak: never equal under strong comparison
    if quoted:
        tag = tag[1:-1]
    if tag.isascii() and tag.isdigit() and len(tag) <= 19 and int(tag) < 2**63:
        return int(tag)  # revisions are 64-bit (cluster times on a replica set)
    if tag[:7].lower() == "blake3:" and _HEX_RE.fullmatch(tag[7:]):
        return tag[7:].lower()
    if not quoted:
        raise BadRequestError(f"malformed entity tag {tag!r}: an entity tag is quoted")
    return None


def _quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] == '"' and text[-1] == '"' and '"' not in text[1:-1]


def check_tags(name: str, header: str | None) -> None:
    """BadRequestError unless an If-Match / If-None-Match value is a list of entity tags."""
    if header is None:
        return
    tags = tag_list(header)
    if not tags:
        raise BadRequestError(f"{name} is empty: give entity tags or *")
    for tag in tags:
        parse_tag(tag)


def holds(info: PathInfo, tag: int | str) -> bool:
    if tag == "*":
        return True
    if isinstance(tag, int):
        return info.revision == tag
    return info.hash == tag


def none_match_holds(info: PathInfo, header: str | None) -> bool:
    """Does a GET's If-None-Match match what the path holds (weak comparison): 304.

    Any tag a write's condition takes matches here too: the ETag, a revision,
    a bare or `blake3:` hash, `*`; a weak `W/` tag as its opaque part.
    """
    if header is None:
        return False
    for raw in tag_list(header):
        raw = raw.strip()
        tag = parse_tag(raw[2:] if raw.startswith("W/") else raw)
        if tag is not None and holds(info, tag):
            return True
    return False


async def write_condition(
    if_match: str | None,
    if_none_match: str | None,
    stat: Stat,
    if_unmodified_since: str | None = None,
) -> Condition:
    """The condition of a PUT or DELETE, narrowed to what the core checks atomically.

    `stat` reads the path (None when it does not exist); it is called only when
    the headers need narrowing. A condition that cannot hold whatever the path
    holds raises PreconditionFailedError at once. If-Unmodified-Since (only
    without If-Match, RFC 9110 13.2.2) is checked against the path read and
    narrowed to its revision, so a change between that read and the write
    fails the write too; a path that does not exist has no date and ignores it.
    """
    check_tags("If-Match", if_match)
    check_tags("If-None-Match", if_none_match)
    match: int | str | None = None
    none_match = False
    if if_match is not None:
        tags = [parse_tag(t) for t in tag_list(if_match)]
        wanted = [t for t in tags if t is not None]
        if not wanted:
            raise PreconditionFailedError("If-Match names no entity tag that can match")
        if "*" in wanted:
            match = "*"
        elif len(wanted) == 1:
            match = wanted[0]
        else:
            info = await stat()
            held = [t for t in wanted if info is not None and holds(info, t)]
            if not held:
                raise PreconditionFailedError("If-Match does not match the current content")
            match = held[0]
    if if_none_match is not None:
        tags_text = tag_list(if_none_match)
        if "*" in tags_text:
            none_match = True
        elif tags_text:
            tags = [parse_tag(t[2:] if t.startswith("W/") else t) for t in tags_text]
            info = await stat()
            if info is not None:
                if any(t is not None and holds(info, t) for t in tags):
                    raise PreconditionFailedError("If-None-Match matches the current content")
                if match is None:
                    match = info.revision  # unchanged since it was read
            else:
                none_match = True  # still absent when written
    since = parse_http_date(if_unmodified_since) if if_match is None else None
    if since is not None:
        info = await stat()
        if info is not None:
            if int(aware(info.updated_at).timestamp()) > since:
                raise PreconditionFailedError("the content was modified since If-Unmodified-Since")
            if match is None:
                match = info.revision  # unchanged since it was read
    return Condition(match, none_match)


def stat_or_none(fetch: Callable[[], Awaitable[PathInfo]]) -> Stat:
    async def stat() -> PathInfo | None:
        try:
            return await fetch()
        except NotFoundError:
            return None

    return stat


def content_type(given: str | None, path: str) -> str | None:
    """The media type to store with a put: the request's, unless it says nothing, else a guess.

    A Content-Type that is missing, generic (`application/octet-stream`, or what
    curl sends for `--data`) or malformed gives way to a guess from the path's
    last segment (`mimetypes`); None when neither says anything.
    """
    if given is not None:
        text = given.strip()
        if (
            len(text) <= MAX_MEDIA_TYPE
            and text.isascii()
            and _MEDIA_RE.fullmatch(text)
            and text.split(";", 1)[0].strip().lower() not in GENERIC_TYPES
        ):
            return text
    return guess_type(path)


def guess_type(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1]
    if "." not in name.lstrip("."):
        return None
    try:
        guessed, _ = mimetypes.guess_type("name" + name[name.rindex(".") :], strict=False)
    except (ValueError, UnicodeError):
        return None
    if guessed is None or not _MEDIA_RE.fullmatch(guessed):
        return None
    return guessed


def revision_header(info: PathInfo) -> dict[str, str]:
    return {"x-revision": str(info.revision)}


__all__ = [
    "Condition",
    "check_tags",
    "content_type",
    "guess_type",
    "holds",
    "none_match_holds",
    "parse_tag",
    "revision_header",
    "stat_or_none",
    "write_condition",
]
