"""rescat's own promises about the snapshot metastore, beyond containerd's suite.

Transactions end exactly once, read-only ones never write, failed calls change
nothing, ids are never reused, concurrent transactions (also in two processes)
never leave a child without its parent, labels round-trip.
"""

from __future__ import annotations

import datetime
import multiprocessing
import queue
import time
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.database import Database

from catalog import ManagedStorage
from catalog.errors import (
    AlreadyExistsError,
    CatalogError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    NoTransactionError,
    WriteConflictError,
)
from catalog.snapshots import Info, Kind, MetaStore, Transaction
from storage import GridFSStorage


@pytest.fixture
def ms(managed: ManagedStorage) -> MetaStore:
    return MetaStore(managed)


def snapshot_docs(db: Database[Any]) -> list[dict[str, Any]]:
    """The raw state, to prove that something changed nothing."""
    return sorted(
        (d for d in db["snapshots"].find({}, {"_id": 0})), key=lambda d: (d["ns"], d["key"])
    )


def committed_base(ms: MetaStore) -> None:
    with ms.transaction(True) as tx:
        tx.create_active("tmp", "")
        tx.commit_active("tmp", "base")
        tx.create_active("child", "base")


# -- ending a transaction -----------------------------------------------------
def test_context_manager_commits_on_success(ms: MetaStore) -> None:
    with ms.transaction(True) as tx:
        a = tx.create_active("a")
    with ms.transaction(False) as tx:
        assert tx.get_active("a") == a


def test_context_manager_rolls_back_on_exception(ms: MetaStore, db: Database[Any]) -> None:
    committed_base(ms)
    before = snapshot_docs(db)
    with pytest.raises(RuntimeError), ms.transaction(True) as tx:
        tx.create_active("a")
        tx.remove("child")
        tx.commit_active("a", "a-c")
        raise RuntimeError("boom")
    assert not tx.open
    assert snapshot_docs(db) == before
    with ms.transaction(False) as tx, pytest.raises(NotFoundError):
        tx.stat("a")


def test_seed_form_rollback_discards(ms: MetaStore, db: Database[Any]) -> None:
    tx = ms.transaction_context(True)
    tx.create_active("a")
    tx.rollback()
    assert snapshot_docs(db) == []


def assert_ended(tx: Transaction) -> None:
    assert not tx.open
    calls = [
        lambda: tx.create_active("x"),
        lambda: tx.get_active("child"),
        lambda: tx.commit_active("child", "y"),
        lambda: tx.remove("child"),
        lambda: tx.stat("base"),
        lambda: tx.walk(lambda info: None),
        lambda: tx.update("base", {"a": "b"}),
        lambda: tx.stat(""),  # the end is reported before bad input
        lambda: tx.create_active(""),
        tx.commit,
        tx.rollback,
    ]
    for call in calls:
        with pytest.raises(NoTransactionError):
            call()


def test_calls_after_the_end_raise_no_transaction(ms: MetaStore) -> None:
    committed_base(ms)
    for writable in (True, False):
        with ms.transaction(writable) as tx:
            pass
        assert_ended(tx)
        tx = ms.transaction_context(writable)
        tx.commit()
        assert_ended(tx)
        tx = ms.transaction_context(writable)
        tx.rollback()
        assert_ended(tx)


def test_commit_and_rollback_inside_with_block(ms: MetaStore) -> None:
    with ms.transaction(True) as tx:
        tx.create_active("a")
        tx.commit()  # the block's end then has nothing left to do
    with ms.transaction(True) as tx:
        tx.create_active("b")
        tx.rollback()
    with ms.transaction(False) as tx:
        tx.stat("a")
        with pytest.raises(NotFoundError):
            tx.stat("b")


# -- read-only transactions ---------------------------------------------------
def test_read_only_transaction_never_writes(ms: MetaStore, db: Database[Any]) -> None:
    committed_base(ms)
    before = snapshot_docs(db)
    ids_before = list(db["snapshot_ids"].find())
    tx = ms.transaction_context(False)
    writes = [
        lambda: tx.create_active("x"),
        lambda: tx.create_active("x", "base"),
        lambda: tx.commit_active("child", "c"),
        lambda: tx.remove("child"),
        lambda: tx.update("base", {"gc": "ref"}),
        lambda: tx.create_active(""),  # refused as a write before its bad input
    ]
    for write in writes:
        with pytest.raises(NoTransactionError):
            write()
    # Refused writes leave it usable for reads; commit of a read-only one just ends it.
    assert tx.stat("base").kind == Kind.COMMITTED
    tx.commit()
    with ms.transaction(False) as ro:
        ro.get_active("child")  # a read-only `with` block rolls back at its end
    assert snapshot_docs(db) == before
    assert list(db["snapshot_ids"].find()) == ids_before


