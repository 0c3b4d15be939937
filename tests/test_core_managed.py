"""ManagedStorage, after juju/blobstore's managedstorage tests, plus what it lacked."""

from __future__ import annotations

import io
from typing import Any

import pytest
from pymongo.database import Database

from catalog import (
    HashMismatchError,
    LengthMismatchError,
    ManagedStorage,
    NotFoundError,
)
from catalog.proof import ranges_checksum
from catalog.resources import INLINE
from storage import GridFSStorage
from tests.helpers import BrokenReader, OneWayReader, b3, rand


def stored_files(db: Database[Any]) -> int:
    """Physical copies: GridFS files plus small contents kept inline in their entry."""
    inline = db["catalog"].count_documents({"path": INLINE})
    return db["resources.files"].count_documents({}) + inline


def chunks(db: Database[Any]) -> int:
    return db["resources.chunks"].count_documents({})


def read(ms: ManagedStorage, env: str, path: str) -> bytes:
    reader, length = ms.get_for_environment(env, path)
    data = reader.read()
    assert len(data) == length
    return data


@pytest.mark.parametrize("make_reader", [io.BytesIO, OneWayReader], ids=["seekable", "stream"])
def test_put_get(managed: ManagedStorage, make_reader: Any) -> None:
    data = rand(2_500_000)
    res = managed.put_for_environment("env", "dir/file", make_reader(data))
    assert (res.hash, res.length, res.refcount) == (b3(data), len(data), 1)
    assert read(managed, "env", "dir/file") == data
    assert managed.catalog.get(res.id).path == res.path


def test_put_with_length_leaves_reader_at_position(managed: ManagedStorage) -> None:
    src = io.BytesIO(b"abcdefghij")
    res = managed.put_for_environment("env", "p", src, 4)
    assert src.tell() == 4 and res.length == 4
    assert read(managed, "env", "p") == b"abcd"
    stream = OneWayReader(b"abcdefghij", step=3)
    managed.put_for_environment("env", "q", stream, 5)
    assert stream.read(100) == b"fghij"[:3]


@pytest.mark.parametrize("make_reader", [io.BytesIO, OneWayReader], ids=["seekable", "stream"])
def test_short_input_stores_nothing(
    managed: ManagedStorage, db: Database[Any], make_reader: Any
) -> None:
    with pytest.raises(LengthMismatchError):
        managed.put_for_environment("env", "p", make_reader(b"abc"), 10)
    assert (stored_files(db), chunks(db), managed.catalog.collection.count_documents({})) == (
        0,
        0,
        0,
    )
    with pytest.raises(NotFoundError):
        managed.stat_for_environment("env", "p")


def test_zero_length(managed: ManagedStorage) -> None:
    res = managed.put_for_environment("env", "empty", io.BytesIO(b""), 0)
    assert res.length == 0 and res.hash == b3(b"")
    assert read(managed, "env", "empty") == b""


def test_check_hash(managed: ManagedStorage, db: Database[Any]) -> None:
    data = rand(300_000)
    res = managed.put_for_environment_and_check_hash(
        "env", "p", OneWayReader(data), len(data), "blake3:" + b3(data)
    )
    assert res.hash == b3(data)
    for check in ("", None):
        managed.put_for_environment_and_check_hash("env", "q", io.BytesIO(data), -1, check)


@pytest.mark.parametrize("make_reader", [io.BytesIO, OneWayReader], ids=["seekable", "stream"])
@pytest.mark.parametrize("length", [-1, 300_000])
def test_check_hash_mismatch_stores_nothing(
    managed: ManagedStorage, db: Database[Any], make_reader: Any, length: int
) -> None:
    data = rand(300_000)
    with pytest.raises(HashMismatchError):
        managed.put_for_environment_and_check_hash(
            "env", "p", make_reader(data), length, b3(b"other")
        )
    assert (stored_files(db), chunks(db), managed.catalog.collection.count_documents({})) == (
        0,
        0,
        0,
    )
    assert managed.list_for_environment("env") == []


