"""ResourceCatalog, after juju/blobstore's resourcecatalog tests, on a real mongod."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pymongo.database import Database

from catalog import (
    AlreadyExistsError,
    LengthMismatchError,
    NotFoundError,
    ResourceCatalog,
    UploadPendingError,
)
from catalog.errors import BadRequestError

H1 = "a" * 64
H2 = "b" * 64


@pytest.fixture
def rc(db: Database[Any]) -> ResourceCatalog:
    return ResourceCatalog(db)


def test_put_new_is_pending_with_refcount_one(rc: ResourceCatalog) -> None:
    rid, path = rc.put(H1, 200)
    assert rid and path == ""
    entry = rc.entry(rid)
    assert (entry.hash, entry.length, entry.refcount, entry.state) == (H1, 200, 1, "pending")
    assert [state for state, _ in entry.history] == ["created"]


def test_put_accepts_prefixed_and_upper_case_hash(rc: ResourceCatalog) -> None:
    rid, _ = rc.put("blake3:" + H1.upper(), 1)
    assert rc.put(H1, 1)[0] == rid


def test_put_rejects_malformed_hash_and_length(rc: ResourceCatalog) -> None:
    with pytest.raises(BadRequestError):
        rc.put("sha384:abc", 1)
    with pytest.raises(ValueError):
        rc.put(H1, -1)


def test_put_same_hash_increments(rc: ResourceCatalog) -> None:
    rid, _ = rc.put(H1, 200)
    rid2, path = rc.put(H1, 200)
    assert rid2 == rid and path == ""
    assert rc.entry(rid).refcount == 2


def test_put_length_mismatch(rc: ResourceCatalog) -> None:
    rid, _ = rc.put(H1, 200)
    with pytest.raises(LengthMismatchError):
        rc.put(H1, 201)
    assert rc.entry(rid).refcount == 1


def test_get_and_find(rc: ResourceCatalog) -> None:
    rid, _ = rc.put(H1, 200)
    with pytest.raises(UploadPendingError):
        rc.get(rid)
    with pytest.raises(UploadPendingError):
        rc.find(H1)
    rc.upload_complete(rid, "stored/here")
    res = rc.get(rid)
    assert (res.id, res.hash, res.path, res.length, res.refcount) == (
        rid,
        H1,
        "stored/here",
        200,
        1,
    )
    assert rc.find("blake3:" + H1) == rid
    assert rc.put(H1, 200) == (rid, "stored/here")


def test_get_unknown_and_malformed_ids(rc: ResourceCatalog) -> None:
    for bad in ("0" * 24, "not-an-id", ""):
        with pytest.raises(NotFoundError):
            rc.get(bad)
    with pytest.raises(NotFoundError):
        rc.find(H2)


def test_not_found_is_a_key_error(rc: ResourceCatalog) -> None:
    with pytest.raises(KeyError):
        rc.get("0" * 24)


def test_upload_complete_twice(rc: ResourceCatalog) -> None:
    rid, _ = rc.put(H1, 1)
    rc.upload_complete(rid, "p1")
    with pytest.raises(AlreadyExistsError):
        rc.upload_complete(rid, "p2")
    assert rc.get(rid).path == "p1"


def test_upload_complete_deleted(rc: ResourceCatalog) -> None:
    rid, _ = rc.put(H1, 1)
    rc.remove(rid)
    with pytest.raises(NotFoundError):
        rc.upload_complete(rid, "p")


def test_remove_only_reference(rc: ResourceCatalog) -> None:
    rid, _ = rc.put(H1, 1)
    rc.upload_complete(rid, "p")
    assert rc.remove(rid) == (True, "p")
    with pytest.raises(NotFoundError):
        rc.entry(rid)


def test_remove_decrements(rc: ResourceCatalog) -> None:
    rid, _ = rc.put(H1, 1)
    rc.put(H1, 1)
    rc.upload_complete(rid, "p")
    assert rc.remove(rid) == (False, "p")
    assert rc.get(rid).refcount == 1


def test_remove_unknown(rc: ResourceCatalog) -> None:
    with pytest.raises(NotFoundError):
        rc.remove("0" * 24)


def test_find_abandoned_upload_is_not_found(db: Database[Any]) -> None:
    rc = ResourceCatalog(db, lease=-1)  # every lease has run out already
    rc.put(H1, 1)
    with pytest.raises(NotFoundError):
        rc.find(H1)


def test_history_is_bounded(rc: ResourceCatalog) -> None:
    rid, _ = rc.put(H1, 1)
    for _ in range(40):
        rc.renew_lease(rid, state="uploading")
    assert len(rc.entry(rid).history) == 16


def test_concurrent_puts_one_entry(rc: ResourceCatalog) -> None:
    barrier = threading.Barrier(16)
    ids: list[str] = []

    def worker() -> None:
        barrier.wait()
        ids.append(rc.put(H2, 42)[0])

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    assert rc.entry(ids[0]).refcount == 16
    assert rc.collection.count_documents({"hash": H2}) == 1


def test_concurrent_removes_delete_once(rc: ResourceCatalog) -> None:
    for _ in range(8):
        rid, _ = rc.put(H1, 1)
    rc.upload_complete(rid, "p")
    barrier = threading.Barrier(8)
    results: list[tuple[bool, str]] = []

    def worker() -> None:
        barrier.wait()
        results.append(rc.remove(rid))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [(False, "p")] * 7 + [(True, "p")]
