"""Proofs cannot be cherry-picked: partial holders never succeed, honest ones at once.

The forger holds 50%, 75% or 90% of an 8 MiB content in 512 KiB stripes (the
layout the security run used), asks for challenges in a loop, and answers only
those that fall wholly inside its bytes; everything else it leaves unanswered.
The budget stops it with TooManyRequestsError long before luck could help.
"""

from __future__ import annotations

import io
from typing import Any

import blake3
import pytest
from pymongo.database import Database

from catalog import ManagedStorage, NotFoundError, new_put_response
from catalog.errors import ResponseMismatchError, TooManyRequestsError
from catalog.proof import DAILY_BUDGET, choose_ranges
from storage import GridFSStorage
from tests.helpers import b3, rand

MiB = 1024 * 1024
STRIPE = 512 * 1024


def answer(data: bytes, ranges: list[tuple[int, int]]) -> str:
    h = blake3.blake3()
    for start, size in ranges:
        h.update(data[start : start + size])
    return h.hexdigest()


def held_stripes(length: int, fraction: float) -> set[int]:
    """Stripe indexes held: `fraction` of them, spread evenly (every k-th missing)."""
    n = length // STRIPE
    missing = round(n * (1 - fraction))
    gone = {round(i * n / missing) for i in range(missing)} if missing else set()
    return set(range(n)) - gone


def inside(ranges: list[tuple[int, int]], held: set[int]) -> bool:
    return all(s // STRIPE in held and (s + n - 1) // STRIPE in held for s, n in ranges)


@pytest.mark.parametrize("fraction", [0.5, 0.75, 0.9])
def test_cherry_picking_forger_never_succeeds(db: Database[Any], fraction: float) -> None:
    managed = ManagedStorage(db, GridFSStorage(db))
    data = rand(8 * MiB, seed=3)
    managed.put_for_environment("victim", "secret.bin", io.BytesIO(data))
    held = held_stripes(len(data), fraction)
    asks = answered = 0
    with pytest.raises(TooManyRequestsError) as limit:
        for _ in range(10_000):
            req = managed.put_for_environment_request("attacker", "loot", b3(data))
            asks += 1
            if inside(req.ranges, held):  # never happens: 0.9**192 per ask at best
                answered += 1
                managed.proof_of_access_response(
                    new_put_response(req.request_id, answer(data, req.ranges))
                )
    assert asks == DAILY_BUDGET and answered == 0
    assert limit.value.retry_after > 0
    with pytest.raises(NotFoundError):
        managed.stat_for_environment("attacker", "loot")


def test_offline_draws_never_fall_inside_ninety_percent() -> None:
    """Without the server: 3000 challenges, none wholly inside a 90% striped holding."""
    held = held_stripes(8 * MiB, 0.9)
    assert sum(inside(choose_ranges(8 * MiB), held) for _ in range(3000)) == 0


def test_honest_client_succeeds_first_time_and_keeps_its_budget(db: Database[Any]) -> None:
    managed = ManagedStorage(db, GridFSStorage(db))
    data = rand(3 * MiB)
    managed.put_for_environment("a", "orig", io.BytesIO(data))
    for i in range(DAILY_BUDGET * 2):  # correct answers give their challenge back
        req = managed.put_for_environment_request("b", f"copy{i}", b3(data))
        res = managed.proof_of_access_response(
            new_put_response(req.request_id, answer(data, req.ranges))
        )
        assert res.hash == b3(data)


def test_wrong_answers_use_up_the_budget(db: Database[Any]) -> None:
    managed = ManagedStorage(db, GridFSStorage(db), proof_budget=3)
    data = rand(100_000)
    managed.put_for_environment("a", "orig", io.BytesIO(data))
    for _ in range(3):
        req = managed.put_for_environment_request("b", "copy", b3(data))
        with pytest.raises(ResponseMismatchError):
            managed.proof_of_access_response(new_put_response(req.request_id, "0" * 64))
    with pytest.raises(TooManyRequestsError):
        managed.put_for_environment_request("b", "copy", b3(data))
    # Another environment has a budget of its own.
    assert managed.put_for_environment_request("c", "copy", b3(data)).ranges


def test_environment_dedup_scope_hides_other_environments_content(db: Database[Any]) -> None:
    managed = ManagedStorage(db, GridFSStorage(db), dedup_scope="environment")
    data = rand(50_000)
    managed.put_for_environment("a", "orig", io.BytesIO(data))
    with pytest.raises(NotFoundError):  # no side channel: b cannot learn a stores it
        managed.put_for_environment_request("b", "copy", b3(data))
    req = managed.put_for_environment_request("a", "copy", b3(data))
    managed.proof_of_access_response(new_put_response(req.request_id, answer(data, req.ranges)))
    # b uploads for real; storage is still shared (one copy).
    managed.put_for_environment("b", "copy", io.BytesIO(data))
    assert managed.catalog.get(managed.catalog.find(b3(data))).refcount == 3
