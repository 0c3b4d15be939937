"""A key deleted and re-created by racing writers: revisions never repeat or go back.

Found by review: a put that re-created a path while its delete committed had
taken its revision (the insert's tick, the pipeline's clock) before it waited
for that commit, so the path came back at the delete's revision or below it.
A compare-and-swap on that revision could pass against another state (ABA);
the key watch yielded revisions going backwards; the HTTP watch dropped such
puts (same revision as the delete) and so reported live keys as deleted.
Now the writer raises a re-created path above its deletion
(pathdocs.settle_created), and the watches show that raised put.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import multiprocessing
import random
import threading
import time
from typing import Any

from pymongo import MongoClient
from pymongo.database import Database

from catalog import ManagedStorage
from catalog.errors import NotFoundError
from catalog.kv import KVPair, KVStore
from catalog.pathdocs import revision
from service.client import CatalogClient
from storage import GridFSStorage
from tests.test_service_support import server_process
from tests.test_service_watch import token  # noqa: F401 - a fixture

ENV = "watched"


def _final_states_agree(managed: ManagedStorage, env: str, path: str) -> Any:
    """The path's revision now is above every revision its history holds."""
    doc = managed.paths.find_one({"env": env, "path": path}, {"rev": 1, "events": 1})
    hist = managed.history.find_one({"env": env, "path": path}, {"last_rev": 1, "events": 1})
    if doc is not None and hist is not None:
        assert revision(doc["rev"]) > int(hist.get("last_rev") or 0), (doc, hist)
    return doc


def _paused_delete(
    managed: ManagedStorage, env: str, path: str
) -> tuple[threading.Thread, threading.Event, threading.Event, list[int]]:
    """delete_path in a thread, held inside its transaction until resumed.

    Held after the path document went and before the history takes the
    delete's revision: a put arriving then takes its own revision first and
    waits for the commit, the order in which the race happens.
    """
    inside, resume = threading.Event(), threading.Event()
    close_history = managed._close_history
    revs: list[int] = []

    def held(*args: Any, **kwargs: Any) -> Any:
        inside.set()
        assert resume.wait(30)
        return close_history(*args, **kwargs)

    managed._close_history = held  # type: ignore[method-assign]
    thread = threading.Thread(target=lambda: revs.append(managed.delete_path(env, path)))
    thread.start()
    assert inside.wait(30)
    return thread, inside, resume, revs


def _second(managed: ManagedStorage) -> ManagedStorage:
    """Another process's view: none of `managed`'s caches."""
    return ManagedStorage(managed.db, GridFSStorage(managed.db))


def test_a_put_that_waited_for_a_delete_to_commit_gets_a_larger_revision(
    managed: ManagedStorage,
) -> None:
    """Each way a put creates a path: a fresh insert answered or not, an upsert."""
    fresh_kv, knowing = KVStore(_second(managed), "race"), _second(managed)
    knowing_kv = KVStore(knowing, "race")
    writes = {
        "kv put, fresh insert": lambda: fresh_kv.put("k1", b"back").last_index,
        "kv put, upsert": lambda: knowing_kv.put("k2", b"back").last_index,
        "plain put": lambda: (
            _second(managed).put_for_environment("race", "k3", io.BytesIO(b"back")),
            managed.stat_for_environment("race", "k3").revision,
        )[1],
    }
    for number, (how, write) in enumerate(writes.items(), start=1):
        key = f"k{number}"
        knowing_kv.put(key, b"first")  # `knowing` has seen it: its next put upserts
        watch = iter(KVStore(managed, "race").watch(key))
        assert next(watch) is not None
        deleter, _, resume, deleted = _paused_delete(_second(managed), "race", key)
        answer: list[int] = []
        putter = threading.Thread(target=lambda w=write, out=answer: out.append(w()))
        putter.start()
        time.sleep(0.5)  # the put has taken its revision and waits on the delete
        resume.set()
        deleter.join(30)
        putter.join(30)
        assert answer and deleted, (how, answer, deleted)
        assert answer[0] > deleted[0], (how, answer[0], deleted[0])
        assert managed.stat_for_environment("race", key).revision == answer[0], how
        events = managed.history_for_environment("race", key)
        revs = [e["revision"] for e in events if e.get("revision") is not None]
        assert revs == sorted(set(revs)), (how, events)
        assert next(watch) is None  # the delete, then the put at its raised revision
        shown = next(watch)
        assert shown is not None and shown.last_index == answer[0], (how, shown, answer)


