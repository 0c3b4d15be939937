"""Proof of access: the server asks for BLAKE3 of random byte ranges.

Ranges come from a CSPRNG and are spread over the content (one per equal
segment), so a client that holds only part of the content misses some of them;
content under 4 KiB is asked for whole.
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass
from typing import BinaryIO

import blake3

MIN_SPREAD_LENGTH = 4096
MIN_RANGES = 8
MAX_RANGES = 16
MIN_RANGE = 512
MAX_RANGE = 64 * 1024


@dataclass(frozen=True)
class RequestResponse:
    """The server's challenge: answer with BLAKE3 of these ranges, concatenated."""

    request_id: str
    ranges: list[tuple[int, int]]
    expires_at: datetime.datetime


@dataclass(frozen=True)
class PutResponse:
    """The client's answer to a RequestResponse."""

    request_id: str
    checksum: str


def new_put_response(request_id: str, checksum: str) -> PutResponse:
    return PutResponse(request_id=request_id, checksum=checksum)


def choose_ranges(length: int) -> list[tuple[int, int]]:
    """(start, length) ranges for content of `length` bytes."""
    if length <= 0:
        return []
    if length < MIN_SPREAD_LENGTH:
        return [(0, length)]
    count = MIN_RANGES + secrets.randbelow(MAX_RANGES - MIN_RANGES + 1)
    count = min(count, length // MIN_RANGE)
    ranges: list[tuple[int, int]] = []
    for i in range(count):
        seg_start = length * i // count
        seg_end = length * (i + 1) // count
        seg_len = seg_end - seg_start
        size = MIN_RANGE + secrets.randbelow(min(MAX_RANGE, seg_len) - MIN_RANGE + 1)
        start = seg_start + secrets.randbelow(seg_len - size + 1)
        ranges.append((start, size))
    return ranges


def ranges_checksum(reader: BinaryIO, ranges: list[tuple[int, int]]) -> str:
    """BLAKE3 hex of the bytes of every range, in the order given."""
    hasher = blake3.blake3()
    for start, size in ranges:
        reader.seek(start)
        left = size
        while left > 0:
            data = reader.read(min(left, 1024 * 1024))
            if not data:
                raise EOFError(f"content ends before range ({start}, {size})")
            hasher.update(data)
            left -= len(data)
    return hasher.hexdigest()