# -- failed calls change nothing ----------------------------------------------
def test_failed_calls_leave_the_transaction_usable(ms: MetaStore, db: Database[Any]) -> None:
    committed_base(ms)
    before = snapshot_docs(db)
    tx = ms.transaction_context(True)
    failing: list[tuple[type[CatalogError], Any]] = [
        (InvalidArgumentError, lambda: tx.create_active("")),
        (InvalidArgumentError, lambda: tx.create_active("x", "child")),  # parent is active
        (InvalidArgumentError, lambda: tx.commit_active("child", "")),
        (InvalidArgumentError, lambda: tx.get_active("")),
        (InvalidArgumentError, lambda: tx.remove("")),
        (InvalidArgumentError, lambda: tx.create_active("x", labels={"": "v"})),
        (InvalidArgumentError, lambda: tx.update("base", {"k": "v"}, ["name"])),
        (NotFoundError, lambda: tx.create_active("x", "nope")),
        (NotFoundError, lambda: tx.commit_active("nope", "x")),
        (NotFoundError, lambda: tx.remove("nope")),
        (NotFoundError, lambda: tx.update("nope", {})),
        (AlreadyExistsError, lambda: tx.create_active("child")),
        (AlreadyExistsError, lambda: tx.create_active("base")),
        (AlreadyExistsError, lambda: tx.commit_active("child", "base")),
        (AlreadyExistsError, lambda: tx.commit_active("nope", "base")),  # name checked first
        (AlreadyExistsError, lambda: tx.commit_active("child", "child")),
        (FailedPreconditionError, lambda: tx.commit_active("base", "x")),
        (FailedPreconditionError, lambda: tx.get_active("base")),
        (FailedPreconditionError, lambda: tx.remove("base")),  # has a child
    ]
    for error, call in failing:
        with pytest.raises(error):
            call()
        assert tx.open
    # Then the transaction proceeds and commits normally.
    tx.create_active("ro", "base", readonly=True)
    with pytest.raises(FailedPreconditionError):
        tx.commit_active("ro", "x")
    tx.commit_active("child", "child-c")
    tx.commit()
    after = {d["key"]: d for d in snapshot_docs(db)}
    assert set(after) == {"base", "child-c", "ro"}
    assert after["base"]["children"] == 2
    unchanged_base = next(d for d in before if d["key"] == "base")
    assert after["base"] == {**unchanged_base, "children": 2}


def test_not_found_carries_the_key(ms: MetaStore) -> None:
    with ms.transaction(False) as tx, pytest.raises(NotFoundError) as info:
        tx.stat("missing")
    assert getattr(info.value, "path", None) == "missing"


# -- ids ----------------------------------------------------------------------
def test_ids_never_reused_over_300_create_remove_cycles(ms: MetaStore) -> None:
    seen: set[str] = set()
    for i in range(300):
        with ms.transaction(True) as tx:
            a = tx.create_active("k")
            if i % 3 == 0:
                assert tx.commit_active("k", "c") == a.id
                assert tx.remove("c") == a.id
            else:
                assert tx.remove("k") == a.id
        assert a.id not in seen
        seen.add(a.id)
    assert len(seen) == 300


def test_ids_are_per_namespace_and_namespaces_are_isolated(managed: ManagedStorage) -> None:
    one, two = MetaStore(managed, "one"), MetaStore(managed, "two")
    with one.transaction(True) as tx:
        tx.create_active("tmp")
        tx.commit_active("tmp", "base")
    with two.transaction(True) as tx:
        tx.create_active("base")  # the same key in another namespace
        with pytest.raises(NotFoundError):
            tx.create_active("x", "base-of-one")
    seen: list[str] = []
    with two.transaction(False) as tx:
        tx.walk(lambda info: seen.append(info.name))
        assert tx.stat("base").kind == Kind.ACTIVE
    assert seen == ["base"]


def test_parent_chain_runs_from_the_immediate_parent(ms: MetaStore) -> None:
    ids: list[str] = []
    with ms.transaction(True) as tx:
        parent = ""
        for i in range(10):
            a = tx.create_active("tmp", parent)
            assert a.parent_ids == ids[::-1]
            ids.append(tx.commit_active("tmp", f"layer-{i}"))
            parent = f"layer-{i}"
        top = tx.create_active("top", parent)
    assert top.parent_ids == ids[::-1]
    with ms.transaction(False) as tx:
        assert tx.get_active("top") == top
        assert tx.stat("layer-3").parent == "layer-2"


