"""Proof of access: requests, responses, mismatches, expiry, and cross-instance use."""

from __future__ import annotations

import io
import time
from typing import Any

import blake3
import pytest
from pymongo.database import Database

from catalog import (
    ManagedStorage,
    NotFoundError,
    RequestExpiredError,
    ResourceDeletedError,
    ResponseMismatchError,
    UploadPendingError,
    new_put_response,
)
from catalog.errors import BadRequestError, InvalidPathError
from catalog.proof import PROOF_RANGES, RANGE_SIZE, WHOLE_BELOW, choose_ranges, ranges_checksum
from storage import GridFSStorage
from tests.helpers import b3, rand


def answer(data: bytes, ranges: list[tuple[int, int]]) -> str:
    h = blake3.blake3()
    for start, size in ranges:
        h.update(data[start : start + size])
    return h.hexdigest()


@pytest.fixture
def stored(managed: ManagedStorage) -> bytes:
    data = rand(5_000_000)
    managed.put_for_environment("owner", "orig", io.BytesIO(data))
    return data


def test_ranges_are_many_sorted_and_inside() -> None:
    for length in (WHOLE_BELOW, 10_000_000, 10**12):
        for _ in range(5):
            ranges = choose_ranges(length)
            assert len(ranges) == PROOF_RANGES
            assert ranges == sorted(ranges)
            for start, size in ranges:
                assert size == RANGE_SIZE and start >= 0 and start + size <= length
    assert choose_ranges(0) == []
    for length in (1, 2, 1000, WHOLE_BELOW - 1):
        for _ in range(20):
            (a, k), (j, rest) = choose_ranges(length)
            assert a == 0 and 0 <= j < k <= length and j + rest == length  # every byte
            assert k + rest > length  # some twice: never the content in order


def test_a_small_content_s_hash_is_no_proof(managed: ManagedStorage) -> None:
    """The answer for content asked for whole must not be its hash, which the claimant
    already knows (a token for another environment could take any small file it can
    name by hash: ETags, listings and published checksums give hashes away)."""
    secret = b"API_KEY=" + rand(4000)
    managed.put_for_environment("alice", "secrets.env", io.BytesIO(secret))
    for _ in range(5):
        req = managed.put_for_environment_request("mallory", "loot", b3(secret))
        with pytest.raises(ResponseMismatchError):
            managed.proof_of_access_response(new_put_response(req.request_id, b3(secret)))
    with pytest.raises(NotFoundError):
        managed.get_for_environment("mallory", "loot")
    req = managed.put_for_environment_request("bob", "copy", b3(secret))
    answer = ranges_checksum(io.BytesIO(secret), req.ranges)  # bob holds the bytes
    managed.proof_of_access_response(new_put_response(req.request_id, answer))
    reader, _ = managed.get_for_environment("bob", "copy")
    with reader:
        assert reader.read() == secret


def test_ranges_are_unpredictable() -> None:
    assert len({tuple(choose_ranges(10**9)) for _ in range(50)}) == 50


def test_request_response(managed: ManagedStorage, stored: bytes) -> None:
    req = managed.put_for_environment_request("claimer", "copy", "blake3:" + b3(stored))
    assert req.expires_at.tzinfo is not None and len(req.ranges) == PROOF_RANGES
    res = managed.proof_of_access_response(
        new_put_response(req.request_id, answer(stored, req.ranges))
    )
    assert res.hash == b3(stored)
    reader, _length = managed.get_for_environment("claimer", "copy")
    assert reader.read() == stored
    assert managed.catalog.get(res.id).refcount == 2
    # single use
    with pytest.raises(RequestExpiredError):
        managed.proof_of_access_response(
            new_put_response(req.request_id, answer(stored, req.ranges))
        )


def test_request_for_unknown_content(managed: ManagedStorage) -> None:
    with pytest.raises(NotFoundError):
        managed.put_for_environment_request("env", "p", b3(b"nothing"))
    with pytest.raises(BadRequestError):
        managed.put_for_environment_request("env", "p", "md5:abc")
    with pytest.raises(InvalidPathError):
        managed.put_for_environment_request("env", "../p", b3(b"nothing"))


def test_request_while_upload_pending(managed: ManagedStorage) -> None:
    data = rand(1000)
    managed.catalog.put(b3(data), len(data))  # an uploader declared it and is writing
    with pytest.raises(UploadPendingError):
        managed.put_for_environment_request("env", "p", b3(data))


def test_request_for_abandoned_upload_is_not_found(db: Database[Any]) -> None:
    ms = ManagedStorage(db, GridFSStorage(db), lease=0.2)
    data = rand(1000)
    ms.catalog.put(b3(data), len(data))
    time.sleep(0.3)
    with pytest.raises(NotFoundError):
        ms.put_for_environment_request("env", "p", b3(data))
    # and the next uploader proceeds
    ms.put_for_environment("env", "p", io.BytesIO(data))
    assert len(ms.put_for_environment_request("env", "q", b3(data)).ranges) == 2


def test_wrong_checksum_creates_nothing_and_consumes(
    managed: ManagedStorage, stored: bytes
) -> None:
    req = managed.put_for_environment_request("claimer", "copy", b3(stored))
    with pytest.raises(ResponseMismatchError):
        managed.proof_of_access_response(new_put_response(req.request_id, b3(b"wrong")))
    with pytest.raises(NotFoundError):
        managed.stat_for_environment("claimer", "copy")
    with pytest.raises(RequestExpiredError):
        managed.proof_of_access_response(
            new_put_response(req.request_id, answer(stored, req.ranges))
        )
    assert managed.catalog.get(managed.catalog.find(b3(stored))).refcount == 1


