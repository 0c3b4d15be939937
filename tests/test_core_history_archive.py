"""History is kept by age, not by count: a path's older events go to `path_archive`.

The contract: one history item per operation, kept `--history-days`. Before
the archive, a history document was cut back to its newest 1,024 events, so a
hot key lost its past (and a watch resuming from before it got 410) after
about a thousand changes, whatever its age.
"""

from __future__ import annotations

import datetime
import io
from typing import Any

import pytest
from pymongo.database import Database

from catalog import ManagedStorage, RequestExpiredError
from catalog import history as hist
from catalog.pathdocs import HISTORY_CAP, HISTORY_KEPT, SPILL_AT
from catalog.pathevents import PathEvents
from tests.helpers import b3


def _replay(managed: ManagedStorage, since: int, **match: str) -> list[dict[str, Any]]:
    with PathEvents(managed, "e", since=since, **match) as events:
        out = []
        while (item := events.next()) is not None:
            out.append(item)
        return out


def _past(n: int, path: str) -> list[dict[str, Any]]:
    """`n` replace events, as a long-lived path's history document would hold them."""
    now = hist.utcnow()
    return [
        {
            "at": now,
            "event": "replace",
            "state": "ok",
            "hash": b3(f"{path}-old{j}".encode()),
            "length": 8,
            "revision": j + 1,
        }
        for j in range(n)
    ]


def test_a_hot_key_keeps_every_change(managed: ManagedStorage, db: Database[Any]) -> None:
    """2,400 puts of one key: all in its history, all replayed from the first, none twice."""
    n = HISTORY_KEPT + SPILL_AT * 6
    revisions = []
    for i in range(n):
        data = f"v{i}".encode()
        revisions.append(managed.put_path("e", "hot", io.BytesIO(data), len(data)).revision)
    shown = managed.history_for_environment("e", "hot")
    assert [e["hash"] for e in shown] == [b3(f"v{i}".encode()) for i in range(n)]
    assert [e["revision"] for e in shown] == revisions
    assert [e["event"] for e in shown] == ["create"] + ["replace"] * (n - 1)
    # The documents every write rewrites stay small; the rest sits in buckets.
    held = db["path_history"].find_one({"env": "e", "path": "hot"})
    assert held is not None and len(held["events"]) <= HISTORY_KEPT + SPILL_AT
    assert db["path_archive"].count_documents({"env": "e", "path": "hot"}) >= 1
    replayed = _replay(managed, revisions[0], key="hot")
    assert [e["revision"] for e in replayed] == revisions[1:]
    assert [e["hash"] for e in replayed] == [b3(f"v{i}".encode()) for i in range(1, n)]


