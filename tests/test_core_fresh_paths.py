"""New paths made by insert (pathdocs.fresh): revisions, history, CAS, watches, races.

A put whose caller wants no path document back inserts a new path's document
with a server-assigned revision (a Timestamp), instead of the upsert pipeline
every other change uses. Everything that reads revisions and events must see
such a path exactly as if the pipeline had made it.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from bson import Timestamp
from pymongo.database import Database

from catalog import ManagedStorage
from catalog.errors import KeyModifiedError, PreconditionFailedError
from catalog.fsck import fsck
from catalog.pathdocs import revision
from catalog.pathevents import PathEvents
from catalog.resources import INLINE


def _put(managed: ManagedStorage, path: str, data: bytes, env: str = "e") -> None:
    managed.put_for_environment(env, path, io.BytesIO(data), len(data))


def test_a_new_path_is_inserted_with_the_servers_revision(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    before = managed.put_path("e", "a", io.BytesIO(b"one"), 3).revision
    _put(managed, "b", b"two")
    doc = db["paths"].find_one({"env": "e", "path": "b"})
    assert doc is not None
    assert isinstance(doc["rev"], Timestamp), "a new path is inserted, not upserted"
    assert "events" not in doc
    info = managed.stat_for_environment("e", "b")
    assert info.revision == revision(doc["rev"]) > before
    after = managed.put_path("e", "c", io.BytesIO(b"three"), 5).revision
    assert after > info.revision
    history = managed.history_for_environment("e", "b")
    assert [(h["event"], h["revision"], h["length"]) for h in history] == [
        ("create", info.revision, 3)
    ]


def test_the_first_change_keeps_the_create_event_and_its_revision(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    _put(managed, "p", b"first")
    created = managed.stat_for_environment("e", "p").revision
    replaced = managed.put_path("e", "p", io.BytesIO(b"second"), 6).revision
    assert replaced > created
    doc = db["paths"].find_one({"env": "e", "path": "p"})
    assert doc is not None and isinstance(doc["rev"], int)
    history = managed.history_for_environment("e", "p")
    assert [(h["event"], h["revision"]) for h in history] == [
        ("create", created),
        ("replace", replaced),
    ]
    assert managed.get_for_environment("e", "p")[0].read() == b"second"


def test_a_deleted_inserted_path_keeps_its_history(managed: ManagedStorage) -> None:
    _put(managed, "d", b"x")
    created = managed.stat_for_environment("e", "d").revision
    deleted = managed.delete_path("e", "d")
    assert deleted > created
    history = managed.history_for_environment("e", "d")
    assert [(h["event"], h["revision"]) for h in history] == [
        ("create", created),
        ("delete", deleted),
    ]


def test_if_match_on_the_revision_of_an_inserted_path(managed: ManagedStorage) -> None:
    _put(managed, "k", b"v1")
    rev = managed.stat_for_environment("e", "k").revision
    with pytest.raises(PreconditionFailedError):
        managed.put_path("e", "k", io.BytesIO(b"v2"), 2, options=_if_match(rev + 1))
    info = managed.put_path("e", "k", io.BytesIO(b"v2"), 2, options=_if_match(rev))
    assert info.revision > rev
    _put(managed, "gone", b"v")
    rev = managed.stat_for_environment("e", "gone").revision
    with pytest.raises(PreconditionFailedError):
        managed.delete_path("e", "gone", if_match=rev - 1)
    managed.delete_path("e", "gone", if_match=rev)


def _if_match(rev: int) -> Any:
    from catalog.managed import WriteOptions

    return WriteOptions(if_match=rev)


def test_the_kv_store_reads_and_swaps_a_key_put_as_a_path(managed: ManagedStorage) -> None:
    kv = managed.environment("e").kv()
    try:
        _put(managed, "cfg/x", b"plain")
        pair = kv.get("cfg/x")
        assert pair.value == b"plain"
        assert pair.last_index == managed.stat_for_environment("e", "cfg/x").revision
        assert [p.key for p in kv.get_range("cfg")] == ["cfg/x"]
        swapped = kv.atomic_put("cfg/x", b"kv", pair)
        assert swapped.last_index > pair.last_index
        with pytest.raises(KeyModifiedError):
            kv.atomic_put("cfg/x", b"stale", pair)
        _put(managed, "cfg/y", b"plain")
        kv.atomic_delete("cfg/y", kv.get("cfg/y"))
        assert not kv.exists("cfg/y")
    finally:
        kv.close()


def test_a_key_watch_sees_a_path_inserted_after_it_started(managed: ManagedStorage) -> None:
    kv = managed.environment("e").kv()
    stop = threading.Event()
    try:
        watch = kv.watch("w", stop=stop)
        assert next(watch) is None
        _put(managed, "w", b"hello")
        pair = next(watch)
        assert pair is not None and pair.value == b"hello"
        assert pair.last_index == managed.stat_for_environment("e", "w").revision
        managed.put_path("e", "w", io.BytesIO(b"again"), 5)
        pair2 = next(watch)
        assert pair2 is not None and pair2.value == b"again"
        assert pair2.last_index > pair.last_index
    finally:
        stop.set()
        kv.close()


def test_path_events_replay_an_inserted_path_since_a_revision(managed: ManagedStorage) -> None:
    since = managed.put_path("e", "r/0", io.BytesIO(b"0"), 1).revision
    _put(managed, "r/1", b"1")
    _put(managed, "r/2", b"2")
    managed.put_path("e", "r/2", io.BytesIO(b"22"), 2)
    with PathEvents(managed, "e", prefix="r/", since=since) as events:
        got = [e for e in (events.next() for _ in range(3)) if e is not None]
    assert [(g["path"], g["length"]) for g in got] == [("r/1", 1), ("r/2", 1), ("r/2", 2)]
    revs = [g["revision"] for g in got]
    assert revs == sorted(revs) and revs[0] > since


def test_sixteen_threads_put_new_and_the_same_paths(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Batched inserts: each new path once; racing first writers of one path all succeed."""
    errors: list[BaseException] = []

    def run(t: int) -> None:
        try:
            for i in range(30):
                _put(managed, f"own/{t}/{i}", f"{t}-{i}".encode())
                _put(managed, f"shared/{i}", f"{t}-{i}".encode())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert db["paths"].count_documents({"env": "e", "path": {"$regex": "^own/"}}) == 480
    for t in (0, 15):
        reader, _ = managed.get_for_environment("e", f"own/{t}/7")
        assert reader.read() == f"{t}-7".encode()
    for i in range(30):
        value = managed.get_for_environment("e", f"shared/{i}")[0].read()
        assert value in {f"{t}-{i}".encode() for t in range(16)}
    entries = db["catalog"].count_documents({"path": INLINE})
    assert entries == 480  # each distinct value once: the shared paths hold own/ values
    # Each thread's puts ran one after another: their revisions grow in that order
    # (concurrent changes of different paths may share one).
    revs = {
        d["path"]: revision(d["rev"]) for d in db["paths"].find({"env": "e"}, {"rev": 1, "path": 1})
    }
    for t in range(16):
        mine = [revs[f"own/{t}/{i}"] for i in range(30)]
        assert mine == sorted(mine) and len(set(mine)) == 30
    report = fsck(managed, grace=0, verify_content=True)
    assert report.clean, report


