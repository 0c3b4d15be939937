"""Per-path history: events in order, kept after delete and across instances; pending uploads."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import bson
import pytest
from pymongo.database import Database

from catalog import HashMismatchError, ManagedStorage, NotFoundError, PreconditionFailedError
from catalog import history as hist
from catalog.managed import WriteOptions
from storage import GridFSStorage
from tests.helpers import BrokenReader, OneWayReader, b3, rand


def events(managed: ManagedStorage, path: str) -> list[tuple[str, str]]:
    return [(e["event"], e["state"]) for e in managed.history_for_environment("e", path)]


def test_create_twenty_replaces_delete_in_order_and_after_restart(db: Database[Any]) -> None:
    managed = ManagedStorage(db, GridFSStorage(db))
    managed.put_for_environment("e", "p", io.BytesIO(b"v0"))
    for i in range(1, 21):
        managed.put_for_environment("e", "p", io.BytesIO(f"v{i}".encode()))
    managed.remove_for_environment("e", "p")
    items = managed.history_for_environment("e", "p")
    assert [e["event"] for e in items] == ["create"] + ["replace"] * 20 + ["delete"]
    assert all(e["state"] == "ok" for e in items)
    revisions = [e["revision"] for e in items]
    assert revisions == sorted(set(revisions))
    assert items[5]["hash"] == b3(b"v5") and items[5]["length"] == 2
    assert all(e["at"].tzinfo is not None for e in items)
    again = ManagedStorage(db, GridFSStorage(db)).history_for_environment("e", "p")
    assert again == items
    # A new life of the path continues the same history, with larger revisions.
    managed.put_for_environment("e", "p", io.BytesIO(b"back"))
    items = managed.history_for_environment("e", "p")
    assert [e["event"] for e in items][-2:] == ["delete", "create"]
    assert items[-1]["revision"] > items[-2]["revision"]


def test_move_is_recorded_on_both_paths(managed: ManagedStorage) -> None:
    managed.put_for_environment("e", "a", io.BytesIO(b"x"))
    managed.move_for_environment("e", "a", "b")
    assert events(managed, "a") == [("create", "ok"), ("move", "ok")]
    assert events(managed, "b") == [("move", "ok")]


def test_pending_while_the_first_upload_runs(managed: ManagedStorage) -> None:
    data = rand(3 * 1024 * 1024)
    gate = threading.Event()

    class Slow(OneWayReader):
        def read(self, size: int | None = -1) -> bytes:
            if self._pos > 1024 * 1024:
                gate.wait(30)
            return super().read(size)

    thread = threading.Thread(
        target=managed.put_for_environment, args=("e", "new", Slow(data, step=256 * 1024))
    )
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while events(managed, "new") != [("upload", "pending")]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(NotFoundError):
            managed.stat_for_environment("e", "new")
        assert managed.list_for_environment("e") == []
        with pytest.raises(PreconditionFailedError):  # create-only: its first upload runs
            managed.put_path("e", "new", io.BytesIO(b"x"), options=WriteOptions(if_none_match=True))
    finally:
        gate.set()
        thread.join(60)
    assert events(managed, "new") == [("create", "ok")]
    reader, _ = managed.get_for_environment("e", "new")
    assert reader.read() == data


def test_failed_upload_is_recorded(managed: ManagedStorage) -> None:
    with pytest.raises(OSError):
        managed.put_for_environment("e", "p", BrokenReader(rand(200_000), 150_000))
    assert events(managed, "p") == [("upload", "failed")]
    with pytest.raises(NotFoundError):
        managed.stat_for_environment("e", "p")


def test_a_failed_small_upload_is_recorded_in_its_place(managed: ManagedStorage) -> None:
    """Small puts (content kept in the catalog entry) left no item when they failed,
    and failed uploads of any size were listed before every change, not where they ran."""
    managed.put_for_environment("e", "p", io.BytesIO(b"v1"))
    with pytest.raises(HashMismatchError):
        managed.put_for_environment_and_check_hash("e", "p", io.BytesIO(b"v2"), 2, "0" * 64)
    with pytest.raises(OSError):
        managed.put_for_environment("e", "p", BrokenReader(rand(2_000), 1_000))
    managed.put_for_environment("e", "p", io.BytesIO(b"v3"))
    with pytest.raises(HashMismatchError):
        big = rand(200_000)
        managed.put_for_environment_and_check_hash("e", "p", io.BytesIO(big), len(big), "0" * 64)
    assert events(managed, "p") == [
        ("create", "ok"),
        ("upload", "failed"),
        ("upload", "failed"),
        ("replace", "ok"),
        ("upload", "failed"),
    ]
    # A refused condition stored nothing and is not an upload that failed.
    with pytest.raises(PreconditionFailedError):
        managed.put_path("e", "p", io.BytesIO(b"v4"), 2, options=WriteOptions(if_match=1))
    assert len(events(managed, "p")) == 5
    assert managed.get_for_environment("e", "p")[0].read() == b"v3"


def test_abandoned_upload_becomes_failed_when_its_lease_runs_out(managed: ManagedStorage) -> None:
    hist.start_upload(managed.history, "e", "p", 0.1, replacing=False)  # an uploader that died
    assert hist.upload_in_progress(managed.history, "e", "p")
    time.sleep(0.2)
    assert not hist.upload_in_progress(managed.history, "e", "p")
    assert hist.fail_abandoned(managed.history) == 1
    assert events(managed, "p") == [("upload", "failed")]


def test_retention_by_age(managed: ManagedStorage, db: Database[Any]) -> None:
    managed.put_for_environment("e", "p", io.BytesIO(b"1"))
    managed.put_for_environment("e", "p", io.BytesIO(b"2"))
    db.paths.update_one({"path": "p"}, {"$set": {"events.0.at": hist.utcnow().replace(year=2000)}})
    assert hist.trim([managed.paths, managed.history], 30) == 1
    assert events(managed, "p") == [("replace", "ok")]


def test_a_hot_path_keeps_its_history_beside_a_small_document(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Older events move to the history document; the path's own stays small; none repeat."""
    from catalog.pathdocs import HISTORY_CAP, SPILL_AT

    n = HISTORY_CAP + 100
    for i in range(n):
        managed.put_for_environment("e", "hot", io.BytesIO(f"v{i}".encode()))
        if i in (SPILL_AT - 1, SPILL_AT + 1, 600, n - 1):
            events = managed.history_for_environment("e", "hot")
            assert [e["hash"] for e in events] == [b3(f"v{j}".encode()) for j in range(i + 1)]
            revisions = [e["revision"] for e in events]
            assert revisions == sorted(set(revisions))
            doc = db["paths"].find_one({"env": "e", "path": "hot"})
            assert doc is not None and len(doc["events"]) <= SPILL_AT + 1


