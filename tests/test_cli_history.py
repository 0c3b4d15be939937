"""`rescat history` and gc's history options, on a real mongod."""

from __future__ import annotations

import datetime
import io
import json
from typing import Any

import pytest
from click.testing import CliRunner
from pymongo.database import Database

import cli.main  # noqa: F401  (registers every command)
from catalog import ManagedStorage, NotFoundError
from catalog.clock import utcnow
from catalog.gc import gc
from cli.app import cli as rescat


def invoke(mongo_uri: str, db: Database[Any], *args: str) -> Any:
    base = ["--mongo-uri", mongo_uri, "--database", db.name]
    return CliRunner().invoke(rescat, [*base, *args], catch_exceptions=False)


def test_history_text_and_json(mongo_uri: str, db: Database[Any], managed: ManagedStorage) -> None:
    managed.put_for_environment("e", "a.txt", io.BytesIO(b"one"))
    managed.put_for_environment("e", "a.txt", io.BytesIO(b"two"))
    managed.move_for_environment("e", "a.txt", "b.txt")
    managed.remove_for_environment("e", "b.txt")

    text = invoke(mongo_uri, db, "history", "e", "a.txt")
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert [line.split()[1:3] for line in lines] == [
        ["create", "ok"],
        ["replace", "ok"],
        ["move", "ok"],
    ]
    assert "blake3:" in lines[0] and lines[0].split()[0].endswith("Z")

    as_json = invoke(mongo_uri, db, "history", "e", "b.txt", "--json")
    items = json.loads(as_json.output)["items"]
    assert [i["event"] for i in items] == ["move", "delete"]
    assert set(items[0]) == {"at", "event", "state", "hash", "length", "revision"}

    with pytest.raises(NotFoundError, match="no history"):  # main() prints it on one line
        invoke(mongo_uri, db, "history", "e", "never")


def test_gc_trims_history_by_age(
    mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    managed.put_for_environment("e", "old", io.BytesIO(b"1"))
    managed.put_for_environment("e", "old", io.BytesIO(b"2"))
    managed.remove_for_environment("e", "old")
    managed.put_for_environment("e", "kept", io.BytesIO(b"3"))
    # Age the events of "old" by 40 days.
    aged = utcnow() - datetime.timedelta(days=40)
    managed.history.update_many({}, {"$set": {"events.$[].at": aged}})

    dry = gc(managed, grace=0, dry_run=True)
    assert dry.history_trimmed == 3 and managed.history_for_environment("e", "old")  # predicted
    done = invoke(mongo_uri, db, "gc", "--grace", "0", "--history-days", "30", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["history_trimmed"] >= 1 and report["history_days"] == 30
    assert managed.history_for_environment("e", "old") == []
    assert [e["event"] for e in managed.history_for_environment("e", "kept")] == ["create"]


def test_retention_drops_the_create_of_a_path_never_changed(managed: ManagedStorage) -> None:
    """A path made by insert keeps no events: its create is implied by created_at, and
    retention, which pulls stored events, kept it forever."""
    from bson import Timestamp

    from catalog import history as hist
    from catalog.errors import RequestExpiredError
    from catalog.pathevents import PathEvents

    managed.put_for_environment("e", "once", io.BytesIO(b"1"))
    managed.put_for_environment("e", "young", io.BytesIO(b"2"))
    assert isinstance(managed.paths.find_one({"path": "once"})["rev"], Timestamp)
    rev = managed.stat_for_environment("e", "once").revision
    aged = utcnow() - datetime.timedelta(days=40)
    managed.paths.update_one({"path": "once"}, {"$set": {"created_at": aged}})

    assert gc(managed, grace=0, dry_run=True).history_trimmed == 1
    assert gc(managed, grace=0).history_trimmed == 1
    assert managed.history_for_environment("e", "once") == []
    assert [e["event"] for e in managed.history_for_environment("e", "young")] == ["create"]
    assert hist.floor(managed.db, "e") == rev
    with pytest.raises(RequestExpiredError):  # a replay from before it: 410, as for any trim
        PathEvents(managed, "e", since=rev - 1)
    reader, _ = managed.get_for_environment("e", "once")  # the path itself stays
    with reader:
        assert reader.read() == b"1"
    managed.put_for_environment("e", "once", io.BytesIO(b"3"))  # and changes as any path
    assert [e["event"] for e in managed.history_for_environment("e", "once")] == ["replace"]
