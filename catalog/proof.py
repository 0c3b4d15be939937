"""Proof of access: the server asks for BLAKE3 of random byte ranges.

Why this many ranges: each range starts at an independent, uniformly random
offset drawn from a CSPRNG, so a client holding a fraction f of the bytes, in
any layout, holds a given range wholly with probability at most about f (the
chance that its first byte is held). It answers a challenge of k ranges without
the missing bytes with probability at most f**k: with k = 192 and f = 0.9 that
is 1.7e-9 (4.4e-9 with the short tail that no range starts in). Challenges are
budgeted per environment and content (`ProofBudget`): at most 2 * 10 unanswered
or failed ones in any 24 hours, so a partial holder's chance per content per day
stays below 1e-7 however it asks. Content shorter than 192 ranges' worth is asked
for whole; there the bound is the entropy of the missing bytes, which a client
could as well brute-force offline against the hash.
"""

from __future__ import annotations

import datetime
import secrets
from dataclasses import dataclass
from typing import Any, BinaryIO

import blake3
from pymongo import ReturnDocument, WriteConcern
from pymongo.database import Database

from catalog.errors import TooManyRequestsError

PROOF_RANGES = 192
RANGE_SIZE = 64
WHOLE_BELOW = PROOF_RANGES * RANGE_SIZE
DAILY_BUDGET = 10
WINDOW = datetime.timedelta(days=1)


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
    """(start, length) ranges for content of `length` bytes, sorted by start.

    Sorted so that both sides read the content front to back; the checksum
    is over the ranges in this order.

    Content under WHOLE_BELOW is asked for whole, but never as one range: the
    BLAKE3 of the whole content in order is its hash, which the claimant sent
    (a client knowing only the hash would pass). Two ranges that overlap at a
    random place, [0, k) and [j, length) with j < k, cover every byte and
    repeat some, so their checksum takes all the bytes.
    """
    if length <= 0:
        return []
    if length < WHOLE_BELOW:
        k = secrets.randbelow(length) + 1  # 1..length
        j = secrets.randbelow(k)  # 0..k-1: the ranges overlap by k - j >= 1 bytes
        return [(0, k), (j, length - j)]
    span = length - RANGE_SIZE + 1
    return sorted((secrets.randbelow(span), RANGE_SIZE) for _ in range(PROOF_RANGES))


class ProofBudget:
    """Challenges per (environment, content) and day: failed or unanswered ones count.

    A fixed daily window per pair, counted with one atomic upsert; a correct
    answer gives its challenge back, so honest clients never run out.
    """

    def __init__(self, db: Database[Any], per_day: int = DAILY_BUDGET) -> None:
        self.per_day = per_day
        self.collection = db["proof_budget"].with_options(write_concern=WriteConcern("majority"))
        self.collection.create_index("expires_at", expireAfterSeconds=0)

    def take(self, env_uuid: str, digest: str, now: datetime.datetime) -> str:
        """Count one challenge; TooManyRequestsError past the budget. Returns the window key."""
        start = _window_start(now)
        key = f"{env_uuid}\0{digest}\0{int(start.timestamp())}"
        doc = self.collection.find_one_and_update(
            {"_id": key},
            {"$inc": {"n": 1}, "$setOnInsert": {"expires_at": start + 2 * WINDOW}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None and int(doc["n"]) > self.per_day:
            self.collection.update_one({"_id": key}, {"$inc": {"n": -1}})
            retry = (start + WINDOW - now).total_seconds()
            raise TooManyRequestsError(
                f"too many proof-of-access challenges for {digest} in {env_uuid} today; "
                f"upload the content, or retry in {int(retry) + 1} s",
                retry_after=int(retry) + 1,
            )
        return key

    def give_back(self, key: str) -> None:
        self.collection.update_one({"_id": key, "n": {"$gt": 0}}, {"$inc": {"n": -1}})


def _window_start(now: datetime.datetime) -> datetime.datetime:
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    days = (now - epoch) // WINDOW
    return epoch + days * WINDOW


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