def test_a_put_that_answers_beside_inserted_paths(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """put_path wants its revision back: it inserts, reads the revision the server gave back,
    and orders with the other inserted paths."""
    from catalog.managed import WriteOptions

    _put(managed, "before", b"b")
    info = managed.put_path("e", "n", io.BytesIO(b"new"), 3)
    doc = db["paths"].find_one({"env": "e", "path": "n"})
    assert doc is not None and isinstance(doc["rev"], Timestamp)
    assert info.revision == revision(doc["rev"])
    assert info.revision == managed.stat_for_environment("e", "n").revision
    assert info.revision > managed.stat_for_environment("e", "before").revision
    _put(managed, "after", b"a")
    assert managed.stat_for_environment("e", "after").revision > info.revision
    with pytest.raises(PreconditionFailedError):
        managed.put_path(
            "e", "after", io.BytesIO(b"x"), 1, options=WriteOptions(if_none_match=True)
        )
    assert managed.get_for_environment("e", "after")[0].read() == b"a"


def test_create_only_replaces_an_expired_ttl_path(managed: ManagedStorage) -> None:
    import datetime

    from catalog.managed import WriteOptions

    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    managed.put_path("e", "t", io.BytesIO(b"old"), 3, options=WriteOptions(expires_at=past))
    info = managed.put_path("e", "t", io.BytesIO(b"y"), 1, options=WriteOptions(if_none_match=True))
    assert managed.get_for_environment("e", "t")[0].read() == b"y"
    assert info.revision == managed.stat_for_environment("e", "t").revision


def test_an_inserted_path_moved_away_keeps_its_create_event(managed: ManagedStorage) -> None:
    _put(managed, "mv/a", b"moving")
    created = managed.stat_for_environment("e", "mv/a").revision
    moved = managed.move_for_environment("e", "mv/a", "mv/b")
    assert moved.revision > created
    left = managed.history_for_environment("e", "mv/a")
    assert (left[0]["event"], left[0]["revision"]) == ("create", created)
    assert left[-1]["event"] == "move" and left[-1]["revision"] > created
    assert [h["event"] for h in managed.history_for_environment("e", "mv/b")] == ["move"]
    assert managed.get_for_environment("e", "mv/b")[0].read() == b"moving"


def test_a_refused_condition_names_the_current_revision_as_a_number(
    managed: ManagedStorage,
) -> None:
    """A path made by insert keeps its revision as a Timestamp until its first change:
    a refused put said `changed (revision Timestamp(1796..., 3))`, a refused delete not
    which revision the path was at."""
    from catalog.kv import KVStore
    from catalog.managed import WriteOptions

    managed.put_for_environment("e", "p", io.BytesIO(b"one"))
    assert isinstance(managed.paths.find_one({"path": "p"})["rev"], Timestamp)
    now = managed.stat_for_environment("e", "p").revision
    with pytest.raises(PreconditionFailedError, match=rf"changed \(revision {now}\)$"):
        managed.put_path("e", "p", io.BytesIO(b"two"), 3, options=WriteOptions(if_match=1))
    with pytest.raises(PreconditionFailedError, match=rf"changed \(revision {now}\), does not"):
        managed.delete_path("e", "p", if_match=1)
    store = KVStore(managed, "e")
    try:
        with pytest.raises(Exception, match="no such key 'nope'"):
            store.delete("nope")
    finally:
        store.close()


def test_answered_inserts_from_many_threads_each_get_their_own_revision(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Answered puts of new paths go as one insert and one read: each answer is its path's."""
    infos: dict[str, int] = {}
    barrier = threading.Barrier(16)

    def put(t: int) -> None:
        barrier.wait()
        for i in range(10):
            path = f"many/{t}/{i}"
            infos[path] = managed.put_path("e", path, io.BytesIO(path.encode()), -1).revision

    threads = [threading.Thread(target=put, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(infos) == 160 and len(set(infos.values())) == 160
    for doc in db["paths"].find({"env": "e", "path": {"$regex": "^many/"}}):
        assert isinstance(doc["rev"], Timestamp)
        assert infos[doc["path"]] == revision(doc["rev"])


def test_the_revision_of_an_insert_changed_before_its_read(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """Between an answered insert and its read another writer may change or delete the path:
    the answer is still the insert's revision, from the create event the change wrote out."""
    from catalog.pathdocs import _of_insert, fresh

    _put(managed, "content", b"")
    target = db["paths"].find_one({"env": "e", "path": "content"})
    assert target is not None
    doc = fresh("e", "raced", target, {})
    db["paths"].insert_one(doc)  # the insert, as insert_fresh makes it
    created = revision(db["paths"].find_one({"_id": doc["_id"]})["rev"])  # type: ignore[index]
    assert _of_insert(db["paths"], doc) == 0  # unchanged: insert_fresh reads `rev` itself
    _put(managed, "raced", b"changed")  # ...changed before the read
    assert managed.stat_for_environment("e", "raced").revision > created
    assert _of_insert(db["paths"], doc) == created
    managed.delete_path("e", "raced")  # ...or deleted: its events are in its history
    assert _of_insert(db["paths"], doc) == created
    _put(managed, "raced", b"again")  # a later incarnation's create is not the insert's
    assert _of_insert(db["paths"], doc) == created
    # ...even one created with the same bytes in the same millisecond (then changed): the
    # live document was searched by path first, and its create event taken for ours.
    managed.delete_path("e", "raced")
    twin = fresh("e", "raced", target, {})
    twin["created_at"] = doc["created_at"]
    db["paths"].insert_one(twin)
    managed.put_path("e", "raced", io.BytesIO(b"x"), 1)  # writes the twin's create event out
    twin_rev = _of_insert(db["paths"], twin)
    assert twin_rev not in (0, created)
    assert _of_insert(db["paths"], doc) == created


def test_writing_an_expired_ttl_key_again_creates_it_anew(managed: ManagedStorage) -> None:
    """An expired key is gone from every read; a write of it was recorded as `replace`, and
    kept the expired key's created_at, though nothing was there to replace."""
    import datetime
    import time

    from catalog.managed import WriteOptions

    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    for how in ("plain", "create-only"):
        key = f"lease-{how}"
        managed.put_path(
            "e", key, io.BytesIO(b"holder-1"), 8, options=WriteOptions(expires_at=past)
        )
        first = managed.history_for_environment("e", key)[-1]["at"]
        time.sleep(0.05)
        options = WriteOptions(if_none_match=how == "create-only")
        info = managed.put_path("e", key, io.BytesIO(b"holder-2"), 8, options=options)
        assert [h["event"] for h in managed.history_for_environment("e", key)] == [
            "create",
            "create",
        ]
        assert info.created_at > first
        assert managed.stat_for_environment("e", key).created_at == info.created_at
        live = managed.put_path("e", key, io.BytesIO(b"holder-3"), 8)  # not expired: a replace
        assert live.created_at == info.created_at
        assert managed.history_for_environment("e", key)[-1]["event"] == "replace"
