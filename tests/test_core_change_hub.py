"""The shared change stream (catalog.changehub) behind every PathChanges of a database.

Real mongod, real threads: many watchers cost mongod one change-stream cursor;
a watcher attached at any moment under load misses and repeats nothing after
its read; a start the hub cannot cover falls back to a stream of its own; the
hub resumes from its token for everyone; the per-watcher filters hold; a
watcher that falls behind continues on its own; the hub ends with the
database, with its client, and a few seconds after its last subscriber.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import mongomock
import pytest
from bson import Timestamp
from pymongo import MongoClient
from pymongo.database import Database

from catalog import ManagedStorage, changehub
from catalog.changes import PathChanges, operation_time
from catalog.errors import CatalogError
from catalog.kv import KVPair, KVStore
from catalog.pathdocs import revision
from storage import GridFSStorage
from tests.helpers import b3, change_streams

ENV = "hubtest"


@pytest.fixture
def kv(managed: ManagedStorage) -> Iterator[KVStore]:
    store = KVStore(managed, ENV)
    yield store
    store.close()


def wait_until(check: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def hub_of(changes: PathChanges) -> changehub.ChangeHub:
    assert changes._sub is not None, "not on the shared stream"
    return changes._sub.hub


class Follower:
    """A watcher as the KV watches use it: a start, a read of the environment, then events.

    Keeps, per path, the revisions it learnt (the read's, then each event's
    above it, as watchers drop what their read reflects) and the hash; every
    event's resume token, to catch one delivered twice.
    """

    def __init__(self, managed: ManagedStorage, env: str, *, defer: bool = True) -> None:
        self.managed = managed
        self.changes = PathChanges(managed, env, defer=defer)
        self.paths: dict[Any, str] = {}  # path document id -> path
        self.revs: dict[str, list[int]] = {}  # path -> revisions learnt, the read's first
        self.hashes: dict[str, str] = {}
        self.tokens: list[str] = []
        for doc in managed.paths.find({"env": env}, {"path": 1, "rev": 1, "hash": 1}):
            self.paths[doc["_id"]] = doc["path"]
            self.revs[doc["path"]] = [revision(doc["rev"])]
            self.hashes[doc["path"]] = doc["hash"]
        self.changes.focus(None)

    def apply(self, event: dict[str, Any]) -> None:
        self.tokens.append(event["_id"]["_data"])
        if "clusterTime" in event:  # from the hub: nothing before the start, as on the server
            assert (
                self.changes._start is not None and not event["clusterTime"] < self.changes._start
            )
        if event["ns"]["coll"] != self.managed.paths.name:
            return
        doc_id = event["documentKey"]["_id"]
        if event["operationType"] in ("insert", "replace"):
            full = event["fullDocument"]
            self.paths[doc_id] = full["path"]
            self._learn(full["path"], revision(full["rev"]), full["hash"])
        elif event["operationType"] == "update" and doc_id in self.paths:
            updated = event["updateDescription"]["updatedFields"]
            if "rev" in updated:
                path = self.paths[doc_id]
                self._learn(path, revision(updated["rev"]), updated.get("hash", self.hashes[path]))

    def _learn(self, path: str, rev: int, digest: str) -> None:
        seen = self.revs.setdefault(path, [])
        if seen and rev <= seen[0]:
            return  # the read reflects it already
        seen.append(rev)
        self.hashes[path] = digest

    def drain(self, until: Callable[[Follower], bool], seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while not until(self) and time.monotonic() < deadline:
            event = self.changes.next()
            if event is not None:
                self.apply(event)

    def close(self) -> None:
        self.changes.close()


class Writers:
    """Threads that put values on keys of their own as fast as they can; every revision kept."""

    def __init__(self, kv: KVStore, threads: int, keys: int) -> None:
        self.kv = kv
        self.keys = [[f"w{t}/k{k}" for k in range(keys)] for t in range(threads)]
        self.written: dict[str, list[int]] = {}
        for key in (k for own in self.keys for k in own):
            self.written[key] = [kv.put(key, b"start " + key.encode()).last_index]
        self.stop = threading.Event()
        self.pool = [
            threading.Thread(target=self._write, args=(own,), daemon=True) for own in self.keys
        ]

    def _write(self, own: list[str]) -> None:
        i = 0
        while not self.stop.is_set():
            key = own[i % len(own)]
            pair = self.kv.put(key, f"{key} value {i}".encode())
            self.written[key].append(pair.last_index)
            i += 1

    def __enter__(self) -> Writers:
        for t in self.pool:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.pool:
            t.join(30)

    def final(self) -> dict[str, int]:
        return {key: revs[-1] for key, revs in self.written.items()}

    def check(self, follower: Follower, managed: ManagedStorage) -> None:
        """Every revision after the follower's read, in order, exactly once; the final hash."""
        assert len(set(follower.tokens)) == len(follower.tokens), "an event came twice"
        for key, revs in self.written.items():
            seen = follower.revs[key]
            read = seen[0]
            assert seen[1:] == [r for r in revs if r > read], key
            doc = managed.paths.find_one({"env": self.kv.env_uuid, "path": key})
            assert doc is not None and follower.hashes[key] == doc["hash"]

    def caught_up(self, follower: Follower) -> bool:
        return all(follower.revs.get(k, [0])[-1] >= r for k, r in self.final().items())