def test_client_with_half_the_content_fails(managed: ManagedStorage, stored: bytes) -> None:
    half = stored[: len(stored) // 2] + bytes(len(stored) - len(stored) // 2)
    for _ in range(5):
        req = managed.put_for_environment_request("claimer", "copy", b3(stored))
        with pytest.raises(ResponseMismatchError):
            managed.proof_of_access_response(
                new_put_response(req.request_id, answer(half, req.ranges))
            )


def test_expired_request(db: Database[Any]) -> None:
    ms = ManagedStorage(db, GridFSStorage(db), request_expiry=0.2)
    data = rand(10_000)
    ms.put_for_environment("env", "p", io.BytesIO(data))
    req = ms.put_for_environment_request("env", "q", b3(data))
    time.sleep(0.3)
    with pytest.raises(RequestExpiredError):
        ms.proof_of_access_response(new_put_response(req.request_id, answer(data, req.ranges)))


@pytest.mark.parametrize("request_id", ["", "nope", "x" * 500, "../../etc", "0" * 32])
def test_unknown_or_malformed_request(managed: ManagedStorage, request_id: str) -> None:
    with pytest.raises(RequestExpiredError):
        managed.proof_of_access_response(new_put_response(request_id, b3(b"")))


def test_content_deleted_since_request(managed: ManagedStorage, stored: bytes) -> None:
    req = managed.put_for_environment_request("claimer", "copy", b3(stored))
    managed.remove_for_environment("owner", "orig")
    with pytest.raises(ResourceDeletedError):
        managed.proof_of_access_response(
            new_put_response(req.request_id, answer(stored, req.ranges))
        )
    with pytest.raises(NotFoundError):
        managed.stat_for_environment("claimer", "copy")


def test_request_is_bound_to_its_environment(managed: ManagedStorage, stored: bytes) -> None:
    req = managed.put_for_environment_request("claimer", "copy", b3(stored))
    with pytest.raises(RequestExpiredError):
        managed.environment("intruder").prove(req, answer(stored, req.ranges))
    with pytest.raises(RequestExpiredError):  # consumed by the wrong answer
        managed.environment("claimer").prove(req, answer(stored, req.ranges))


def test_request_answered_on_another_instance(db: Database[Any], stored: bytes) -> None:
    first = ManagedStorage(db, GridFSStorage(db))
    req = first.put_for_environment_request("claimer", "copy", b3(stored))
    del first  # as after a restart: the request lives in MongoDB only
    second = ManagedStorage(db, GridFSStorage(db))
    second.proof_of_access_response(new_put_response(req.request_id, answer(stored, req.ranges)))
    assert second.get_for_environment("claimer", "copy")[1] == len(stored)


def test_zero_length_content(managed: ManagedStorage) -> None:
    managed.put_for_environment("env", "empty", io.BytesIO(b""))
    req = managed.put_for_environment_request("env", "empty2", b3(b""))
    assert req.ranges == []
    managed.proof_of_access_response(new_put_response(req.request_id, b3(b"")))
    assert managed.get_for_environment("env", "empty2")[1] == 0


def test_request_replacing_a_path_releases_old_content(
    managed: ManagedStorage, stored: bytes, db: Database[Any]
) -> None:
    old = managed.put_for_environment("claimer", "copy", io.BytesIO(b"old content"))
    req = managed.put_for_environment_request("claimer", "copy", b3(stored))
    managed.proof_of_access_response(new_put_response(req.request_id, answer(stored, req.ranges)))
    with pytest.raises(NotFoundError):
        managed.catalog.entry(old.id)
    assert db["resources.files"].count_documents({}) == 1


def test_requests_have_a_ttl_index(managed: ManagedStorage) -> None:
    indexes = managed.requests.index_information()
    assert any(ix.get("expireAfterSeconds") == 0 for ix in indexes.values())


def test_lease_is_renewed_while_a_slow_upload_runs(db: Database[Any]) -> None:
    """An uploader that is alive but slow is never taken for an abandoned one."""
    import threading

    ms = ManagedStorage(db, GridFSStorage(db), lease=0.4)
    data = rand(3_000_000)

    class Slow(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def readable(self) -> bool:
            return True

        def read(self, size: int | None = -1) -> bytes:
            time.sleep(0.05)
            n = min(100_000, len(data) - self.pos)
            out = data[self.pos : self.pos + n]
            self.pos += n
            return out

    uploader = threading.Thread(
        target=ms.put_for_environment_and_check_hash,
        args=("env", "slow", Slow(), len(data), b3(data)),
    )
    uploader.start()
    seen = set()
    while uploader.is_alive():
        try:
            ms.put_for_environment_request("env", "other", b3(data))
            seen.add("ready")
        except UploadPendingError:
            seen.add("pending")
        except NotFoundError:
            if seen:  # before the uploader declared the content, unknown is right
                seen.add("abandoned")
        time.sleep(0.05)
    uploader.join()
    assert "abandoned" not in seen and "pending" in seen
    assert ms.stat_for_environment("env", "slow").length == len(data)


def test_prove_for_environment_returns_the_path(managed: ManagedStorage, stored: bytes) -> None:
    req = managed.put_for_environment_request("claimer", "new/copy", b3(stored))
    info = managed.prove_for_environment("claimer", req.request_id, answer(stored, req.ranges))
    assert (info.env_uuid, info.path, info.hash, info.length) == (
        "claimer",
        "new/copy",
        b3(stored),
        len(stored),
    )
    req = managed.put_for_environment_request("claimer", "other", b3(stored))
    with pytest.raises(RequestExpiredError):
        managed.prove_for_environment("intruder", req.request_id, answer(stored, req.ranges))
