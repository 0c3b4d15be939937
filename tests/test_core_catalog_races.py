"""Two races in ResourceCatalog, raced with real threads on a real mongod.

Each round releases the threads together from a barrier; many rounds make the
interleavings that broke the old code (a remove that succeeded without taking a
reference; a deleting remove that forgot a path recorded just before) likely.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from pymongo.database import Database

from catalog import NotFoundError, ResourceCatalog


def race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run fn(i) in n threads started together; each result or the exception raised."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("durable", [True, False], ids=["majority", "primary-acknowledged"])
def test_concurrent_removes_take_exactly_the_references_there_were(
    db: Database[Any], durable: bool
) -> None:
    """Also for the release after a link (durable=False): only its write concern differs."""
    rc = ResourceCatalog(db)
    for round_ in range(25):
        digest = f"{round_:064x}"
        refs = 1 + round_ % 4
        for _ in range(refs):
            rid, _ = rc.put(digest, 10)
        rc.upload_complete(rid, f"stored/{round_}")
        results = race(refs + 6, lambda _i, rid=rid: rc.remove(rid, durable=durable))
        succeeded = [r for r in results if isinstance(r, tuple)]
        failed = [r for r in results if isinstance(r, NotFoundError)]
        assert len(succeeded) == refs, (round_, results)
        assert len(failed) == 6, (round_, results)
        deleted = [r for r in succeeded if r[0]]
        assert deleted == [(True, f"stored/{round_}")], (round_, results)


def test_upload_complete_racing_the_last_remove_never_loses_the_path(db: Database[Any]) -> None:
    rc = ResourceCatalog(db)
    for round_ in range(60):
        digest = f"{round_ + 1000:064x}"
        rid, _ = rc.put(digest, 10)
        path = f"stored/{round_}"

        def step(i: int, rid: str = rid, path: str = path) -> Any:
            if i == 0:
                rc.upload_complete(rid, path)
                return "completed"
            return rc.remove(rid)

        completed, removed = race(2, step)
        assert isinstance(removed, tuple) and removed[0] is True, (round_, removed)
        if completed == "completed":
            # The bytes were recorded before the entry went: the remover must say where.
            assert removed == (True, path), round_
        else:
            assert isinstance(completed, NotFoundError), (round_, completed)
            assert removed == (True, ""), round_