# -- Info and labels ----------------------------------------------------------
def test_info_fields(ms: MetaStore) -> None:
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    committed_base(ms)
    with ms.transaction(False) as tx:
        base, child = tx.stat("base"), tx.stat("child")
    assert isinstance(base, Info)
    assert (base.name, base.parent, base.kind, base.readonly, base.labels) == (
        "base",
        "",
        Kind.COMMITTED,
        True,
        {},
    )
    assert (child.parent, child.kind, child.readonly) == ("base", Kind.ACTIVE, False)
    for t in (base.created_at, base.updated_at, child.created_at):
        assert t.utcoffset() == datetime.timedelta(0)
        assert t >= start


def test_labels_round_trip_and_update(ms: MetaStore) -> None:
    gc_ref = "containerd.io/gc.ref.snapshot.overlayfs"  # dots, as containerd's labels have
    with ms.transaction(True) as tx:
        tx.create_active("a", labels={gc_ref: "sha256:1", "x": "1"})
        assert tx.stat("a").labels == {gc_ref: "sha256:1", "x": "1"}
        created = tx.stat("a")
        info = tx.update("a", {gc_ref: "sha256:2"})
        assert info.labels == {gc_ref: "sha256:2"}
        assert info.updated_at >= created.updated_at
        assert info.created_at == created.created_at
        assert tx.update("a", {"y": "2"}, ["labels.y", "labels.x"]).labels == {
            gc_ref: "sha256:2",
            "y": "2",
        }
        assert tx.update("a", {"z": "3"}, ["labels"]).labels == {"z": "3"}
        # Labels are replaced on commit, not inherited (as containerd does).
        tx.commit_active("a", "a-c", labels={"committed": "yes"})
        tx.create_active("b")
        tx.commit_active("b", "b-c")
    with ms.transaction(False) as tx:
        assert tx.stat("a-c").labels == {"committed": "yes"}
        assert tx.stat("b-c").labels == {}
        assert tx.stat("a-c") == tx.get_info("a-c")[1]


def test_id_map(ms: MetaStore) -> None:
    with ms.transaction(True) as tx:
        a = tx.create_active("a")
        b = tx.create_active("b")
        tx.commit_active("a", "a-c")
        assert tx.id_map() == {a.id: "a-c", b.id: "b"}


# -- conflicts ----------------------------------------------------------------
def test_losing_a_write_conflict_changes_nothing(ms: MetaStore, db: Database[Any]) -> None:
    committed_base(ms)
    with ms.transaction(True) as tx:
        tx.remove("child")
    before = snapshot_docs(db)
    winner = ms.transaction_context(True)
    loser = ms.transaction_context(True)
    loser.stat("base")  # its snapshot predates the winner's write
    winner.create_active("new-child", "base")
    with pytest.raises(WriteConflictError):
        loser.remove("base")
    assert not loser.open
    with pytest.raises(NoTransactionError):
        loser.stat("base")
    winner.commit()
    after = {d["key"]: d for d in snapshot_docs(db)}
    assert set(after) == {"base", "new-child"}
    assert after["base"]["children"] == 1
    assert len(before) == 1


def test_conflict_at_commit_time_changes_nothing(ms: MetaStore, db: Database[Any]) -> None:
    committed_base(ms)
    first = ms.transaction_context(True)
    second = ms.transaction_context(True)
    first.update("base", {"who": "first"})
    first.commit()
    # second's snapshot starts now, after first committed: no conflict.
    second.update("base", {"who": "second"})
    second.commit()
    with ms.transaction(False) as tx:
        assert tx.stat("base").labels == {"who": "second"}


def test_with_transaction_reruns_after_a_conflict(ms: MetaStore) -> None:
    committed_base(ms)
    attempts: list[int] = []

    def body(tx: Transaction) -> str:
        tx.stat("base")  # take the snapshot
        if not attempts:
            with ms.transaction(True) as other:  # commits a change to base meanwhile
                other.update("base", {"by": "other"})
        attempts.append(1)
        return tx.update("base", {**tx.stat("base").labels, "by2": "body"}).name

    assert ms.with_transaction(body) == "base"
    assert len(attempts) == 2
    with ms.transaction(False) as tx:
        assert tx.stat("base").labels == {"by": "other", "by2": "body"}


def test_with_transaction_does_not_retry_contract_errors(ms: MetaStore) -> None:
    calls: list[int] = []

    def body(tx: Transaction) -> None:
        calls.append(1)
        tx.create_active("a")
        tx.remove("missing")

    with pytest.raises(NotFoundError):
        ms.with_transaction(body)
    assert calls == [1]
    with ms.transaction(False) as tx, pytest.raises(NotFoundError):
        tx.stat("a")


# -- write skew across processes ----------------------------------------------
ROUNDS = 30