def test_a_path_deleted_and_made_again_keeps_every_change(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Deletes grow the history document too; past HISTORY_KEPT it is archived after commit."""
    past = _past(HISTORY_KEPT - 5, "cycle")
    db["path_history"].insert_one({"env": "e", "path": "cycle", "events": past})
    revisions = []
    for i in range(6):
        data = f"c{i}".encode()
        revisions.append(managed.put_path("e", "cycle", io.BytesIO(data), len(data)).revision)
        revisions.append(managed.delete_path("e", "cycle"))
    held = db["path_history"].find_one({"env": "e", "path": "cycle"})
    assert held is not None and len(held["events"]) <= HISTORY_CAP + 12
    assert db["path_archive"].count_documents({"env": "e", "path": "cycle"}) == 1
    shown = managed.history_for_environment("e", "cycle")
    assert [e["revision"] for e in shown] == [e["revision"] for e in past] + revisions
    assert [e["event"] for e in shown[-12:]] == ["create", "delete"] * 6
    replayed = _replay(managed, 0, key="cycle")
    assert [e["revision"] for e in replayed] == [e["revision"] for e in past] + revisions
    assert [e["type"] for e in replayed[-12:]] == ["put", "delete"] * 6


def test_a_move_away_archives_the_full_history_of_its_source(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    past = _past(HISTORY_KEPT, "src")
    db["path_history"].insert_one({"env": "e", "path": "src", "events": past})
    managed.put_path("e", "src", io.BytesIO(b"x"), 1)
    managed.move_for_environment("e", "src", "dst")
    assert db["path_archive"].count_documents({"env": "e", "path": "src"}) == 1
    shown = managed.history_for_environment("e", "src")
    assert [e["event"] for e in shown[-2:]] == ["create", "move"]
    assert len(shown) == len(past) + 2


def test_a_copy_left_behind_by_a_crash_is_shown_once(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Archived but not yet dropped from the history document: each event once."""
    past = _past(HISTORY_KEPT + 1, "p")
    db["path_history"].insert_one({"env": "e", "path": "p", "events": past})
    moved = past[: len(past) - HISTORY_CAP]
    db["path_archive"].insert_one(  # what archive_old copies before it drops
        {"env": "e", "path": "p", "first_rev": 1, "last_rev": len(moved), "events": moved}
    )
    data = b"now"
    rev = managed.put_path("e", "p", io.BytesIO(data), len(data)).revision
    expected = [e["revision"] for e in past] + [rev]
    assert [e["revision"] for e in managed.history_for_environment("e", "p")] == expected
    assert [e["revision"] for e in _replay(managed, 0, key="p")] == expected
    # The next writer that finds the document full archives it again: still once each.
    managed._archive_old("e", "p")
    assert len(db["path_history"].find_one({"env": "e", "path": "p"})["events"]) == HISTORY_CAP
    assert [e["revision"] for e in managed.history_for_environment("e", "p")] == expected
    assert [e["revision"] for e in _replay(managed, 0, prefix="")] == expected


def test_an_upload_running_stays_in_the_history_document(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Its uploader renews and finishes it there; failed ones are archived with the rest."""
    past = _past(HISTORY_KEPT + 10, "up")
    op = hist.start_upload(managed.history, "e", "up", 60.0, replacing=False)
    failed = hist.utcnow()
    db["path_history"].update_one(
        {"env": "e", "path": "up"},
        {
            "$push": {
                "events": {
                    "$each": [
                        {
                            **past[0],
                            "event": "upload",
                            "state": "failed",
                            "revision": 0,
                            "op": "gone-op",
                            "at": failed,
                        },
                        *past,
                    ],
                    "$position": 0,
                }
            }
        },
    )
    managed._archive_old("e", "up")
    doc = db["path_history"].find_one({"env": "e", "path": "up"})
    assert next(e for e in doc["events"] if e.get("op") == op)["state"] == "pending"
    assert not [e for e in doc["events"] if e.get("op") == "gone-op"]
    archived = db["path_archive"].find_one({"env": "e", "path": "up"})
    assert [e["op"] for e in archived["events"] if "op" in e] == ["gone-op"]
    assert hist.upload_in_progress(managed.history, "e", "up")
    hist.finish_upload(managed.history, "e", "up", op, ok=False)
    states = [e["state"] for e in managed.history_for_environment("e", "up") if "op" in e]
    assert sorted(states) == ["failed", "failed"]


def test_retention_by_age_trims_the_archive_and_raises_the_floor(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    if not managed._updates.pipelines:
        pytest.skip("the in-memory store never archives")
    past = _past(HISTORY_KEPT + 1, "aged")
    db["path_history"].insert_one({"env": "e", "path": "aged", "events": past})
    managed._archive_old("e", "aged")
    archived = len(past) - HISTORY_CAP
    assert db["path_archive"].count_documents({}) == 1
    old = hist.utcnow() - datetime.timedelta(days=40)
    db["path_archive"].update_many({}, {"$set": {"events.$[].at": old}})
    collections = [managed.paths, managed.history, managed.archive]
    assert hist.count_trimmable(collections, 30) == archived
    assert hist.trim(collections, 30) == archived
    assert db["path_archive"].count_documents({}) == 0  # emptied buckets go
    assert hist.floor(db, "e") == archived  # the largest revision trimmed
    shown = managed.history_for_environment("e", "aged")
    assert [e["revision"] for e in shown] == [e["revision"] for e in past[archived:]]
    with pytest.raises(RequestExpiredError):
        _replay(managed, archived - 1, key="aged")
    assert len(_replay(managed, archived, key="aged")) == HISTORY_CAP


def test_history_is_read_a_bucket_at_a_time(managed: ManagedStorage, db: Database[Any]) -> None:
    """iter_history reads the archive lazily; failed uploads there keep their place by time."""
    if not managed._updates.pipelines:
        pytest.skip("the in-memory store never archives")
    t0 = hist.utcnow() - datetime.timedelta(hours=1)
    past = _past(HISTORY_KEPT * 2, "long")
    for j, e in enumerate(past):
        e["at"] = t0 + datetime.timedelta(seconds=j)
    failed = {
        "op": "f1",
        "at": t0 + datetime.timedelta(seconds=10.5),  # between the 11th and 12th change
        "event": "upload",
        "state": "failed",
        "hash": "",
        "length": 0,
        "revision": 0,
    }
    db["path_history"].insert_one({"env": "e", "path": "long", "events": [failed, *past[:2100]]})
    managed._archive_old("e", "long")
    db["path_history"].update_one(
        {"env": "e", "path": "long"}, {"$push": {"events": {"$each": past[2100:]}}}
    )
    managed._archive_old("e", "long")
    assert db["path_archive"].count_documents({"env": "e", "path": "long"}) == 2
    events = managed.iter_history("e", "long")
    first = next(events)  # the recent documents and the uploads: no bucket read yet
    assert first["revision"] == 1
    shown = [first, *events]
    assert [e["revision"] for e in shown] == [*range(1, 12), 0, *range(12, len(past) + 1)]
    assert shown[11]["state"] == "failed"
    assert managed.history_for_environment("e", "long") == shown


class _ThenSpill:
    """A collection whose first read (of either proxy sharing `state`) is followed by a spill."""

    def __init__(self, collection: Any, state: dict[str, Any]) -> None:
        self._collection = collection
        self._state = state

    def find_one(self, *args: Any, **kwargs: Any) -> Any:
        doc = self._collection.find_one(*args, **kwargs)
        if not self._state["done"]:
            self._state["done"] = True
            self._state["spill"]()
        return doc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._collection, name)


def test_a_spill_between_the_reads_of_a_history_hides_nothing(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Events move from the path document to its history document while it is listed."""
    n = SPILL_AT + 1
    managed._spill_if_full = lambda *args: None  # type: ignore[method-assign]
    for i in range(n):
        managed.put_for_environment("e", "p", io.BytesIO(f"v{i}".encode()))
    assert len(db["paths"].find_one({"env": "e", "path": "p"})["events"]) == n
    state: dict[str, Any] = {"done": False}
    state["spill"] = lambda: ManagedStorage._spill(managed, "e", "p")
    managed.paths = _ThenSpill(managed.paths, state)  # type: ignore[assignment]
    managed.history = _ThenSpill(managed.history, state)  # type: ignore[assignment]
    shown = managed.history_for_environment("e", "p")
    assert state["done"]
    assert len(db["path_history"].find_one({"env": "e", "path": "p"})["events"]) > 0  # it ran
    assert [e["hash"] for e in shown] == [b3(f"v{i}".encode()) for i in range(n)]
