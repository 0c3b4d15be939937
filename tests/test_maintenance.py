"""fsck finds each injected fault, gc repairs what is repairable, on a real mongod."""

from __future__ import annotations

import datetime
import io
import os
import struct
from typing import Any

import pytest
from bson import ObjectId
from pymongo.database import Database

from catalog import ManagedStorage, NotFoundError
from catalog.clock import utcnow
from catalog.fsck import fsck
from catalog.gc import gc
from catalog.stats import environments, stats
from storage import GridFSStorage
from tests.helpers import flip_chunk_bit

MiB = 1024 * 1024
PAST = datetime.timedelta(hours=2)


def oid_at(when: datetime.datetime) -> ObjectId:
    """A unique ObjectId whose timestamp is `when`."""
    return ObjectId(struct.pack(">I", int(when.timestamp())) + os.urandom(8))


def put(managed: ManagedStorage, env: str, path: str, data: bytes) -> str:
    return managed.put_for_environment(env, path, io.BytesIO(data)).hash


def read(managed: ManagedStorage, env: str, path: str) -> bytes:
    reader, _ = managed.get_for_environment(env, path)
    try:
        return reader.read()
    finally:
        reader.close()


def entry_doc(db: Database[Any], digest: str) -> dict[str, Any]:
    doc = db.catalog.find_one({"hash": digest})
    assert doc is not None
    return doc


def expire_lease(db: Database[Any], digest: str) -> None:
    db.catalog.update_one({"hash": digest}, {"$set": {"lease_until": utcnow() - PAST}})


def counts(db: Database[Any]) -> dict[str, int]:
    return {
        name: db[name].count_documents({})
        for name in ("catalog", "paths", "put_requests", "resources.files", "resources.chunks")
    }


def snapshot(db: Database[Any]) -> dict[str, list[dict[str, Any]]]:
    return {
        name: list(db[name].find({}, {"data": 0}).sort("_id", 1))
        for name in ("catalog", "paths", "put_requests", "resources.files", "resources.chunks")
    }


def test_clean_catalog_stats_and_nothing_to_do(managed: ManagedStorage, db: Database[Any]) -> None:
    a = os.urandom(3 * MiB + 17)
    b = os.urandom(1000)
    put(managed, "env1", "x/a", a)
    put(managed, "env1", "x/a-copy", a)
    put(managed, "env2", "a", a)
    put(managed, "env2", "b", b)
    put(managed, "env2", "empty", b"")

    report = fsck(managed, verify_content=True, grace=0)
    assert report.clean, report.problems
    # b and the empty content are small: kept inline in their entries, not as files
    assert (report.resources, report.paths, report.files) == (3, 5, 1)
    assert report.bytes_verified == len(a) + len(b)

    s = stats(managed, by_env=True)
    assert (s.resources, s.pending, s.paths, s.environments) == (3, 0, 5, 2)
    assert s.logical_bytes == 3 * len(a) + len(b)
    assert s.physical_bytes == len(a) + len(b)
    assert s.stored_files == 1 and s.stored_bytes == len(a)  # b and empty are inline
    assert s.dedup_ratio == pytest.approx((3 * len(a) + len(b)) / (len(a) + len(b)), rel=1e-3)
    assert s.storage_size is not None and s.storage_size > 0
    assert s.by_env is not None
    env1, env2 = s.by_env
    assert (env1.env, env1.paths, env1.logical_bytes, env1.resources) == ("env1", 2, 2 * len(a), 1)
    assert env1.physical_bytes == len(a)
    assert (env2.env, env2.paths, env2.resources, env2.physical_bytes) == (
        "env2",
        3,
        3,
        len(a) + len(b),
    )
    data = s.to_dict()
    assert {"resources", "paths", "logical_bytes", "physical_bytes", "dedup_ratio"} <= set(data)
    assert [e.to_dict() for e in environments(managed)] == [
        {"env": "env1", "paths": 2, "bytes": 2 * len(a)},
        {"env": "env2", "paths": 3, "bytes": len(a) + len(b)},
    ]

    before = snapshot(db)
    result = gc(managed, grace=0)
    assert not result.changed, result.actions
    assert (result.entries, result.bytes) == (0, 0)
    assert snapshot(db) == before


