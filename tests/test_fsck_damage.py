"""fsck on hand-damaged databases: malformed documents and the paths that lose content.

Every fault is made with pymongo on a real mongod. fsck must report a malformed
catalog entry or path document as a problem (and go on checking the rest), and
every problem about lost content must name the paths that point at it.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from bson import ObjectId
from click.testing import CliRunner
from pymongo.database import Database

import cli.main  # noqa: F401  (registers every command)
from catalog import ManagedStorage
from catalog.clock import utcnow
from catalog.fsck import PATHS_SHOWN, Problem, fsck
from cli.app import cli as rescat
from tests.helpers import flip_chunk_bit

KiB = 1024
BIG = 300 * KiB  # above the inline limit: bytes in GridFS


def put(managed: ManagedStorage, env: str, path: str, data: bytes) -> str:
    return managed.put_for_environment(env, path, io.BytesIO(data)).hash


def entry(db: Database[Any], digest: str) -> dict[str, Any]:
    doc = db.catalog.find_one({"hash": digest})
    assert doc is not None
    return doc


def path_doc(db: Database[Any], env: str, path: str) -> dict[str, Any]:
    doc = db.paths.find_one({"env": env, "path": path})
    assert doc is not None
    return doc


def expire_leases(db: Database[Any]) -> None:
    db.catalog.update_many({}, {"$set": {"lease_until": utcnow().replace(year=2000)}})


def one(problems: tuple[Problem, ...], kind: str) -> Problem:
    found = [p for p in problems if p.kind == kind]
    assert len(found) == 1, problems
    return found[0]


def invoke(mongo_uri: str, db: Database[Any], *args: str) -> Any:
    base = ["--mongo-uri", mongo_uri, "--database", db.name]
    return CliRunner().invoke(rescat, [*base, *args], catch_exceptions=False)


# -- 1. malformed documents are problems, not crashes -------------------------------------
def test_entry_without_hash_is_reported_and_the_rest_checked(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    fine = os.urandom(BIG)
    broken = put(managed, "e", "a/big", os.urandom(BIG))
    put(managed, "e", "a/big2", fine)
    other = entry(db, put(managed, "e", "b", b"other"))
    oid = entry(db, broken)["_id"]
    db.catalog.update_one({"_id": oid}, {"$unset": {"hash": 1}})
    expire_leases(db)
    db.catalog.update_one({"_id": other["_id"]}, {"$inc": {"refcount": 2}})  # a second fault

    report = fsck(managed, grace=0, verify_content=True)
    assert report.kinds() == {"malformed_entry", "refcount_mismatch"}
    problem = one(report.problems, "malformed_entry")
    assert problem.collection == "catalog"
    assert problem.document_id == str(oid) == problem.resource_id
    assert problem.fields == ("hash",)
    assert "'hash' is missing" in problem.detail
    assert problem.paths == (("e", "a/big"),)  # the path that cannot be read any more
    assert one(report.problems, "refcount_mismatch").resource_id == str(other["_id"])
    assert report.resources == 3 and report.paths == 3  # nothing skipped
    assert report.bytes_verified == len(fine) + len(b"other")
    data = problem.to_dict()
    assert data["collection"] == "catalog" and data["document_id"] == str(oid)
    assert data["field"] == "hash" and data["fields"] == ["hash"]


def test_entry_with_a_string_length_is_reported(managed: ManagedStorage, db: Database[Any]) -> None:
    digest = put(managed, "e", "a", os.urandom(BIG))
    put(managed, "e", "small", b"small")
    oid = entry(db, digest)["_id"]
    db.catalog.update_one({"_id": oid}, {"$set": {"length": "abc"}})
    expire_leases(db)

    report = fsck(managed, grace=0)
    assert report.kinds() == {"malformed_entry"}
    (problem,) = report.problems
    assert problem.fields == ("length",) and problem.document_id == str(oid)
    assert "'length' is str 'abc'" in problem.detail and "integer" in problem.detail


def test_entry_with_several_bad_fields_is_one_problem(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    digest = put(managed, "e", "a", b"content")
    oid = entry(db, digest)["_id"]
    db.catalog.update_one(
        {"_id": oid}, {"$set": {"refcount": "x", "lease_until": 5}, "$unset": {"length": 1}}
    )
    report = fsck(managed, grace=0)
    (problem,) = report.problems
    assert problem.kind == "malformed_entry"
    assert problem.fields == ("length", "refcount", "lease_until")
    assert report.resources == 1


def test_path_without_resource_id_is_reported(managed: ManagedStorage, db: Database[Any]) -> None:
    digest = put(managed, "e", "a/big", os.urandom(BIG))
    put(managed, "e", "a/big2", os.urandom(BIG))
    broken = path_doc(db, "e", "a/big")
    db.paths.update_one({"_id": broken["_id"]}, {"$unset": {"resource_id": 1}})
    db.paths.update_one({"env": "e", "path": "a/big2"}, {"$set": {"hash": "cd" * 32}})
    expire_leases(db)

    report = fsck(managed, grace=0)
    # the entry lost the reference of the broken path: that is reported too
    assert report.kinds() == {"malformed_path", "path_mismatch", "refcount_mismatch"}
    problem = one(report.problems, "malformed_path")
    assert problem.collection == "paths" and problem.document_id == str(broken["_id"])
    assert problem.fields == ("resource_id",)
    assert (problem.env, problem.path) == ("e", "a/big")
    assert "'resource_id' is missing" in problem.detail
    assert one(report.problems, "refcount_mismatch").hash == digest
    assert report.paths == 2


def test_path_with_bad_length_and_hash_is_reported(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    put(managed, "e", "a", b"content")
    put(managed, "e", "b", b"content")
    bad = path_doc(db, "e", "a")
    db.paths.update_one({"_id": bad["_id"]}, {"$set": {"length": "abc"}, "$unset": {"hash": 1}})
    db.paths.update_one({"env": "e", "path": "b"}, {"$set": {"resource_id": ["not", "an", "id"]}})

    report = fsck(managed, grace=0)
    assert report.kinds() == {"malformed_path"}
    by_path = {p.path: p for p in report.problems}
    assert by_path["a"].fields == ("hash", "length")
    assert by_path["b"].fields == ("resource_id",)
    assert "list" in by_path["b"].detail


def test_cli_reports_malformed_documents_and_exits_1(
    managed: ManagedStorage, db: Database[Any], mongo_uri: str
) -> None:
    digest = put(managed, "e", "a", os.urandom(BIG))
    put(managed, "e", "n", b"n")
    oid = entry(db, digest)["_id"]
    db.catalog.update_one({"_id": oid}, {"$unset": {"hash": 1}})
    db.paths.update_one({"env": "e", "path": "n"}, {"$unset": {"resource_id": 1}})
    pid = path_doc(db, "e", "n")["_id"]

    result = invoke(mongo_uri, db, "fsck", "--grace", "0")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert f"malformed_entry: catalog document {oid}: field 'hash' is missing" in lines[0]
    assert "e:a" in lines[0]
    assert any(
        line.startswith(f"malformed_path: paths document {pid}: field 'resource_id' is missing")
        for line in lines
    )
    assert "malformed_entry" in result.stderr and "malformed_path" in result.stderr

    result = invoke(mongo_uri, db, "fsck", "--json", "--grace", "0")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    kinds = {p["kind"]: p for p in report["problems"]}
    assert kinds["malformed_entry"]["collection"] == "catalog"
    assert kinds["malformed_entry"]["document_id"] == str(oid)
    assert kinds["malformed_entry"]["field"] == "hash"
    assert kinds["malformed_path"]["collection"] == "paths"
    assert kinds["malformed_path"]["field"] == "resource_id"


# -- 2. lost content names the paths that lose it -----------------------------------------
def three_paths(managed: ManagedStorage, data: bytes) -> str:
    digest = put(managed, "e1", "a/big", data)
    put(managed, "e1", "a/big2", data)
    put(managed, "e2", "x", data)
    put(managed, "e2", "unrelated", b"unrelated")
    return digest


PATHS = (("e1", "a/big"), ("e1", "a/big2"), ("e2", "x"))


def test_missing_chunk_names_its_paths(managed: ManagedStorage, db: Database[Any]) -> None:
    digest = three_paths(managed, os.urandom(BIG))
    file_doc = db["resources.files"].find_one({"filename": entry(db, digest)["path"]})
    assert file_doc is not None
    db["resources.chunks"].delete_one({"files_id": file_doc["_id"], "n": 0})

    (problem,) = fsck(managed, grace=0).problems
    assert problem.kind == "missing_chunk"
    assert problem.paths == PATHS and problem.more_paths == 0
    assert "used by 3 paths: e1:a/big, e1:a/big2, e2:x" in str(problem)
    assert problem.to_dict()["paths"] == [{"env": e, "path": p} for e, p in PATHS]


def test_missing_file_names_its_paths(managed: ManagedStorage, db: Database[Any]) -> None:
    three_paths(managed, os.urandom(BIG))
    db["resources.files"].delete_many({})
    db["resources.chunks"].delete_many({})

    (problem,) = fsck(managed, grace=0).problems
    assert problem.kind == "missing_file" and problem.paths == PATHS


def test_corrupt_content_names_its_paths(managed: ManagedStorage, db: Database[Any]) -> None:
    digest = three_paths(managed, os.urandom(BIG))
    flip_chunk_bit(db, entry(db, digest)["path"], 0, 5)

    (problem,) = fsck(managed, grace=0, verify_content=True).problems
    assert problem.kind == "corrupt_content" and problem.paths == PATHS


def test_lost_inline_bytes_name_their_paths(managed: ManagedStorage, db: Database[Any]) -> None:
    digest = three_paths(managed, b"small content")
    db.catalog.update_one({"hash": digest}, {"$unset": {"data": 1}})
    (problem,) = fsck(managed, grace=0).problems
    assert problem.kind == "missing_file" and problem.paths == PATHS

    db.catalog.update_one({"hash": digest}, {"$set": {"data": b"SMALL content"}})
    (problem,) = fsck(managed, grace=0, verify_content=True).problems
    assert problem.kind == "corrupt_content" and problem.paths == PATHS


def test_paths_are_capped_with_a_count_of_the_rest(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    data = os.urandom(BIG)
    n = PATHS_SHOWN + 7
    for i in range(n):
        put(managed, "e", f"p/{i:04d}", data)
    db["resources.files"].delete_many({})
    db["resources.chunks"].delete_many({})

    (problem,) = fsck(managed, grace=0).problems
    assert problem.kind == "missing_file"
    assert len(problem.paths) == PATHS_SHOWN and problem.more_paths == 7
    assert problem.paths[0] == ("e", "p/0000")
    assert f"used by {n} paths: e:p/0000, " in str(problem)
    assert str(problem).endswith(", and 7 more")
    data_out = problem.to_dict()
    assert len(data_out["paths"]) == PATHS_SHOWN and data_out["more_paths"] == 7


def test_lost_content_without_paths_says_so(managed: ManagedStorage, db: Database[Any]) -> None:
    digest = put(managed, "e", "a", os.urandom(BIG))
    db.paths.delete_many({})  # the reference stays: an uploader may still link it
    db.catalog.update_one({"hash": digest}, {"$set": {"lease_until": utcnow().replace(year=3000)}})
    db["resources.files"].delete_many({})
    db["resources.chunks"].delete_many({})
    (problem,) = fsck(managed, grace=0).problems
    assert problem.kind == "missing_file" and problem.paths == ()
    assert problem.to_dict()["paths"] == []
    assert "used by no path" in str(problem)


def test_cli_lists_the_paths_of_lost_content(
    managed: ManagedStorage, db: Database[Any], mongo_uri: str
) -> None:
    three_paths(managed, os.urandom(BIG))
    db["resources.chunks"].delete_many({})

    result = invoke(mongo_uri, db, "fsck", "--grace", "0")
    assert result.exit_code == 1
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("missing_chunk: ")]
    assert line.endswith("used by 3 paths: e1:a/big, e1:a/big2, e2:x")

    result = invoke(mongo_uri, db, "fsck", "--json", "--grace", "0")
    assert result.exit_code == 1
    (problem,) = json.loads(result.stdout)["problems"]
    assert problem["paths"] == [{"env": e, "path": p} for e, p in PATHS]
    assert problem["more_paths"] == 0


def test_a_path_string_resource_id_stays_dangling(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """A resource id stored as a string is a pointer to nothing (gc repoints it), not malformed."""
    digest = put(managed, "e", "a", b"content")
    oid = entry(db, digest)["_id"]
    db.paths.update_one({"env": "e", "path": "a"}, {"$set": {"resource_id": str(ObjectId())}})
    db.catalog.update_one({"_id": oid}, {"$set": {"refcount": 0}})
    kinds = fsck(managed, grace=0).kinds()
    assert "dangling_path" in kinds and "malformed_path" not in kinds