# -- one stream ----------------------------------------------------------------------------
def test_many_watchers_share_one_server_side_stream(
    managed: ManagedStorage, kv: KVStore, db: Database[Any], mongo_client: MongoClient[Any]
) -> None:
    before = change_streams(mongo_client, db.name)
    watchers = [PathChanges(managed, ENV) for _ in range(16)]
    try:
        assert all(w.shared for w in watchers)
        assert len({id(hub_of(w)) for w in watchers}) == 1
        assert wait_until(lambda: change_streams(mongo_client, db.name) == before + 1)
        pair = kv.put("one", b"for all")
        for w in watchers:  # the new content comes with the change that links it
            event = w.next() or w.next()
            assert event is not None and revision(event["fullDocument"]["rev"]) == pair.last_index
            assert event[changehub.CONTENT] == b"for all"
        time.sleep(0.5)  # still one: none opened a stream of its own meanwhile
        assert change_streams(mongo_client, db.name) == before + 1
    finally:
        for w in watchers:
            w.close()


# -- gap-free attach -----------------------------------------------------------------------
def test_watchers_attached_under_load_miss_and_repeat_nothing(
    managed: ManagedStorage, kv: KVStore
) -> None:
    rng = random.Random(7)
    followers: list[Follower] = []
    with Writers(kv, threads=3, keys=2) as writers:
        for _ in range(8):
            time.sleep(rng.uniform(0.05, 0.4))
            followers.append(Follower(managed, ENV))
            # Consume a little while writes go on: later events arrive live.
            followers[-1].drain(lambda f: False, seconds=rng.uniform(0, 0.2))
    try:
        assert all(f.changes.shared for f in followers)
        assert sum(len(revs) for revs in writers.written.values()) > 100  # it was under load
        for follower in followers:
            follower.drain(writers.caught_up)
            follower.drain(lambda f: False, seconds=0.3)  # and nothing more comes
            writers.check(follower, managed)
    finally:
        for f in followers:
            f.close()


