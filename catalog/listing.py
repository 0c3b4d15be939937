"""Listing an environment like an object store: pages, a continuation key, folders.

A page is a range scan of the (env, path) index that starts after the last key
of the previous page (keyset pagination: never skip/offset, so page 1,000 of a
million paths costs what page 1 does, and a path is listed at most once even
while others are added or removed). `delimiter` folds every path that has it
after the prefix into one folder key, `prefix + up to and including the
delimiter`, as S3's CommonPrefixes do; a folder counts as one key of the page
and its paths are skipped, by a new index seek when there are many of them.

A page's `next` is its last key (a path or a folder); passed back as `after`
it continues the listing. It is absent when nothing remains.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from catalog.errors import InvalidArgumentError, InvalidPathError
from catalog.names import check_env, check_prefix

if TYPE_CHECKING:
    from catalog.managed import ManagedStorage

MAX_LIMIT = 10_000
DEFAULT_LIMIT = 1_000
# Paths of one folder skipped in process before the scan seeks past the folder instead.
SEEK_AFTER = 64
# Sorts after every path that starts with a folder key: a path has at most
# 1,024 UTF-8 bytes, so at most 256 of U+10FFFF; the rare path that still sorts
# above it is skipped in process.
_TOP = "\U0010ffff"


@dataclass
class Page:
    """One page: path documents and folder keys, both in path order, and the next key."""

    items: list[dict[str, Any]] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    next: str | None = None


def check_delimiter(delimiter: str | None) -> str | None:
    """'' and None: no folders; else one character, not a control character."""
    if not delimiter:
        return None
    if len(delimiter) != 1:
        raise InvalidArgumentError(f"invalid delimiter {delimiter!r}: one character, such as /")
    try:
        return check_prefix(delimiter)
    except InvalidPathError:
        raise InvalidArgumentError(
            f"invalid delimiter {delimiter!r}: a control character; use one such as /"
        ) from None


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidArgumentError(f"invalid limit {limit}: from 1 to {MAX_LIMIT}")
    return limit


def list_page(
    managed: ManagedStorage,
    env: str,
    prefix: str = "",
    *,
    after: str = "",
    limit: int | None = DEFAULT_LIMIT,
    delimiter: str | None = None,
) -> Page:
    """The first `limit` keys (None: all) after `after` of the paths starting with `prefix`."""
    check_env(env)
    check_prefix(prefix)
    check_prefix(after)  # any string is a position; only its characters are checked
    if limit is not None:
        check_limit(limit)
    delimiter = check_delimiter(delimiter)
    page = Page()
    keys = _keys(managed, env, prefix, after, delimiter, limit)
    for key in keys:
        if limit is not None and len(page.items) + len(page.prefixes) == limit:
            page.next = _last(page)
            break
        if isinstance(key, str):
            page.prefixes.append(key)
        else:
            page.items.append(key)
    keys.close()
    return page


def iter_listing(
    managed: ManagedStorage, env: str, prefix: str = "", *, delimiter: str | None = None
) -> Iterator[dict[str, Any] | str]:
    """Every key in order: path documents, and folder keys (str) with a delimiter."""
    check_env(env)
    check_prefix(prefix)
    yield from _keys(managed, env, prefix, "", check_delimiter(delimiter), None)


def _keys(
    managed: ManagedStorage,
    env: str,
    prefix: str,
    after: str,
    delimiter: str | None,
    limit: int | None,
) -> Generator[dict[str, Any] | str, None, None]:
    folder = _folder(after, prefix, delimiter) if after.startswith(prefix) else None
    start = max(after, folder + _TOP) if folder is not None else after
    while True:
        cursor = managed.iter_paths(env, prefix, after=start)
        if delimiter is None and limit is not None:
            cursor = cursor.limit(limit + 1)  # one more tells whether a next page exists
        elif limit is not None:
            cursor = cursor.batch_size(min(limit + 1, DEFAULT_LIMIT))
        skipped = 0
        seek = None
        try:
            for doc in cursor:
                path = str(doc["path"])
                key = _folder(path, prefix, delimiter)
                if key is None:
                    yield doc
                    continue
                if key == folder:
                    skipped += 1
                    if skipped > SEEK_AFTER:
                        seek = key + _TOP
                        break
                    continue
                folder, skipped = key, 0
                yield key
        finally:
            cursor.close()
        if seek is None:
            return
        start = seek


def _folder(path: str, prefix: str, delimiter: str | None) -> str | None:
    if delimiter is None:
        return None
    cut = path.find(delimiter, len(prefix))
    return path[: cut + 1] if cut >= 0 else None


def _last(page: Page) -> str:
    last_item = str(page.items[-1]["path"]) if page.items else ""
    last_prefix = page.prefixes[-1] if page.prefixes else ""
    return max(last_item, last_prefix)


__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "Page",
    "check_delimiter",
    "check_limit",
    "iter_listing",
    "list_page",
]