def _skew_worker(uri: str, dbname: str, role: str, barrier: Any, results: Any, rounds: int) -> None:
    """One side of the race: remove(parent-i) or create_active(child-i, parent-i).

    Both sides take their snapshot before either writes and commit only after
    both have written, so every round is a true overlap.
    """
    client: MongoClient[Any] = MongoClient(uri, tz_aware=True)
    try:
        db = client[dbname]
        ms = MetaStore(ManagedStorage(db, GridFSStorage(db)))
        for i in range(rounds):
            parent = f"parent-{i}"
            barrier.wait()  # the parent exists
            tx = ms.transaction_context(True)
            outcome = ""
            try:
                tx.stat(parent)
                barrier.wait()  # both snapshots taken
                if (role == "remove") == (i % 2 == 0):
                    time.sleep(0.02)  # alternate who writes first, so both sides win rounds
                if role == "remove":
                    tx.remove(parent)
                else:
                    tx.create_active(f"child-{i}", parent)
            except CatalogError as exc:
                outcome = type(exc).__name__
            barrier.wait()  # both wrote (or lost) before either commits
            if tx.open:
                try:
                    tx.commit()
                    outcome = "committed"
                except CatalogError as exc:
                    outcome = type(exc).__name__
            results.put((i, role, outcome))
    finally:
        client.close()


def test_no_write_skew_between_remove_parent_and_create_child(
    mongo_uri: str, db: Database[Any], ms: MetaStore
) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3, timeout=60)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_skew_worker, args=(mongo_uri, db.name, role, barrier, results, ROUNDS))
        for role in ("remove", "create")
    ]
    for p in procs:
        p.start()
    try:
        outcomes: dict[int, dict[str, str]] = {}
        for i in range(ROUNDS):
            with ms.transaction(True) as tx:
                tx.create_active("tmp")
                tx.commit_active("tmp", f"parent-{i}")
            barrier.wait()  # release round i
            barrier.wait()  # both took their snapshots
            barrier.wait()  # both wrote
            for _ in range(2):
                j, role, outcome = results.get(timeout=60)
                outcomes.setdefault(j, {})[role] = outcome
    except (queue.Empty, Exception):
        for p in procs:
            p.kill()
        raise
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with ms.transaction(False) as tx:
        for i in range(ROUNDS):
            got = outcomes[i]
            # Exactly one side committed; the other lost the conflict.
            assert sorted(got.values()).count("committed") == 1, got
            assert "WriteConflictError" in got.values(), got
            try:
                tx.get_active(f"child-{i}")
            except NotFoundError:
                assert got["remove"] == "committed"
                with pytest.raises(NotFoundError):
                    tx.stat(f"parent-{i}")
            else:
                assert got["create"] == "committed"
                assert tx.stat(f"parent-{i}").kind == Kind.COMMITTED
    # Both orders happened (the writers alternate who goes first).
    winners = {role for got in outcomes.values() for role, o in got.items() if o == "committed"}
    assert winners == {"remove", "create"}


def _retrying_worker(uri: str, dbname: str, role: str, barrier: Any, rounds: int) -> None:
    """As _skew_worker, unsynchronised inside the round, through with_transaction."""
    client: MongoClient[Any] = MongoClient(uri, tz_aware=True)
    try:
        db = client[dbname]
        ms = MetaStore(ManagedStorage(db, GridFSStorage(db)))
        for i in range(rounds):
            barrier.wait()
            try:
                if role == "remove":
                    ms.with_transaction(lambda tx, i=i: tx.remove(f"parent-{i}"))
                else:
                    ms.with_transaction(
                        lambda tx, i=i: tx.create_active(f"child-{i}", f"parent-{i}")
                    )
            except (NotFoundError, FailedPreconditionError):
                pass  # the other side won
    finally:
        client.close()


def test_no_orphan_children_with_retrying_transactions(
    mongo_uri: str, db: Database[Any], ms: MetaStore
) -> None:
    with ms.transaction(True) as tx:
        for i in range(ROUNDS):
            tx.create_active("tmp")
            tx.commit_active("tmp", f"parent-{i}")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2, timeout=60)
    procs = [
        ctx.Process(target=_retrying_worker, args=(mongo_uri, db.name, role, barrier, ROUNDS))
        for role in ("remove", "create")
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with ms.transaction(False) as tx:
        for i in range(ROUNDS):
            try:
                child = tx.get_active(f"child-{i}")
            except NotFoundError:
                with pytest.raises(NotFoundError):
                    tx.stat(f"parent-{i}")
            else:
                pid, _ = tx.get_info(f"parent-{i}")
                assert child.parent_ids == [pid]
    children = {d["key"]: d["children"] for d in db["snapshots"].find({"kind": "committed"})}
    for key, count in children.items():
        assert count == db["snapshots"].count_documents({"parent": key}), key


def test_needs_transactions() -> None:
    """The in-memory mode (mongomock) has no transactions: refused up front."""
    from catalog import connect

    with pytest.raises(FailedPreconditionError):
        MetaStore(connect("mongomock://snapshots"))