def test_check_hash_mismatch_against_stored_content(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """A client claiming stored content's hash but sending other bytes gets nothing."""
    data = rand(300_000)
    res = managed.put_for_environment("env", "real", io.BytesIO(data))
    forged = rand(300_000)
    with pytest.raises(HashMismatchError):
        managed.put_for_environment_and_check_hash(
            "env", "forged", OneWayReader(forged), len(forged), res.hash
        )
    assert managed.catalog.get(res.id).refcount == 1
    assert managed.list_for_environment("env") == ["real"]


@pytest.mark.parametrize("make_reader", [io.BytesIO, OneWayReader], ids=["seekable", "stream"])
def test_identical_content_is_stored_once(
    managed: ManagedStorage, db: Database[Any], make_reader: Any
) -> None:
    data = rand(3_000_000)
    one = managed.put_for_environment("env", "one", make_reader(data))
    two = managed.put_for_environment("other-env", "two", make_reader(data))
    assert one.id == two.id
    assert managed.catalog.get(one.id).refcount == 2
    assert stored_files(db) == 1
    assert chunks(db) == -(-len(data) // 1048576)


def test_known_content_with_hash_writes_nothing(managed: ManagedStorage, db: Database[Any]) -> None:
    data = rand(3_000_000)
    first = managed.put_for_environment("env", "one", io.BytesIO(data))
    before = db["resources.chunks"].find_one(sort=[("_id", -1)])

    inserts: list[str] = []
    original = managed.resource_storage.put

    def spy(*args: Any, **kwargs: Any) -> str:
        inserts.append("put")
        return original(*args, **kwargs)  # type: ignore[no-any-return]

    managed.resource_storage.put = spy  # type: ignore[method-assign]
    managed.put_for_environment_and_check_hash(
        "env", "two", OneWayReader(data), len(data), first.hash
    )
    managed.put_for_environment("env", "three", io.BytesIO(data))
    assert inserts == []
    assert db["resources.chunks"].find_one(sort=[("_id", -1)]) == before


def test_put_same_path_replaces_and_frees(managed: ManagedStorage, db: Database[Any]) -> None:
    first = managed.put_for_environment("env", "p", io.BytesIO(b"first"))
    info1 = managed.stat_for_environment("env", "p")
    second = managed.put_for_environment("env", "p", io.BytesIO(b"second"))
    info2 = managed.stat_for_environment("env", "p")
    assert read(managed, "env", "p") == b"second"
    with pytest.raises(NotFoundError):
        managed.catalog.entry(first.id)
    assert managed.catalog.get(second.id).refcount == 1
    assert stored_files(db) == 1
    assert info2.revision > info1.revision
    assert info2.created_at == info1.created_at and info2.updated_at >= info1.updated_at


def test_put_same_content_same_path_keeps_one_reference(managed: ManagedStorage) -> None:
    a = managed.put_for_environment("env", "p", io.BytesIO(b"same"))
    managed.put_for_environment("env", "p", io.BytesIO(b"same"))
    assert managed.catalog.get(a.id).refcount == 1


def test_revision_grows_across_delete_and_recreate(managed: ManagedStorage) -> None:
    managed.put_for_environment("env", "p", io.BytesIO(b"1"))
    managed.put_for_environment("env", "p", io.BytesIO(b"2"))
    rev = managed.stat_for_environment("env", "p").revision
    managed.remove_for_environment("env", "p")
    managed.put_for_environment("env", "p", io.BytesIO(b"3"))
    assert managed.stat_for_environment("env", "p").revision > rev


def test_remove(managed: ManagedStorage, db: Database[Any]) -> None:
    res = managed.put_for_environment("env", "p", io.BytesIO(b"data"))
    managed.remove_for_environment("env", "p")
    with pytest.raises(NotFoundError):
        managed.get_for_environment("env", "p")
    with pytest.raises(NotFoundError):
        managed.catalog.entry(res.id)
    assert (stored_files(db), chunks(db)) == (0, 0)
    with pytest.raises(NotFoundError):
        managed.remove_for_environment("env", "p")


def test_remove_shared_content_keeps_bytes(managed: ManagedStorage, db: Database[Any]) -> None:
    managed.put_for_environment("env", "a", io.BytesIO(b"shared"))
    managed.put_for_environment("env", "b", io.BytesIO(b"shared"))
    managed.remove_for_environment("env", "a")
    assert read(managed, "env", "b") == b"shared"
    assert stored_files(db) == 1


def test_environments_are_isolated(managed: ManagedStorage) -> None:
    managed.put_for_environment("e1", "p", io.BytesIO(b"one"))
    managed.put_for_environment("e2", "p", io.BytesIO(b"two"))
    assert read(managed, "e1", "p") == b"one"
    assert read(managed, "e2", "p") == b"two"
    managed.remove_for_environment("e1", "p")
    assert read(managed, "e2", "p") == b"two"
    with pytest.raises(NotFoundError):
        managed.stat_for_environment("e1", "p")
    assert managed.list_for_environment("e1") == []


def test_list_sorted_with_plain_prefix(managed: ManagedStorage) -> None:
    for path in ["b/2", "a/1", "a.b", "a/0", "ab", "ä", "a*"]:
        managed.put_for_environment("env", path, io.BytesIO(path.encode()))
    assert managed.list_for_environment("env") == sorted(
        ["b/2", "a/1", "a.b", "a/0", "ab", "ä", "a*"]
    )
    assert managed.list_for_environment("env", "a/") == ["a/0", "a/1"]
    assert managed.list_for_environment("env", "a.") == ["a.b"]
    assert managed.list_for_environment("env", "a*") == ["a*"]
    assert managed.list_for_environment("env", "zzz") == []


def test_stat(managed: ManagedStorage) -> None:
    res = managed.put_for_environment("env", "p", io.BytesIO(b"content"))
    info = managed.stat_for_environment("env", "p")
    assert (info.env_uuid, info.path, info.hash, info.length) == ("env", "p", res.hash, 7)
    assert info.created_at.tzinfo is not None and info.updated_at.tzinfo is not None
    assert [s for s, _ in info.history] == ["created"]  # small content is never pending
    assert info.state == "ready"
    big = rand(managed.inline_max + 1)
    managed.put_for_environment("env", "big", io.BytesIO(big))
    info = managed.stat_for_environment("env", "big")
    assert [s for s, _ in info.history] == ["created", "uploading", "ready"]


def test_move(managed: ManagedStorage, db: Database[Any]) -> None:
    res = managed.put_for_environment("env", "src", io.BytesIO(b"moved"))
    managed.put_for_environment("env", "dst", io.BytesIO(b"overwritten"))
    managed.move_for_environment("env", "src", "dst")
    assert managed.list_for_environment("env") == ["dst"]
    assert read(managed, "env", "dst") == b"moved"
    assert managed.catalog.get(res.id).refcount == 1
    assert stored_files(db) == 1


def test_failing_storage_mid_put_leaves_nothing(db: Database[Any]) -> None:
    class FailingStorage(GridFSStorage):
        def put(self, path: str, reader: Any, length: int = -1) -> str:
            data = b"".join(iter(lambda: reader.read(1 << 20), b""))
            return super().put(path, BrokenReader(data, 5_000_000), length)

    ms = ManagedStorage(db, FailingStorage(db))
    data = rand(12_000_000)
    for make_reader in (io.BytesIO, OneWayReader):
        with pytest.raises(OSError):
            ms.put_for_environment("env", "p", make_reader(data))
    assert (stored_files(db), chunks(db), ms.catalog.collection.count_documents({})) == (0, 0, 0)
    assert ms.list_for_environment("env") == []


def test_failing_reader_mid_put_leaves_nothing(managed: ManagedStorage, db: Database[Any]) -> None:
    data = rand(20_000_000)
    with pytest.raises(OSError):
        managed.put_for_environment_and_check_hash(
            "env", "p", BrokenReader(data, 15_000_000), len(data), b3(data)
        )
    assert (stored_files(db), chunks(db), managed.catalog.collection.count_documents({})) == (
        0,
        0,
        0,
    )


def test_environment_view(managed: ManagedStorage) -> None:
    env = managed.environment("team-a")
    res = env.put("x/y", io.BytesIO(b"hello"))
    assert env.list() == ["x/y"]
    assert env.get("x/y")[0].read() == b"hello"
    assert env.stat("x/y").hash == res.hash
    req = env.request_put("copy", res.hash)
    env.prove(req, ranges_checksum(io.BytesIO(b"hello"), req.ranges))
    assert env.list() == ["copy", "x/y"]
    env.move("copy", "moved")
    env.remove("x/y")
    assert env.list() == ["moved"]


def test_known_content_with_hash_and_unknown_length(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    data = rand(2_000_000)
    first = managed.put_for_environment("env", "one", io.BytesIO(data))
    files = db["resources.files"].count_documents({})
    res = managed.put_for_environment_and_check_hash(
        "env", "two", OneWayReader(data), -1, first.hash
    )
    assert res.id == first.id and managed.catalog.get(first.id).refcount == 2
    assert db["resources.files"].count_documents({}) == files
    # a longer input whose first bytes are the stored content is not that content
    with pytest.raises((LengthMismatchError, HashMismatchError)):
        managed.put_for_environment_and_check_hash(
            "env", "three", OneWayReader(data + b"tail"), -1, first.hash
        )
    assert managed.catalog.get(first.id).refcount == 2
    assert managed.list_for_environment("env") == ["one", "two"]


def test_environment_put_takes_bytes_and_refuses_text(managed: ManagedStorage) -> None:
    """`env.put(path, b"...")` as CatalogClient.put and httpx take bytes; text is refused."""
    env = managed.environment("e")
    big = rand(300 * 1024, seed=7)  # past the inline threshold: GridFS
    for data in (b"small", bytearray(b"array"), memoryview(big), b""):
        res = env.put("p", data)
        assert (res.length, res.hash) == (len(data), b3(bytes(data)))
        assert read(managed, "e", "p") == bytes(data)
    assert env.put("q", b"abc", check_hash=b3(b"abc")).length == 3
    with pytest.raises(ValueError, match="length 2 given for 3 bytes"):
        env.put("r", b"abc", 2)
    with pytest.raises(TypeError, match="not str"):
        env.put("r", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="binary mode"):
        env.put("r", io.StringIO("text"))  # type: ignore[arg-type]
    assert managed.list_for_environment("e") == ["p", "q"]