def test_a_spill_cut_short_shows_each_event_once(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Copied to the history but not yet dropped from the path (a crash between): shown once."""
    for i in range(20):
        managed.put_for_environment("e", "p", io.BytesIO(f"v{i}".encode()))
    doc = db["paths"].find_one({"env": "e", "path": "p"})
    assert doc is not None
    db["path_history"].update_one(
        {"env": "e", "path": "p"}, {"$push": {"events": {"$each": doc["events"][:10]}}}, upsert=True
    )
    events = managed.history_for_environment("e", "p")
    assert [e["hash"] for e in events] == [b3(f"v{j}".encode()) for j in range(20)]


def test_changes_since_a_revision_replay_across_the_moved_history(managed: ManagedStorage) -> None:
    """A watch from a revision older than the path document's events replays, not 410."""
    from catalog.pathdocs import SPILL_AT
    from catalog.pathevents import PathEvents

    revisions = []
    for i in range(SPILL_AT * 3):
        data = f"v{i}".encode()
        info = managed.put_path("e", "k", io.BytesIO(data), len(data))
        revisions.append(info.revision)
    since = revisions[9]
    with PathEvents(managed, "e", key="k", since=since) as events:
        replayed = []
        while (item := events.next()) is not None:
            replayed.append(item)
    assert [e["revision"] for e in replayed] == revisions[10:]
    assert [e["hash"] for e in replayed] == [b3(f"v{i}".encode()) for i in range(10, SPILL_AT * 3)]


def test_a_change_of_a_hot_path_is_logged_as_one_event_not_its_whole_history(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """The oplog (and so the journal and every change stream) carries what changed."""
    from catalog.pathdocs import EVENTS_CAP

    if not managed._updates.pipelines:
        pytest.skip("the in-memory store has no oplog")
    for i in range(EVENTS_CAP + 20):
        managed.put_for_environment("e", "hot", io.BytesIO(f"v{i}".encode()))
    oplog = db.client["local"]["oplog.rs"]
    sizes = [
        len(bson.encode(entry))
        for entry in oplog.find({"ns": f"{db.name}.paths", "op": "u"})
        .sort("$natural", -1)
        .limit(10)
    ]
    assert len(sizes) == 10
    # one event is ~400 bytes, the whole history 30+ KB; one in LIVE_EVENTS changes is
    # the move of the older events to the history document (a few KB)
    assert sorted(sizes)[8] < 2048, sizes


def test_a_move_to_a_long_history_is_logged_as_the_events_moved(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """A hot key's past fills its history document; a move there still logs only itself."""
    from catalog.pathdocs import HISTORY_CAP, HISTORY_KEPT, LIVE_EVENTS, SPILL_AT

    if not managed._updates.pipelines:
        pytest.skip("the in-memory store has no oplog")
    past = [
        {
            "at": hist.utcnow(),
            "event": "replace",
            "state": "ok",
            "hash": b3(f"old{j}".encode()),
            "length": 4,
            "revision": j + 1,
        }
        for j in range(HISTORY_KEPT - 40)
    ]
    db["path_history"].insert_one({"env": "e", "path": "hot", "events": past})
    oplog = db.client["local"]["oplog.rs"]

    def last_move() -> int:
        entry = oplog.find_one(
            {"ns": f"{db.name}.path_history", "op": "u"}, sort=[("$natural", -1)]
        )
        assert entry is not None
        return len(bson.encode(entry))

    def stored() -> int:
        doc = db["path_history"].find_one({"env": "e", "path": "hot"})
        assert doc is not None
        return len(doc["events"])

    put = 0
    for _ in range(SPILL_AT + 1):  # the first move: 33 events, still under HISTORY_KEPT
        managed.put_for_environment("e", "hot", io.BytesIO(f"v{put}".encode()))
        put += 1
    moved = SPILL_AT + 1 - LIVE_EVENTS
    assert stored() == len(past) + moved
    # ~400 bytes an event moved; the whole history would be ~2,000 events (300+ KB)
    assert last_move() < 600 * moved, last_move()
    shown = managed.history_for_environment("e", "hot")
    assert len(shown) == len(past) + put  # all of it: the history's, then the path's
    assert [e["hash"] for e in shown[-put:]] == [b3(f"v{j}".encode()) for j in range(put)]
    while stored() <= HISTORY_KEPT - moved:  # on until a move passes HISTORY_KEPT: archived
        managed.put_for_environment("e", "hot", io.BytesIO(f"v{put}".encode()))
        put += 1
    for _ in range(SPILL_AT):
        managed.put_for_environment("e", "hot", io.BytesIO(f"v{put}".encode()))
        put += 1
    assert stored() <= HISTORY_CAP + SPILL_AT
    assert db["path_archive"].count_documents({"env": "e", "path": "hot"}) == 1
    shown = managed.history_for_environment("e", "hot")
    assert [e["hash"] for e in shown] == [e["hash"] for e in past] + [
        b3(f"v{j}".encode()) for j in range(put)
    ]
    revisions = [e["revision"] for e in shown]
    assert revisions == sorted(set(revisions))


def test_a_refused_condition_of_a_streamed_put_is_no_failed_upload(
    managed: ManagedStorage,
) -> None:
    """A small put refused by its condition leaves no history item; a streamed one (past
    the inline size) left an `upload failed`, though the bytes were stored and nothing
    was uploaded in vain."""
    import os

    from catalog.errors import PreconditionFailedError
    from catalog.managed import WriteOptions

    data = os.urandom(200_000)
    managed.put_path("e", "k", io.BytesIO(data), len(data))
    for options in (WriteOptions(if_match=5), WriteOptions(if_none_match=True)):
        with pytest.raises(PreconditionFailedError):
            managed.put_path("e", "k", io.BytesIO(os.urandom(200_000)), 200_000, options=options)
    events = [(h["event"], h["state"]) for h in managed.history_for_environment("e", "k")]
    assert events == [("create", "ok")]