def test_a_key_watch_sees_racing_deletes_and_re_creates_in_revision_order(
    managed: ManagedStorage,
) -> None:
    kv = KVStore(managed, "recreate")
    kv.put("k", b"init")
    stop = threading.Event()
    shown: list[KVPair | None] = []
    watcher = threading.Thread(target=lambda: shown.extend(kv.watch("k", stop=stop)))
    watcher.start()
    time.sleep(0.5)
    answers: list[tuple[str, int]] = []

    def writer(w: int) -> None:
        rng = random.Random(w)
        for i in range(120):
            if rng.random() < 0.25:
                with contextlib.suppress(NotFoundError):
                    answers.append(("delete", managed.delete_path("recreate", "k")))
            else:
                answers.append(("put", kv.put("k", f"{w}-{i}".encode()).last_index))

    writers = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    time.sleep(1.5)
    stop.set()
    watcher.join(10)
    revisions = [pair.last_index for pair in shown if pair is not None]
    backwards = [(a, b) for a, b in itertools.pairwise(revisions) if b <= a]
    assert not backwards, backwards[:5]
    doc = _final_states_agree(managed, "recreate", "k")
    final = None if doc is None else kv.get("k")
    last = shown[-1]
    assert (last is None) == (final is None), (last, final)
    if last is not None and final is not None:
        assert (last.value, last.last_index) == (final.value, final.last_index)
    puts = [r for kind, r in answers if kind == "put"]
    deletes = {r for kind, r in answers if kind == "delete"}
    # Two puts share a revision only where one of them came back as a delete committed
    # and another write changed the path before it could be raised: never at rest.
    assert len(set(puts)) >= len(puts) - len(deletes), answers


def _writer(uri: str, dbname: str, w: int, rounds: int, out: Any) -> None:
    client: MongoClient[Any] = MongoClient(uri, tz_aware=True)
    db = client[dbname]
    managed = ManagedStorage(db, GridFSStorage(db))
    kv = KVStore(managed, ENV)
    rng = random.Random(w)
    log: list[tuple[str, str, int]] = []
    for i in range(rounds):
        key = f"p/{rng.randint(0, 3)}"
        if rng.random() < 0.25:
            with contextlib.suppress(NotFoundError):
                log.append(("delete", key, managed.delete_path(ENV, key)))
        else:
            log.append(("put", key, kv.put(key, f"{w}-{i}".encode()).last_index))
    out.put(log)
    client.close()


def test_the_http_watch_keeps_re_created_keys_alive_and_in_order(
    managed: ManagedStorage,
    mongo_uri: str,
    db: Database[Any],
    token: str,  # noqa: F811 - the fixture imported above
) -> None:
    with (
        server_process(mongo_uri, db.name, "--log-level", "warning") as url,
        CatalogClient(url, token) as client,
    ):
        got: list[dict[str, Any]] = []
        stop = threading.Event()
        watcher = threading.Thread(
            target=lambda: got.extend(client.watch(ENV, prefix="p/", stop=stop)), daemon=True
        )
        watcher.start()
        time.sleep(1.0)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_writer, args=(mongo_uri, db.name, w, 150, out)) for w in range(4)
        ]
        for p in procs:
            p.start()
        logs = [entry for _ in procs for entry in out.get(timeout=120)]
        for p in procs:
            p.join(60)
        time.sleep(2.0)
        stop.set()
        watcher.join(15)
    last: dict[str, tuple[int, str]] = {}
    for event in got:
        before = last.get(event["path"])
        assert before is None or event["revision"] > before[0], (event, before)
        last[event["path"]] = (event["revision"], event["type"])
    for key in {entry[1] for entry in logs}:
        doc = _final_states_agree(managed, ENV, key)
        if doc is None:
            assert last[key][1] == "delete", (key, last[key])
        else:
            assert last[key] == (revision(doc["rev"]), "put"), (key, last[key], doc["rev"])
    # Every put is sent at the revision it answered, but one: a put that came back as
    # a delete committed and was overwritten before its writer could raise it above
    # that delete. It answered a revision no larger than the delete's; the overwrite
    # is the change sent (so that revisions only grow). Everything else arrives.
    sent = {(e["path"], e["revision"]) for e in got if e["type"] == "put"}
    # (revision of the event before it, revision of the delete) per path
    windows: dict[str, list[tuple[int, int]]] = {}
    before: dict[str, int] = {}
    for e in got:
        if e["type"] == "delete":
            windows.setdefault(e["path"], []).append((before.get(e["path"], 0), e["revision"]))
        before[e["path"]] = e["revision"]
    lost = [
        (key, rev)
        for kind, key, rev in logs
        if kind == "put"
        and (key, rev) not in sent
        and not any(low < rev <= gone for low, gone in windows.get(key, []))
    ]
    assert not lost, lost[:5]


def test_a_read_racing_a_replace_gets_a_version_not_a_404(managed: ManagedStorage) -> None:
    """Was (a 64 MiB replace test, once): a read that found the path at its old entry,
    which the replace then dropped and deleted, said 'points at missing content' (404)
    instead of reading the path again, as it did when the bytes went instead."""
    big = bytes(range(256)) * 400  # above the inline limit: its own entry and file
    managed.put_path("reads", "p", io.BytesIO(big + b"1"), len(big) + 1)
    catalog = managed.catalog
    entry = catalog.entry
    replaced: list[bool] = []

    def entry_after_a_replace(rid: str) -> Any:
        if not replaced:  # between the path read and the entry read: a replace lands
            replaced.append(True)
            managed.put_path("reads", "p", io.BytesIO(big + b"2"), len(big) + 1)
        return entry(rid)

    catalog.entry = entry_after_a_replace  # type: ignore[method-assign]
    try:
        reader, info = managed.open_path("reads", "p")
    finally:
        catalog.entry = entry  # type: ignore[method-assign]
    with reader:
        assert reader.read() == big + b"2"
    assert replaced and info.length == len(big) + 1
