"""Group commit: batches from real threads; references taken in batches on a real mongod."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import blake3
import pytest
from pymongo.database import Database

from catalog import LengthMismatchError, ResourceCatalog
from catalog.groupcommit import GroupCommit
from tests.test_core_catalog_races import race


def test_every_caller_gets_its_own_result_and_batches_form_under_load() -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def run(items: Sequence[int]) -> list[int]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01)  # a round trip: others queue meanwhile
        with lock:
            running -= 1
        return [i * 2 for i in items]

    gc: GroupCommit[int, int] = GroupCommit(run, max_batch=8, max_inflight=2)
    results = race(32, gc.submit)
    assert results == [i * 2 for i in range(32)]
    assert most <= 2  # never more batches in flight than allowed
    assert gc.stats.items == 32
    assert gc.stats.batches < 32 and 1 < gc.stats.largest <= 8


def test_a_lone_caller_runs_at_once() -> None:
    gc: GroupCommit[str, str] = GroupCommit(lambda items: [s.upper() for s in items])
    assert gc.submit("a") == "A"
    assert gc.stats.to_dict() == {"batches": 1, "items": 1, "largest": 1, "mean": 1.0}


def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_runs() -> None:
    calls = 0

    def run(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        time.sleep(0.01)
        if calls == 1:
            raise ConnectionError("the first batch fails")
        return list(items)

    gc: GroupCommit[int, int] = GroupCommit(run, max_inflight=1)
    results = race(16, gc.submit)
    failed = [r for r in results if isinstance(r, ConnectionError)]
    ok = [r for r in results if not isinstance(r, Exception)]
    assert failed and ok and len(failed) + len(ok) == 16
    assert sorted(ok) == sorted(i for i, r in enumerate(results) if r == i)


def test_batched_references_count_exactly(db: Database[Any]) -> None:
    """32 threads, 4 contents: every acquire is one reference, one entry per content."""
    rc = ResourceCatalog(db)
    assert rc.ref_batches is not None
    contents = [bytes([k]) * 100 for k in range(4)]
    rc.put(blake3.blake3(contents[3]).hexdigest(), 100)  # made by put: pending, no bytes

    def acquire(i: int) -> str:
        data = contents[i % 4]
        res = rc.acquire_inline(blake3.blake3(data).hexdigest(), data)
        assert res.data == data and res.length == 100 and res.inline
        return res.id

    for _ in range(3):
        ids = race(32, acquire)
        assert not [r for r in ids if isinstance(r, Exception)]
    assert rc.ref_batches.stats.largest > 1  # some acquires did share a command
    for k, data in enumerate(contents):
        doc = db["catalog"].find_one({"hash": blake3.blake3(data).hexdigest()})
        assert doc is not None
        assert doc["refcount"] == 24 + (1 if k == 3 else 0)
        assert bytes(doc["data"]) == data and doc["path"] == "inline:"
    assert db["catalog"].count_documents({}) == 4


def test_a_length_mismatch_in_a_batch_is_that_caller_s_error(db: Database[Any]) -> None:
    rc = ResourceCatalog(db)
    data = b"four"
    digest = blake3.blake3(data).hexdigest()
    rc.put(digest, 5)  # recorded with another length

    def acquire(i: int) -> str:
        if i % 2:
            return rc.acquire_inline(digest, data).id
        other = f"other {i}".encode()
        return rc.acquire_inline(blake3.blake3(other).hexdigest(), other).id

    results = race(16, acquire)
    mismatched = [r for i, r in enumerate(results) if i % 2]
    others = [r for i, r in enumerate(results) if not i % 2]
    assert all(isinstance(r, LengthMismatchError) for r in mismatched)
    assert all(isinstance(r, str) for r in others)
    assert db["catalog"].find_one({"hash": digest})["refcount"] == 1  # only put's


@pytest.mark.parametrize("threads", [1, 16])
def test_removes_after_batched_acquires_leave_nothing(db: Database[Any], threads: int) -> None:
    rc = ResourceCatalog(db)
    data = b"shared small content"
    digest = blake3.blake3(data).hexdigest()
    ids = race(threads, lambda i: rc.acquire_inline(digest, data).id)
    outcomes = race(threads, lambda i: rc.remove(ids[i]))
    assert [o[0] for o in outcomes].count(True) == 1  # exactly one removal deleted it
    assert db["catalog"].count_documents({"hash": digest}) == 0
