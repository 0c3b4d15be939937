"""Single byte ranges, entity-tag and date conditions (RFC 9110, the subset we serve).

Only one range per request is served: `bytes=a-b`, `bytes=a-`, `bytes=-n`.
A multi-range or malformed Range header is ignored (the full content is sent),
as RFC 9110 allows; a well-formed but unsatisfiable one gives 416. A date
condition that is not an HTTP-date is ignored, as §13.1.3 and §13.1.4 say.
"""

from __future__ import annotations

import datetime
import email.utils
import re

_RANGE_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


class Unsatisfiable(Exception):
    """The range lies wholly outside the content."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end_inclusive) for a single-range header, None for the whole content.

    Raises Unsatisfiable when the range cannot be served for `size` bytes.
    """
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header)
    if match is None:
        return None  # multi-range or not a byte range: ignore it
    first, last = _number(match.group(1)), _number(match.group(2))
    if first is None and last is None:
        return None
    if first is None:  # suffix: the last n bytes
        assert last is not None
        if last == 0 or size == 0:
            raise Unsatisfiable()
        return max(0, size - last), size - 1
    if last is not None and last < first:
        return None  # invalid: ignore the header
    if first >= size:
        raise Unsatisfiable()
    end = size - 1 if last is None else min(last, size - 1)
    return first, end


_HUGE = 1 << 80


def _number(digits: str) -> int | None:
    if not digits:
        return None
    return _HUGE if len(digits) > 24 else int(digits)


def http_date(seconds: int) -> str:
    """An IMF-fixdate (`Mon, 30 Nov 2026 16:24:36 GMT`) of a POSIX time."""
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return email.utils.format_datetime(when, usegmt=True)


def parse_http_date(value: str | None) -> int | None:
    """The POSIX time of an HTTP-date, or None when absent or not a date."""
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return int(when.timestamp())


def etag_for(hex_digest: str) -> str:
    return f'"blake3:{hex_digest}"'


def tag_list(header: str) -> list[str]:
    """The elements of an If-Match / If-None-Match list; a quoted tag may hold commas."""
    out: list[str] = []
    i, n = 0, len(header)
    while i < n:
        while i < n and header[i] in " \t,":
            i += 1
        if i >= n:
            break
        opening = i + 2 if header.startswith('W/"', i) else i if header[i] == '"' else -1
        closing = header.find('"', opening + 1) if opening >= 0 else -1
        if closing >= 0:
            end = closing + 1
        else:
            comma = header.find(",", i)
            end = n if comma < 0 else comma
        out.append(header[i:end].strip())
        i = end
    return out


def if_range_holds(header: str | None, etag: str) -> bool:
    """If-Range: serve the range only when the tag still matches (dates: never)."""
    if header is None:
        return True
    return header.strip() == etag