def test_missing_chunk_is_reported_and_not_repairable(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    digest = put(managed, "e", "big", os.urandom(3 * MiB + 5))
    put(managed, "e", "fine", b"fine")
    file_doc = db["resources.files"].find_one({"filename": entry_doc(db, digest)["path"]})
    assert file_doc is not None
    db["resources.chunks"].delete_one({"files_id": file_doc["_id"], "n": 1})

    report = fsck(managed, grace=0)
    assert report.kinds() == {"missing_chunk"}
    (problem,) = report.problems
    assert problem.hash == digest and "chunk 1 missing" in problem.detail
    assert problem.file_id == str(file_doc["_id"])

    result = gc(managed, grace=0)
    assert (result.entries, result.bytes) == (0, 0)
    assert fsck(managed, grace=0).kinds() == {"missing_chunk"}  # reported, never hidden
    assert read(managed, "e", "fine") == b"fine"


def test_flipped_byte_needs_verify_content(managed: ManagedStorage, db: Database[Any]) -> None:
    data = os.urandom(2 * MiB + 100)
    digest = put(managed, "e", "f", data)
    put(managed, "e", "g", b"other content")
    flip_chunk_bit(db, entry_doc(db, digest)["path"], 1, 1234)

    assert fsck(managed, grace=0).clean  # sizes and counts are all right
    report = fsck(managed, grace=0, verify_content=True)
    assert report.kinds() == {"corrupt_content"}
    (problem,) = report.problems
    assert problem.hash == digest and problem.resource_id == str(entry_doc(db, digest)["_id"])
    gc(managed, grace=0)
    assert fsck(managed, grace=0, verify_content=True).kinds() == {"corrupt_content"}


def test_bumped_refcount_is_recounted(managed: ManagedStorage, db: Database[Any]) -> None:
    digest = put(managed, "e", "a", b"shared")
    put(managed, "e", "b", b"shared")
    db.catalog.update_one({"hash": digest}, {"$inc": {"refcount": 3}})

    # While the lease of the last reference taken runs, an uploader may hold one.
    report = fsck(managed, grace=0)
    assert report.clean and report.in_flight == 1
    assert gc(managed, grace=0).refcounts_fixed == 0

    expire_lease(db, digest)
    report = fsck(managed, grace=0)
    assert report.kinds() == {"refcount_mismatch"}
    assert "refcount 5, but 2 paths" in report.problems[0].detail

    before = snapshot(db)
    dry = gc(managed, grace=0, dry_run=True)
    assert dry.refcounts_fixed == 1
    assert snapshot(db) == before

    result = gc(managed, grace=0)
    assert result.refcounts_fixed == 1 and result.entries == 0
    assert entry_doc(db, digest)["refcount"] == 2
    assert entry_doc(db, digest)["history"][-1]["state"] == "recounted"
    assert fsck(managed, grace=0).clean
    managed.remove_for_environment("e", "a")
    managed.remove_for_environment("e", "b")
    assert counts(db)["catalog"] == 0 and counts(db)["resources.chunks"] == 0


def test_refcount_too_low_is_reported_even_under_a_lease(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    digest = put(managed, "e", "a", b"content")
    put(managed, "e", "b", b"content")
    db.catalog.update_one({"hash": digest}, {"$set": {"refcount": 1}})
    assert fsck(managed, grace=0).kinds() == {"refcount_mismatch"}
    expire_lease(db, digest)
    assert gc(managed, grace=0).refcounts_fixed == 1
    assert entry_doc(db, digest)["refcount"] == 2
    assert fsck(managed, grace=0).clean


def test_unreferenced_entry_is_deleted_with_its_bytes(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    data = os.urandom(MiB + 1)
    digest = put(managed, "e", "a", data)
    db.paths.delete_one({"env": "e", "path": "a"})  # a crash between path and refcount
    expire_lease(db, digest)
    report = fsck(managed, grace=0)
    assert report.kinds() == {"refcount_mismatch"}
    result = gc(managed, grace=0)
    assert result.unreferenced_entries == 1 and result.entries == 1
    assert result.bytes == len(data)
    assert counts(db) == dict.fromkeys(counts(db), 0)
    assert fsck(managed, grace=0).clean


def test_dropped_resource_is_restored_from_its_bytes(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    data = os.urandom(MiB + 3)
    digest = put(managed, "e", "a", data)
    put(managed, "other", "a", data)
    put(managed, "e", "keep", b"keep")
    rid = entry_doc(db, digest)["_id"]
    db.catalog.delete_one({"_id": rid})
    age_files(db)

    report = fsck(managed, grace=0)
    assert report.kinds() == {"dangling_path", "orphan_file"}
    dangling = [p for p in report.problems if p.kind == "dangling_path"]
    assert {(p.env, p.path) for p in dangling} == {("e", "a"), ("other", "a")}
    with pytest.raises(NotFoundError):
        read(managed, "e", "a")

    before = snapshot(db)
    dry = gc(managed, grace=0, dry_run=True)
    assert dry.restored_entries == 1 and dry.orphan_files == 0
    assert snapshot(db) == before

    result = gc(managed, grace=0)
    assert result.restored_entries == 1
    assert result.orphan_files == 0 and result.bytes == 0  # its bytes were kept
    restored = entry_doc(db, digest)
    assert restored["_id"] == rid and restored["refcount"] == 2
    assert read(managed, "e", "a") == data and read(managed, "other", "a") == data
    assert fsck(managed, grace=0, verify_content=True).clean
    managed.remove_for_environment("e", "a")
    managed.remove_for_environment("other", "a")
    assert db.catalog.count_documents({"hash": digest}) == 0


def test_dropped_resource_repointed_to_a_new_entry(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    data = os.urandom(5000)
    digest = put(managed, "e", "a", data)
    old = entry_doc(db, digest)
    db.catalog.delete_one({"_id": old["_id"]})
    db["resources.files"].delete_many({"filename": old["path"]})
    db["resources.chunks"].delete_many({})
    put(managed, "e", "b", data)  # the same content arrives again: a new entry
    assert fsck(managed, grace=0).kinds() == {"dangling_path"}
    result = gc(managed, grace=0)
    assert result.repointed_paths == 1
    assert entry_doc(db, digest)["refcount"] == 2
    assert read(managed, "e", "a") == data
    assert fsck(managed, grace=0).clean


def test_lost_content_stays_reported(managed: ManagedStorage, db: Database[Any]) -> None:
    digest = put(managed, "e", "a", b"gone for good")
    doc = entry_doc(db, digest)
    db.catalog.delete_one({"_id": doc["_id"]})
    db["resources.files"].delete_many({})
    db["resources.chunks"].delete_many({})
    result = gc(managed, grace=0)
    assert not result.changed
    report = fsck(managed, grace=0)
    assert report.kinds() == {"dangling_path"}
    assert report.problems[0].path == "a"


def test_young_bytes_of_a_dangling_path_are_kept(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    digest = put(managed, "e", "a", b"recent" * 12000)  # above the inline limit: a file
    db.catalog.delete_one({"hash": digest})
    result = gc(managed, grace=600)  # the file is younger than the grace: no decision yet
    assert not result.changed and result.in_flight == 1
    assert counts(db)["resources.files"] == 1
    assert fsck(managed, grace=600).kinds() == {"dangling_path"}


def test_orphan_file_respects_grace(
    managed: ManagedStorage, db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    put(managed, "e", "a", b"referenced" * 8000)  # above the inline limit: a file
    gridfs_storage.put("stray", io.BytesIO(b"x" * 70000), -1)

    report = fsck(managed)  # default grace: a fresh file may be an upload about to commit
    assert report.clean and report.in_flight == 1
    report = fsck(managed, grace=0)
    assert report.kinds() == {"orphan_file"}
    assert "'stray'" in report.problems[0].subject and report.problems[0].bytes == 70000

    assert not gc(managed).changed  # default grace 3600 s
    assert gridfs_storage.exists("stray")
    result = gc(managed, grace=0)
    assert (result.orphan_files, result.orphan_file_bytes, result.bytes) == (1, 70000, 70000)
    assert not gridfs_storage.exists("stray")
    assert counts(db)["resources.chunks"] == 1  # only the referenced file's
    assert fsck(managed, grace=0).clean


def test_orphan_file_of_a_live_upload_is_kept(
    managed: ManagedStorage, db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """Between its files document and upload_complete, an upload's file is unreferenced."""
    data = b"in flight" * 1000
    stored = gridfs_storage.put_file("tmp-upload", io.BytesIO(data))
    rid, _ = managed.catalog.put(stored.blake3 or "", len(data))  # pending, lease live
    assert gc(managed, grace=0).orphan_files == 0
    assert fsck(managed, grace=0).clean
    managed.catalog.upload_complete(rid, "tmp-upload")
    assert gridfs_storage.exists("tmp-upload")


def age_files(db: Database[Any]) -> None:
    db["resources.files"].update_many({}, {"$set": {"uploadDate": utcnow() - PAST}})


def test_orphan_chunks_by_last_activity(managed: ManagedStorage, db: Database[Any]) -> None:
    put(managed, "e", "a", b"referenced")
    now = utcnow()
    old_id, busy_id = oid_at(now - PAST), oid_at(now - PAST)
    chunks = db["resources.chunks"]
    # an upload that died two hours ago
    chunks.insert_many(
        [
            {"_id": oid_at(now - PAST), "files_id": old_id, "n": n, "data": b"z" * 100}
            for n in (0, 1)
        ]
    )
    # an upload that started two hours ago and wrote its last batch just now
    chunks.insert_many(
        [
            {"_id": oid_at(now - PAST), "files_id": busy_id, "n": 0, "data": b"y" * 100},
            {"_id": ObjectId(), "files_id": busy_id, "n": 1, "data": b"y" * 100},
        ]
    )
    report = fsck(managed, grace=60)
    assert report.kinds() == {"orphan_chunks"} and report.in_flight == 1
    (problem,) = report.problems
    assert problem.file_id == str(old_id) and problem.bytes == 200

    dry = gc(managed, grace=60, dry_run=True)
    assert (dry.orphan_chunk_files, dry.orphan_chunks, dry.orphan_chunk_bytes) == (1, 2, 200)
    assert chunks.count_documents({"files_id": old_id}) == 2

    result = gc(managed, grace=60)
    assert (result.orphan_chunks, result.bytes, result.in_flight) == (2, 200, 1)
    assert chunks.count_documents({"files_id": old_id}) == 0
    assert chunks.count_documents({"files_id": busy_id}) == 2
    assert fsck(managed, grace=60).clean


def test_abandoned_pending_entry(managed: ManagedStorage, db: Database[Any]) -> None:
    put(managed, "e", "a", b"fine")
    dead = "ab" * 32
    live = "cd" * 32
    managed.catalog.put(dead, 10)
    managed.catalog.put(live, 10)
    assert fsck(managed, grace=0).clean  # both leases live: uploads in flight
    expire_lease(db, dead)
    report = fsck(managed, grace=0)
    assert report.kinds() == {"abandoned_pending"} and report.problems[0].hash == dead

    assert gc(managed, grace=0, dry_run=True).abandoned_pending == 1
    assert db.catalog.count_documents({"hash": dead}) == 1
    result = gc(managed, grace=0)
    assert (result.abandoned_pending, result.entries) == (1, 1)
    assert db.catalog.count_documents({"hash": dead}) == 0
    assert db.catalog.count_documents({"hash": live}) == 1
    assert fsck(managed, grace=0).clean


def test_pending_entry_with_a_path_is_not_deleted(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    digest = put(managed, "e", "a", b"data")
    db.catalog.update_one(
        {"hash": digest},
        {"$set": {"state": "pending", "path": "", "lease_until": utcnow() - PAST}},
    )
    assert gc(managed, grace=0).abandoned_pending == 0
    assert db.catalog.count_documents({"hash": digest}) == 1
    kinds = fsck(managed, grace=0).kinds()
    assert "path_to_pending" in kinds


def test_expired_put_requests(managed: ManagedStorage, db: Database[Any]) -> None:
    put(managed, "e", "a", b"proof me")
    digest = managed.stat_for_environment("e", "a").hash
    managed.put_for_environment_request("e", "b", digest)
    managed.put_for_environment_request("e", "c", digest)
    db.put_requests.update_one({}, {"$set": {"expires_at": utcnow() - PAST}})
    assert gc(managed, grace=0, dry_run=True).expired_requests == 1
    assert db.put_requests.count_documents({}) == 2
    assert gc(managed, grace=0).expired_requests == 1
    assert db.put_requests.count_documents({}) == 1


def test_every_fault_at_once(
    managed: ManagedStorage, db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """All faults together: fsck names each, gc repairs the repairable, the rest remains."""
    chunk_victim = put(managed, "e", "missing-chunk", os.urandom(2 * MiB + 1))
    flip_victim = put(managed, "e", "flipped", os.urandom(MiB + 1))
    bumped = put(managed, "e", "bumped", b"bumped")
    dropped = put(managed, "e", "dropped", b"dropped" * 12000)  # a file, not inline
    put(managed, "e", "healthy", b"healthy")
    gridfs_storage.put("orphan", io.BytesIO(b"o" * 1000), -1)
    managed.catalog.put("ef" * 32, 5)
    expire_lease(db, "ef" * 32)

    files = db["resources.files"]
    chunk_file = files.find_one({"filename": entry_doc(db, chunk_victim)["path"]})
    flip_file = files.find_one({"filename": entry_doc(db, flip_victim)["path"]})
    assert chunk_file is not None and flip_file is not None
    db["resources.chunks"].delete_one({"files_id": chunk_file["_id"], "n": 0})
    db["resources.chunks"].update_one(
        {"files_id": flip_file["_id"], "n": 0}, {"$set": {"data": b"\0" * MiB}}
    )
    db.catalog.update_one({"hash": bumped}, {"$inc": {"refcount": 1}})
    expire_lease(db, bumped)
    db.catalog.delete_one({"hash": dropped})
    age_files(db)

    report = fsck(managed, grace=0, verify_content=True)
    assert report.kinds() == {
        "missing_chunk",
        "corrupt_content",
        "refcount_mismatch",
        "dangling_path",
        "orphan_file",
        "abandoned_pending",
    }
    assert report.counts()["orphan_file"] == 2  # the stray one and the dropped entry's

    gc(managed, grace=0)
    report = fsck(managed, grace=0, verify_content=True)
    assert report.kinds() == {"missing_chunk", "corrupt_content"}
    assert read(managed, "e", "dropped") == b"dropped" * 12000
    assert read(managed, "e", "healthy") == b"healthy"


def test_in_memory_store() -> None:
    """mongomock (no transactions, no $binarySize): the same checks, client-side."""
    import catalog

    managed = catalog.connect(f"mongomock://maintenance-{os.getpid()}", "m")
    db = managed.db
    put(managed, "e", "a", os.urandom(2 * MiB + 1))
    put(managed, "e", "b", b"small")
    assert fsck(managed, grace=0, verify_content=True).clean
    db["resources.chunks"].delete_one({"n": 1})
    managed.resource_storage.put("stray", io.BytesIO(b"x" * 10), -1)
    assert fsck(managed, grace=0).kinds() == {"missing_chunk", "orphan_file"}
    result = gc(managed, grace=0)
    assert (result.orphan_files, result.bytes) == (1, 10)
    assert fsck(managed, grace=0).kinds() == {"missing_chunk"}
    assert stats(managed).paths == 2


# -- gc never deletes bytes that could repair an entry ---------------------------------------
def test_orphan_chunks_are_kept_while_an_entry_has_lost_its_file(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """A files document deleted by hand: its chunks, old and unnamed, are the entry's bytes."""
    data = os.urandom(2 * MiB + 7)
    digest = put(managed, "e", "a", data)
    put(managed, "e", "small", b"small")
    expire_lease(db, digest)
    storage_path = entry_doc(db, digest)["path"]
    files, chunks = db["resources.files"], db["resources.chunks"]
    file_doc = files.find_one({"filename": storage_path})
    assert file_doc is not None
    # The files document is gone, and the chunks look like an upload that died long ago.
    files.delete_one({"_id": file_doc["_id"]})
    old_id = oid_at(utcnow() - PAST)
    for chunk in list(chunks.find({"files_id": file_doc["_id"]})):
        chunks.delete_one({"_id": chunk["_id"]})
        chunks.insert_one({**chunk, "_id": oid_at(utcnow() - PAST), "files_id": old_id})
    n_chunks = chunks.count_documents({"files_id": old_id})
    assert n_chunks == 3
    assert fsck(managed, grace=60).kinds() == {"missing_file", "orphan_chunks"}

    before = snapshot(db)
    dry = gc(managed, grace=60, dry_run=True)
    assert (dry.orphan_chunks, dry.bytes) == (0, 0)
    assert (dry.kept_chunks, dry.missing_files) == (n_chunks, 1)
    assert snapshot(db) == before

    result = gc(managed, grace=60)
    assert (result.orphan_chunks, result.bytes) == (0, 0)
    assert chunks.count_documents({"files_id": old_id}) == n_chunks
    assert (result.kept_chunk_files, result.kept_chunks, result.missing_files) == (1, 3, 1)
    assert any(
        a.startswith("kept 3 orphan chunks: entries have missing files; run fsck")
        for a in result.actions
    ), result.actions
    assert result.to_dict()["kept_chunks"] == 3
    assert chunks.count_documents({"files_id": old_id}) == n_chunks

    # They were exactly its bytes: a files document for them brings the content back.
    files.insert_one({**file_doc, "_id": old_id})
    assert read(managed, "e", "a") == data
    assert fsck(managed, grace=0, verify_content=True).clean

    # Once no entry misses its file, unnamed chunks are reclaimed again.
    stray = oid_at(utcnow() - PAST)
    chunks.insert_one({"_id": oid_at(utcnow() - PAST), "files_id": stray, "n": 0, "data": b"s"})
    result = gc(managed, grace=60)
    assert (result.orphan_chunks, result.kept_chunks) == (1, 0)
    assert chunks.count_documents({"files_id": stray}) == 0


def test_nameless_file_with_an_entrys_hash_is_given_back(
    managed: ManagedStorage, db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """A files document whose filename was unset holds a ready entry's bytes: repair, not delete."""
    data = os.urandom(MiB + 11)
    digest = put(managed, "e", "a", data)
    put(managed, "e", "b", data)
    storage_path = entry_doc(db, digest)["path"]
    files = db["resources.files"]
    files.update_one({"filename": storage_path}, {"$unset": {"filename": 1}})
    age_files(db)
    assert fsck(managed, grace=0).kinds() == {"missing_file", "orphan_file"}
    with pytest.raises(NotFoundError):
        read(managed, "e", "a")

    before = snapshot(db)
    dry = gc(managed, grace=0, dry_run=True)
    assert (dry.orphan_files, dry.bytes) == (0, 0)
    assert dry.repaired_files == 1
    assert snapshot(db) == before

    result = gc(managed, grace=0)
    assert (result.orphan_files, result.bytes) == (0, 0)
    assert files.count_documents({"metadata.blake3": digest}) == 1
    assert result.repaired_files == 1
    assert result.changed
    assert files.count_documents({"filename": storage_path}) == 1
    assert read(managed, "e", "a") == data and read(managed, "e", "b") == data
    assert entry_doc(db, digest)["history"][-1]["state"] == "file repaired"
    assert fsck(managed, grace=0, verify_content=True).clean

    # A spare copy of content whose entry has its own file (a crashed duplicate upload)
    # is reclaimed like any orphan: keeping it would leak it forever.
    gridfs_storage.put("copy", io.BytesIO(data), -1)
    age_files(db)
    result = gc(managed, grace=0)
    assert (result.orphan_files, result.repaired_files, result.kept_files) == (1, 0, 0)
    assert not gridfs_storage.exists("copy")
    assert read(managed, "e", "a") == data

    # While the entry has lost its file, a copy is kept: one that does not check out
    # (here: its length) is never made the entry's file, but it is not deleted either.
    gridfs_storage.put("copy", io.BytesIO(data), -1)
    files.update_one({"filename": "copy"}, {"$set": {"length": len(data) - 1}})
    files.update_one({"filename": storage_path}, {"$set": {"filename": "gone"}})
    files.delete_one({"filename": "gone"})
    age_files(db)
    result = gc(managed, grace=0)
    assert (result.orphan_files, result.repaired_files, result.kept_files) == (0, 0, 1)
    assert gridfs_storage.exists("copy")


def test_an_intact_copy_outlives_a_damaged_file_of_the_same_content(
    managed: ManagedStorage, db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    """gc took a damaged file for the entry's (restoring a lost entry from it, or because
    it exists), called the intact copy of the same hash a spare, and deleted the only good
    bytes: a repairable path became lost content."""
    data = os.urandom(3 * MiB - 5)  # three chunks
    digest = put(managed, "e", "a", data)
    storage_path = entry_doc(db, digest)["path"]
    files, chunks = db["resources.files"], db["resources.chunks"]
    own = files.find_one({"filename": storage_path})
    chunks.delete_one({"files_id": own["_id"], "n": 1})
    gridfs_storage.put("intact-copy", io.BytesIO(data), -1)
    age_files(db)

    # 1. The entry is there, its own file lacks a chunk: the copy becomes its file.
    result = gc(managed, grace=0)
    assert result.orphan_files == 0 and result.repaired_files == 1, result.actions
    assert read(managed, "e", "a") == data
    # The damaged one was set aside under another name: a spare now, reclaimed next time.
    assert files.count_documents({"filename": storage_path}) == 1
    result = gc(managed, grace=0)
    assert result.orphan_files == 1 and files.count_documents({"_id": own["_id"]}) == 0
    assert fsck(managed, grace=0, verify_content=True).clean

    # 2. The entry is lost, and its file is damaged: the entry comes back on the copy.
    own = files.find_one({"filename": storage_path})
    chunks.delete_one({"files_id": own["_id"], "n": 2})
    db.catalog.delete_one({"hash": digest})
    gridfs_storage.put("intact-copy", io.BytesIO(data), -1)
    age_files(db)
    result = gc(managed, grace=0)
    assert result.restored_entries == 1, result.actions
    assert read(managed, "e", "a") == data
    assert gridfs_storage.exists(entry_doc(db, digest)["path"])
    gc(managed, grace=0)  # the damaged one: an orphan with the entry's hash, a spare
    assert read(managed, "e", "a") == data
    assert fsck(managed, grace=0, verify_content=True).clean


def test_fsck_leaves_a_file_still_being_read_to_its_reader(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Its path went while a download ran: the last reader deletes the bytes (as gc
    counts them, in flight); fsck called them an orphan_file and exited 1."""
    data = os.urandom(MiB + 3)
    put(managed, "e", "f", data)
    age_files(db)
    reader, _ = managed.get_for_environment("e", "f")
    try:
        assert reader.read(1000) == data[:1000]
        managed.remove_for_environment("e", "f")
        report = fsck(managed, grace=0)
        assert report.clean, report.problems
    finally:
        reader.close()
    assert db["resources.files"].count_documents({}) == 0  # its last reader deleted them
    assert fsck(managed, grace=0).clean


# -- gc on malformed path documents ----------------------------------------------------------
def test_path_without_resource_id_is_skipped_not_acted_upon(
    managed: ManagedStorage, db: Database[Any], gridfs_storage: GridFSStorage
) -> None:
    data = os.urandom(MiB + 5)
    digest = put(managed, "e", "a", data)
    put(managed, "e", "fine", b"fine")
    db.paths.update_one({"env": "e", "path": "a"}, {"$unset": {"resource_id": 1}})
    expire_lease(db, digest)

    dry = gc(managed, grace=0, dry_run=True)
    assert dry.malformed_paths == 1 and dry.entries == 0
    result = gc(managed, grace=0)  # KeyError 'resource_id' before
    assert result.malformed_paths == 1
    assert (result.entries, result.bytes, result.refcounts_fixed) == (0, 0, 0)
    assert any("malformed path document" in a and "'a'" in a for a in result.actions)
    # The only path's entry was not recounted to zero and deleted with its bytes.
    assert entry_doc(db, digest)["refcount"] == 1
    assert db["resources.files"].count_documents({"filename": entry_doc(db, digest)["path"]}) == 1

    # Neither a resource id nor a hash: nothing unreferenced can be proven so; all is kept.
    db.paths.update_one({"env": "e", "path": "a"}, {"$unset": {"hash": 1}})
    gridfs_storage.put("stray", io.BytesIO(b"x" * 70000), -1)
    age_files(db)
    result = gc(managed, grace=0)
    assert result.malformed_paths == 1
    assert (result.orphan_files, result.kept_files, result.bytes) == (0, 1, 0)
    assert gridfs_storage.exists("stray")
    assert read(managed, "e", "fine") == b"fine"


# -- the dry run predicts the real run ---------------------------------------------------------
def age_history(db: Database[Any], days: float) -> None:
    aged = utcnow() - datetime.timedelta(days=days)
    for name in ("paths", "path_history"):
        db[name].update_many({"events": {"$ne": []}}, {"$set": {"events.$[].at": aged}})


def test_dry_run_counts_sessions_keys_and_history(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    import time

    from catalog.driver import StorageDriver
    from catalog.kv import KVStore

    session_data = os.urandom(2 * MiB + 3)
    writer = StorageDriver(managed, "e").writer("/layer/data")
    writer.write(session_data)
    writer.close()  # uncommitted, untouched from now on
    managed.put_for_environment("e", "old", io.BytesIO(b"1"))
    managed.put_for_environment("e", "old", io.BytesIO(b"2"))
    managed.remove_for_environment("e", "old")  # create, replace, delete: 3 items
    age_history(db, 40)
    kv = KVStore(managed, "e")
    kv.put("short", b"lived" * 20000, ttl=0.5)
    kv.close()
    time.sleep(0.8)

    before = snapshot(db)
    dry = gc(managed, grace=0, session_max_age=0, dry_run=True)
    assert snapshot(db) == before
    assert (dry.expired_keys, dry.sessions_reclaimed) == (1, 1)
    assert dry.session_bytes == len(session_data)
    assert dry.history_trimmed == 3  # items, not documents
    assert dry.bytes == len(session_data)

    result = gc(managed, grace=0, session_max_age=0)
    for name in ("expired_keys", "sessions_reclaimed", "session_bytes", "history_trimmed"):
        assert getattr(result, name) == getattr(dry, name), name
    assert result.bytes == len(session_data)
    actions = "\n".join(result.actions)
    assert "expired TTL keys: 1" in actions
    assert f"idle writer sessions: 1, {len(session_data)} bytes" in actions
    assert "history items older than 30 days: 3" in actions
    assert db["resources.chunks"].count_documents({}) == 0
    assert managed.history_for_environment("e", "old") == []


def test_stats_leave_out_expired_ttl_keys(managed: ManagedStorage, db: Database[Any]) -> None:
    import time

    from catalog.kv import KVStore

    put(managed, "e", "kept", b"kept")
    kv = KVStore(managed, "e")
    kv.put("short", b"lived" * 20000, ttl=0.5)
    kv.put("other", b"x", ttl=0.5)
    kv.close()
    time.sleep(0.8)
    assert db.paths.count_documents({}) == 3  # expired, not yet reclaimed
    s = stats(managed, by_env=True)
    assert (s.paths, s.environments, s.logical_bytes) == (1, 1, 4)
    assert s.by_env is not None and [(e.env, e.paths, e.logical_bytes) for e in s.by_env] == [
        ("e", 1, 4)
    ]
    assert [e.to_dict() for e in environments(managed)] == [{"env": "e", "paths": 1, "bytes": 4}]