def test_a_start_before_the_hub_opened_falls_back_to_an_own_stream(
    managed: ManagedStorage, kv: KVStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = kv.put("early", b"0").last_index
    old = operation_time(managed.db)
    missed = [kv.put("early", f"{i}".encode()).last_index for i in range(1, 6)]
    first = Follower(managed, ENV)  # makes the hub, which starts after `old`
    assert first.changes.shared and hub_of(first.changes).start > old  # type: ignore[operator]
    monkeypatch.setattr(changehub, "operation_time", lambda db: old)
    late = PathChanges(managed, ENV)
    try:
        assert not late.shared
        later = [kv.put("early", f"{i}".encode()).last_index for i in range(6, 9)]
        revs: list[int] = []
        tokens: list[str] = []
        deadline = time.monotonic() + 20
        while (not revs or revs[-1] < later[-1]) and time.monotonic() < deadline:
            event = late.next()
            if event is None or event["ns"]["coll"] != managed.paths.name:
                continue
            tokens.append(event["_id"]["_data"])
            doc = event.get("fullDocument") or event["updateDescription"]["updatedFields"]
            if revision(doc["rev"]) > created:  # the start may include the creating put
                revs.append(revision(doc["rev"]))
        assert revs == missed + later and len(set(tokens)) == len(tokens)
    finally:
        late.close()
        first.close()


def test_a_start_the_hub_still_keeps_is_replayed_from_its_buffer(
    managed: ManagedStorage, kv: KVStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv.put("kept", b"0")
    live = Follower(managed, ENV)
    old = operation_time(managed.db)
    writes = [kv.put("kept", f"{i}".encode()).last_index for i in range(1, 31)]
    live.drain(lambda f: f.revs["kept"][-1] >= writes[-1])  # the hub has them all
    with monkeypatch.context() as patch:
        patch.setattr(changehub, "operation_time", lambda db: old)
        late = Follower(managed, ENV)
    try:
        assert late.changes.shared
        late.revs["kept"] = [writes[0] - 1]  # it read the final state: rewind to `old`
        more = [kv.put("kept", f"{i}".encode()).last_index for i in range(31, 36)]
        late.drain(lambda f: f.revs["kept"][-1] >= more[-1])
        late.drain(lambda f: False, seconds=0.3)
        assert late.revs["kept"][1:] == writes + more
        assert len(set(late.tokens)) == len(late.tokens)
    finally:
        live.close()
        late.close()


def test_a_start_the_buffer_let_go_of_falls_back_and_loses_nothing(
    managed: ManagedStorage, kv: KVStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(changehub, "BUFFER_EVENTS", 5)
    kv.put("busy", b"0")
    live = Follower(managed, ENV)
    old = operation_time(managed.db)
    writes = [kv.put("busy", f"{i}".encode()).last_index for i in range(1, 31)]
    live.drain(lambda f: f.revs["busy"][-1] >= writes[-1])
    hub = hub_of(live.changes)
    assert len(hub._buffer) <= 5 and hub._evicted is not None and not hub._evicted < old
    with monkeypatch.context() as patch:
        patch.setattr(changehub, "operation_time", lambda db: old)
        late = Follower(managed, ENV)
    now = Follower(managed, ENV)  # a start of now is still covered
    try:
        assert not late.changes.shared and now.changes.shared
        # The late one read the final state; rewind it to what it knew at `old`.
        late.revs["busy"] = [writes[0] - 1]
        late.drain(lambda f: f.revs["busy"][-1] >= writes[-1])
        assert late.revs["busy"][1:] == writes
        assert len(set(late.tokens)) == len(late.tokens)
    finally:
        for f in (live, late, now):
            f.close()


# -- failures ------------------------------------------------------------------------------
def test_a_broken_hub_stream_resumes_for_every_subscriber(
    managed: ManagedStorage, kv: KVStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rescat.changes")
    writers = Writers(kv, threads=2, keys=2)
    followers = [Follower(managed, ENV) for _ in range(4)]
    hub = hub_of(followers[0].changes)
    try:
        with writers:
            for _ in range(3):
                time.sleep(0.4)
                followers[random.randrange(4)].changes.break_for_test()
        assert sum("resuming from its token" in r.getMessage() for r in caplog.records) >= 3
        for follower in followers:
            follower.drain(writers.caught_up)
            follower.drain(lambda f: False, seconds=0.3)
            writers.check(follower, managed)
            assert follower.changes.shared and hub_of(follower.changes) is hub
    finally:
        for f in followers:
            f.close()


def test_a_watcher_that_falls_behind_continues_on_its_own(
    managed: ManagedStorage, kv: KVStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(changehub, "QUEUE_MAX", 20)
    kv.put("flood", b"0")
    slow = Follower(managed, ENV)
    other = Follower(managed, ENV)
    try:
        first = [kv.put("flood", f"{i}".encode()).last_index for i in range(1, 4)]
        slow.drain(lambda f: f.revs["flood"][-1] >= first[-1])
        # `other` keeps up (it reads while the puts go on), `slow` reads nothing meanwhile.
        target: list[int] = []
        keeping_up = threading.Thread(
            target=other.drain, args=(lambda f: bool(target) and f.revs["flood"][-1] >= target[0],)
        )
        keeping_up.start()
        rest = []
        for i in range(4, 40):
            rest.append(kv.put("flood", f"{i}".encode()).last_index)
            time.sleep(0.01)
        target.append(rest[-1])
        keeping_up.join(30)
        sub = slow.changes._sub
        assert sub is not None and sub.behind  # more than 20 waited: detached
        slow.drain(lambda f: f.revs["flood"][-1] >= rest[-1])
        assert not slow.changes.shared
        assert slow.revs["flood"][1:] == first + rest
        assert len(set(slow.tokens)) == len(slow.tokens)
        assert other.changes.shared and other.revs["flood"][1:] == first + rest
    finally:
        slow.close()
        other.close()


def test_dropping_the_database_ends_every_subscriber(
    managed: ManagedStorage, kv: KVStore, db: Database[Any]
) -> None:
    kv.put("k", b"v")
    watchers = [PathChanges(managed, ENV) for _ in range(3)]
    hub = hub_of(watchers[0])
    db.client.drop_database(db.name)
    for w in watchers:
        deadline = time.monotonic() + 10
        while not w.ended and time.monotonic() < deadline:
            w.next()
        assert w.ended and w.next() is None
    assert wait_until(lambda: not hub.alive)
    assert hub not in changehub._hubs.values()
    kv.put("k", b"after the drop")  # a start after the drop (else it is the last event)
    fresh = PathChanges(managed, ENV)
    try:
        assert fresh.shared and hub_of(fresh) is not hub
        pair = kv.put("k", b"seen")
        revs: list[int] = []
        while (event := fresh.next()) is not None:
            if event["ns"]["coll"] == managed.paths.name:
                doc = event.get("fullDocument") or event["updateDescription"]["updatedFields"]
                revs.append(revision(doc["rev"]))
        assert revs[-1] == pair.last_index and not fresh.ended
    finally:
        fresh.close()
        for w in watchers:
            w.close()


def test_a_closed_client_ends_its_hub_and_its_watchers_hear_of_it(
    mongo_uri: str, db: Database[Any]
) -> None:
    client: MongoClient[Any] = MongoClient(mongo_uri, tz_aware=True)
    own = client[db.name]
    managed = ManagedStorage(own, GridFSStorage(own))
    watcher = PathChanges(managed, ENV)
    hub = hub_of(watcher)
    client.close()
    with pytest.raises(CatalogError, match="change stream broke"):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            watcher.next()
    assert wait_until(lambda: not hub.alive)
    assert hub not in changehub._hubs.values()
    watcher.close()


# -- filters -------------------------------------------------------------------------------
def test_filters_environments_and_focus(managed: ManagedStorage, kv: KVStore) -> None:
    other = KVStore(managed, "hubother")
    try:
        mine = [kv.put(f"f{i}", b"0") for i in range(2)]
        ids = [managed.paths.find_one({"env": ENV, "path": p.key})["_id"] for p in mine]  # type: ignore[index]
        floor = mine[-1].last_index  # a start may include the last put before it
        wide = PathChanges(managed, ENV)
        focused = PathChanges(managed, ENV, defer=True)
        # Queued before focus: the focus applies to them too, as a stream opened then would.
        kv.put("f1", b"before focus")
        focused.focus([ids[0]])
        other.put("theirs", b"new in the other environment")
        other.put("theirs", b"changed in the other environment")
        kv.put("f0", b"1")
        kv.put("f1", b"1")
        kv.put("f2", b"new")
        last = kv.put("f0", b"2")
        values = [b"before focus", b"new in the other environment"]
        values += [b"changed in the other environment", b"1", b"new", b"2"]

        def collect(changes: PathChanges) -> list[dict[str, Any]]:
            got: list[dict[str, Any]] = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                event = changes.next()
                if event is None:
                    continue
                got.append(event)
                if (event.get("updateDescription") or {}).get("updatedFields", {}).get(
                    "rev"
                ) == last.last_index:
                    break
            return got

        def path_changes(events: list[dict[str, Any]]) -> list[tuple[str, Any, str]]:
            out = []
            for e in events:
                if e["ns"]["coll"] != managed.paths.name:
                    continue
                doc = e.get("fullDocument") or e["updateDescription"]["updatedFields"]
                if revision(doc["rev"]) > floor:
                    out.append((e["operationType"], e["documentKey"]["_id"], doc.get("env", ENV)))
            return out

        theirs = managed.paths.find_one({"env": "hubother", "path": "theirs"})
        f2 = managed.paths.find_one({"env": ENV, "path": "f2"})
        assert theirs is not None and f2 is not None
        wide_events, focused_events = collect(wide), collect(focused)
        # Not the other environment's insert; its update, unfocused, yes (as on the server).
        assert path_changes(wide_events) == [
            ("update", ids[1], ENV),
            ("update", theirs["_id"], ENV),
            ("update", ids[0], ENV),
            ("update", ids[1], ENV),
            ("insert", f2["_id"], ENV),
            ("update", ids[0], ENV),
        ]
        # Focused on f0: its updates, and inserts into its environment; nothing else.
        assert path_changes(focused_events) == [
            ("update", ids[0], ENV),
            ("insert", f2["_id"], ENV),
            ("update", ids[0], ENV),
        ]
        # New inline content comes with each change that links it, to whoever gets that.
        # (the other environment's insert is not the wide watcher's; b"1" came twice)
        wide_values = [b"before focus", b"changed in the other environment", b"1", b"1"]
        assert carried(wide_events) == [b3(v) for v in [*wide_values, b"new", b"2"]]
        assert carried(focused_events) == [b3(b"1"), b3(b"new"), b3(b"2")]
        assert set(values) >= set(wide_values)
        wide.close()
        focused.close()
    finally:
        other.close()


def carried(events: list[dict[str, Any]]) -> list[str]:
    """The hashes of the content the events brought: in events of their own, or with a change."""
    out = []
    for e in events:
        if e["ns"]["coll"] != "paths":
            out.append(e["fullDocument"]["hash"])
        elif changehub.CONTENT in e:
            out.append(b3(e[changehub.CONTENT]))
    return out


def _events_until(changes: PathChanges, rev: int, seconds: float = 20) -> list[dict[str, Any]]:
    """Events until the path change of revision `rev` (inclusive)."""
    paths = changes._paths
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        event = changes.next()
        if event is None:
            continue
        got.append(event)
        doc = event.get("fullDocument") or (event.get("updateDescription") or {}).get(
            "updatedFields", {}
        )
        if event["ns"]["coll"] == paths and revision(doc.get("rev")) == rev:
            return got
    raise AssertionError(f"revision {rev} did not come")


@pytest.mark.parametrize("shared", [True, False])
def test_a_watcher_that_shows_no_values_gets_no_content(
    managed: ManagedStorage, kv: KVStore, monkeypatch: pytest.MonkeyPatch, shared: bool
) -> None:
    if not shared:  # as a watcher whose start the hub cannot cover
        monkeypatch.setattr(changehub, "subscribe", lambda db, *a, **k: (operation_time(db), None))
    with_values = PathChanges(managed, ENV)
    without = PathChanges(managed, ENV, content=False)
    try:
        assert with_values.shared is shared and without.shared is shared
        if shared:  # two streams: only the one of watchers that show values carries content
            assert hub_of(with_values).content and not hub_of(without).content
        last = [kv.put(f"c{i}", f"new content {i}".encode()).last_index for i in range(5)][-1]
        catalog = managed.catalog.collection.name
        got_with = _events_until(with_values, last)
        got_without = _events_until(without, last)
        assert carried(got_with) == [b3(f"new content {i}".encode()) for i in range(5)]
        assert carried(got_without) == []
        paths = [e["_id"] for e in got_with if e["ns"]["coll"] != catalog]
        assert [e["_id"] for e in got_without] == paths  # the same path changes, in order
    finally:
        with_values.close()
        without.close()


def test_new_content_alone_wakes_no_watcher_and_comes_with_its_change(
    managed: ManagedStorage, kv: KVStore
) -> None:
    """Content is no event of its own on the shared stream: it comes with the change."""
    kv.put("mine", b"0")
    doc = managed.paths.find_one({"env": ENV, "path": "mine"}, {"_id": 1})
    assert doc is not None
    other = KVStore(managed, "hubother")
    changes = PathChanges(managed, ENV, await_seconds=30, defer=True)
    changes.focus([doc["_id"]])
    assert changes.shared
    returned: list[tuple[float, dict[str, Any] | None]] = []
    waiter = threading.Thread(target=lambda: returned.append((time.monotonic(), changes.next())))
    try:
        # Drain what the start may include (the put before it), then block.
        while True:
            event = changes._sub.take(0.5) if changes._sub is not None else None
            if event is None:
                break
        waiter.start()
        time.sleep(0.3)
        for i in range(5):  # another environment: only its content would come
            other.put(f"other{i}", f"theirs {i}".encode())
        waiter.join(timeout=1.5)
        assert waiter.is_alive(), "new content of other keys woke the watcher"
        changed_at = time.monotonic()
        last = kv.put("mine", b"1").last_index
        waiter.join(timeout=10)
        assert not waiter.is_alive()
        woke_at, event = returned[0]
        assert woke_at - changed_at < 5  # woken by the change, not by its 30 s wait
        assert event is not None and event["ns"]["coll"] == managed.paths.name
        assert event["updateDescription"]["updatedFields"]["rev"] == last
        assert event[changehub.CONTENT] == b"1"
    finally:
        changes.close()
        other.close()


def test_a_key_watch_shows_values_overwritten_and_deleted_before_it_read_them(
    managed: ManagedStorage, kv: KVStore
) -> None:
    """Each item carries the value its change wrote, though the entry is gone when it is read."""
    watch = kv.watch("busy")
    assert next(watch) is None
    values = [f"value {i}".encode() for i in range(50)]
    for value in values:
        kv.put("busy", value)  # each overwrite deletes the entry of the value before
    kv.delete("busy")
    seen: list[Any] = []
    reader = threading.Thread(
        target=lambda: seen.extend(next(watch) for _ in range(len(values) + 1)), daemon=True
    )
    reader.start()
    reader.join(timeout=30)
    watch.close()
    assert [p.value if p is not None else None for p in seen] == [*values, None]
    assert managed.catalog.collection.count_documents({"hash": b3(values[0])}) == 0


# -- lifetime ------------------------------------------------------------------------------
def test_the_hub_stops_after_its_last_subscriber_leaves(
    managed: ManagedStorage, kv: KVStore, db: Database[Any], mongo_client: MongoClient[Any]
) -> None:
    before = change_streams(mongo_client, db.name)
    watchers = [PathChanges(managed, ENV) for _ in range(2)]
    hub = hub_of(watchers[0])
    assert hub.alive and hub._thread.name == "rescat-changes" and hub._thread.daemon
    watchers[0].close()
    time.sleep(changehub.IDLE_SECONDS + 0.5)
    assert hub.alive  # one subscriber is left
    watchers[1].close()
    assert wait_until(lambda: not hub.alive, 10)
    assert wait_until(lambda: change_streams(mongo_client, db.name) == before)
    assert hub not in changehub._hubs.values()
    again = Follower(managed, ENV)
    try:
        assert again.changes.shared and hub_of(again.changes) is not hub
        pair = kv.put("after", b"x")
        again.drain(lambda f: f.revs.get("after", [0])[-1] >= pair.last_index)
        assert again.revs["after"] == [pair.last_index]
    finally:
        again.close()


def test_in_memory_mode_has_no_hub() -> None:
    client: mongomock.MongoClient[Any] = mongomock.MongoClient(tz_aware=True)
    db = client["memory"]
    managed = ManagedStorage(db, GridFSStorage(db))
    hubs = dict(changehub._hubs)
    changes = PathChanges(managed, ENV, defer=True)
    assert not changes.shared and changes._start is None
    with pytest.raises(TypeError):  # mongomock has no watch(): the same failure as before
        changes.next()
    assert changehub._hubs == hubs
    changes.close()


def test_timestamps_order_as_the_coverage_rule_needs() -> None:
    assert Timestamp(5, 1) < Timestamp(5, 2) < Timestamp(6, 0)
    assert not Timestamp(5, 2) < Timestamp(5, 2)


def test_a_watch_sees_every_put_that_raced_a_delete(managed: ManagedStorage) -> None:
    """Four puts of a new path racing its delete, 30 rounds. A put that re-created the
    path while the delete committed could get a revision no larger than the delete's
    (its revision is taken before it waits for that commit), and both watches dropped
    it as old: 13-17 of 40 paths missed a put. Its writer now raises it above the
    delete (pathdocs.settle_created), and the watch sends it there. One that another
    put overwrote before it could be raised keeps its revision; the overwrite is sent
    (revisions only grow in a watch), and a key watch ends on what the key holds."""
    import collections
    import io

    from catalog.errors import NotFoundError
    from catalog.pathevents import PathEvents

    env = "race"
    managed.put_path(env, "other", io.BytesIO(b"x"), 1)
    events = PathEvents(managed, env, prefix="p")
    store = KVStore(managed, env)
    stop = threading.Event()
    keys = {f"p{r}": store.watch(f"p{r}", stop=stop) for r in range(0, 30, 5)}
    wrote: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)

    def put(path: str, k: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        data = f"{path}-{k}".encode()
        wrote[path].append(("put", managed.put_path(env, path, io.BytesIO(data), -1).revision))

    def delete(path: str, barrier: threading.Barrier) -> None:
        barrier.wait()
        for _ in range(100):
            try:
                wrote[path].append(("delete", managed.delete_path(env, path)))
                return
            except NotFoundError:
                time.sleep(0.001)

    for r in range(30):
        path, barrier = f"p{r}", threading.Barrier(5)
        threads = [threading.Thread(target=put, args=(path, k, barrier)) for k in range(4)]
        threads.append(threading.Thread(target=delete, args=(path, barrier)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # What each path holds now: the last event its watch must end on.
    final = {p: managed.paths.find_one({"env": env, "path": p}, {"rev": 1}) for p in wrote}
    ends = {
        p: ("delete", None) if doc is None else ("put", revision(doc["rev"]))
        for p, doc in final.items()
    }
    seen: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    deadline = time.monotonic() + 15
    while any(
        not seen[p] or (seen[p][-1][0], seen[p][-1][1] if ends[p][1] else None) != ends[p]
        for p in wrote
    ):
        assert time.monotonic() < deadline, "the watch fell silent"
        event = events.next()
        if event is not None:
            seen[event["path"]].append((event["type"], event["revision"]))
    events.close()
    for path, done in wrote.items():
        got = seen[path]
        revs = [rev for _, rev in got]
        assert revs == sorted(set(revs)), (path, got)  # never back, never twice
        deleted = max((rev for kind, rev in done if kind == "delete"), default=0)
        for kind, rev in done:
            if (kind, rev) not in got:
                # Only a put overwritten before it was raised above the delete.
                assert kind == "put" and rev <= deleted, (path, kind, rev, got, done)
                assert any(r > deleted for _, r in got), (path, got)
    timer = threading.Timer(20, stop.set)  # a watch that never gets there ends, and fails
    timer.start()
    try:
        for key, watch in keys.items():
            try:
                now: KVPair | None = store.get(key)
            except NotFoundError:
                now = None
            last: Any = "nothing yet"
            for last in watch:
                if last == now:
                    break
            assert last == now, (key, last, now)
    finally:
        timer.cancel()
        store.close()
