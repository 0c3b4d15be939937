"""containerd's MetaStore suite, ported case by case to catalog.snapshots.

Source: containerd ``core/snapshots/storage/metastore_test.go`` (HEAD) and the
seed-era ``snapshot/storage/metastore_test.go`` (commit 1c2f5fe20), whose
names (CreateActive, GetActive, CommitActive, readonly actives) are the
contract's. Each test names the containerd case it ports. Where the two
versions differ, the seed's form is used and the newer cases (ParentIDs,
Rebase; CommitViewFails is CommitReadonly) are ported onto the contract's
surface: a containerd "view" is a readonly active here.

Every test gets a fresh database, as containerd's gets a fresh bolt file.
Writes run in a writable transaction that commits when the test body
succeeds; reads run in a read-only transaction after a populate committed in
a writable one, as containerd's inWriteTransaction / inReadTransaction do.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from catalog import ManagedStorage
from catalog.errors import (
    AlreadyExistsError,
    CatalogError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from catalog.snapshots import Active, Info, Kind, MetaStore, Transaction

Populate = Callable[[Transaction], None]


@pytest.fixture
def ms(managed: ManagedStorage) -> MetaStore:
    return MetaStore(managed)


@contextmanager
def in_write_transaction(ms: MetaStore) -> Iterator[Transaction]:
    """Commit when the body succeeds, roll back when it fails (containerd's inWriteTransaction)."""
    tx = ms.transaction_context(True)
    try:
        yield tx
    except BaseException:
        tx.rollback()
        raise
    tx.commit()


@contextmanager
def in_read_transaction(ms: MetaStore, populate: Populate | None) -> Iterator[Transaction]:
    """Populate and commit in a writable transaction, then read in a read-only one."""
    if populate is not None:
        with in_write_transaction(ms) as tx:
            populate(tx)
    tx = ms.transaction_context(False)
    try:
        yield tx
    finally:
        tx.rollback()


def base_populate(tx: Transaction) -> None:
    """Seven snapshots, as containerd's basePopulate.

    committed-1 (no parent), committed-2 (on committed-1), active-1 (no
    parent), active-2 (on committed-1), active-3 (on committed-2), active-4
    (readonly, no parent), active-5 (readonly, on committed-2).
    """
    tx.create_active("committed-tmp-1", "", False)
    tx.commit_active("committed-tmp-1", "committed-1")
    tx.create_active("committed-tmp-2", "committed-1", False)
    tx.commit_active("committed-tmp-2", "committed-2")
    tx.create_active("active-1", "", False)
    tx.create_active("active-2", "committed-1", False)
    tx.create_active("active-3", "committed-2", False)
    tx.create_active("active-4", "", True)
    tx.create_active("active-5", "committed-2", True)


# name -> (parent, kind, readonly)
BASE_INFO: dict[str, tuple[str, Kind, bool]] = {
    "committed-1": ("", Kind.COMMITTED, True),
    "committed-2": ("committed-1", Kind.COMMITTED, True),
    "active-1": ("", Kind.ACTIVE, False),
    "active-2": ("committed-1", Kind.ACTIVE, False),
    "active-3": ("committed-2", Kind.ACTIVE, False),
    "active-4": ("", Kind.ACTIVE, True),
    "active-5": ("committed-2", Kind.ACTIVE, True),
}


def assert_base_info(name: str, info: Info) -> None:
    """Equal to BASE_INFO, with times that are aware and within 30 s of now (containerd's cmp)."""
    parent, kind, readonly = BASE_INFO[name]
    assert (info.name, info.parent, info.kind, info.readonly, info.labels) == (
        name,
        parent,
        kind,
        readonly,
        {},
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    for t in (info.created_at, info.updated_at):
        assert t.tzinfo is not None
        assert abs((now - t).total_seconds()) < 30


# -- GetInfo ------------------------------------------------------------------
def test_get_info(ms: MetaStore) -> None:
    """GetInfo."""
    with in_read_transaction(ms, base_populate) as tx:
        for key in BASE_INFO:
            assert_base_info(key, tx.stat(key))


def test_get_info_not_exist(ms: MetaStore) -> None:
    """GetInfoNotExist."""
    with in_read_transaction(ms, base_populate) as tx, pytest.raises(NotFoundError):
        tx.stat("active-not-exist")


def test_get_info_empty_db(ms: MetaStore) -> None:
    """GetInfoEmptyDB."""
    with in_read_transaction(ms, None) as tx, pytest.raises(NotFoundError):
        tx.stat("active-not-exist")


# -- Walk ---------------------------------------------------------------------
def test_walk(ms: MetaStore) -> None:
    """Walk: every snapshot once, each equal to BASE_INFO."""
    found: dict[str, Info] = {}

    def visit(info: Info) -> None:
        assert info.name not in found, "entry already encountered"
        found[info.name] = info

    with in_read_transaction(ms, base_populate) as tx:
        tx.walk(visit)
    assert set(found) == set(BASE_INFO)
    for name, info in found.items():
        assert_base_info(name, info)


# -- GetActive (GetSnapshot in today's containerd) ----------------------------
def test_get_active(ms: MetaStore) -> None:
    """GetActive: get_active returns what create_active returned."""
    created: dict[str, Active] = {}

    def populate(tx: Transaction) -> None:
        tx.create_active("committed-tmp-1", "", False)
        tx.commit_active("committed-tmp-1", "committed-1")
        for name, parent, readonly in [
            ("active-1", "", False),
            ("active-2", "committed-1", False),
            ("active-3", "", True),
            ("active-4", "committed-1", True),
        ]:
            created[name] = tx.create_active(name, parent, readonly)

    with in_read_transaction(ms, populate) as tx:
        for key, expected in created.items():
            assert tx.get_active(key) == expected, key


def test_get_active_not_exist(ms: MetaStore) -> None:
    """GetActiveNotExist."""
    with in_read_transaction(ms, base_populate) as tx, pytest.raises(NotFoundError):
        tx.get_active("active-not-exist")


def test_get_active_committed(ms: MetaStore) -> None:
    """GetActiveCommitted: a committed snapshot is not active."""
    with in_read_transaction(ms, base_populate) as tx, pytest.raises(FailedPreconditionError):
        tx.get_active("committed-1")


@pytest.mark.parametrize("populate", [None, base_populate], ids=["empty", "populated"])
def test_get_active_empty_db(ms: MetaStore, populate: Populate | None) -> None:
    """GetActiveEmptyDB.

    containerd registers this case with basePopulate (the same body as
    GetActiveNotExist); the name says an empty store, so both run here.
    """
    with in_read_transaction(ms, populate) as tx, pytest.raises(NotFoundError):
        tx.get_active("active-not-exist")


# -- CreateActive -------------------------------------------------------------
def test_create_active(ms: MetaStore) -> None:
    """CreateActive: unique ids, readonly flag, ids kept on commit, parent ids."""
    with in_write_transaction(ms) as tx:
        a1 = tx.create_active("active-1", "", False)
        assert not a1.readonly, "expected a writable active"

        a2 = tx.create_active("active-2", "", True)
        assert a2.id != a1.id, "active ids must be unique"
        assert a2.readonly, "expected a readonly active"

        commit_id = tx.commit_active("active-1", "committed-1")
        assert commit_id == a1.id, "the id must not change on commit"

        a3 = tx.create_active("active-3", "committed-1", False)
        assert a3.id != a1.id, "active ids must be unique"
        assert a3.parent_ids == [commit_id], "the parent is the committed id"
        assert not a3.readonly, "expected a writable active"

        a4 = tx.create_active("active-4", "committed-1", True)
        assert a4.id != a1.id, "active ids must be unique"
        assert a4.parent_ids == [commit_id]
        assert a4.readonly, "expected a readonly active"


def test_create_active_not_exist(ms: MetaStore) -> None:
    """CreateActiveNotExist: an unknown parent."""
    with in_write_transaction(ms) as tx, pytest.raises(NotFoundError):
        tx.create_active("active-1", "does-not-exist", False)


def test_create_active_exist(ms: MetaStore) -> None:
    """CreateActiveExist: a key already used by an active or a committed snapshot."""
    with in_write_transaction(ms) as tx:
        base_populate(tx)
        with pytest.raises(AlreadyExistsError):
            tx.create_active("active-1", "", False)
        with pytest.raises(AlreadyExistsError):
            tx.create_active("committed-1", "", False)


def test_create_active_from_active(ms: MetaStore) -> None:
    """CreateActiveFromActive: the parent must be committed."""
    with in_write_transaction(ms) as tx:
        base_populate(tx)
        with pytest.raises(InvalidArgumentError):
            tx.create_active("active-new", "active-1", False)


# -- Commit -------------------------------------------------------------------
def test_commit(ms: MetaStore) -> None:
    """Commit: the id stays, the key goes, the name is committed."""
    with in_write_transaction(ms) as tx:
        a1 = tx.create_active("active-1", "", False)
        assert not a1.readonly
        commit_id = tx.commit_active("active-1", "committed-1")
        assert commit_id == a1.id, "the id must not change on commit"
        with pytest.raises(NotFoundError):
            tx.get_active("active-1")
        with pytest.raises(FailedPreconditionError):
            tx.get_active("committed-1")


def test_commit_not_exist(ms: MetaStore) -> None:
    """CommitNotExist: committing a key that does not exist.

    containerd defines testCommitNotExist but registers testCommitExist under
    this name; the defined body is ported here, and test_commit_exist covers
    the registered one.
    """
    with in_write_transaction(ms) as tx, pytest.raises(NotFoundError):
        tx.commit_active("active-not-exist", "committed-1")


def test_commit_exist(ms: MetaStore) -> None:
    """CommitExist: the name is taken."""
    with in_write_transaction(ms) as tx:
        base_populate(tx)
        with pytest.raises(AlreadyExistsError):
            tx.commit_active("active-1", "committed-1")


def test_commit_committed(ms: MetaStore) -> None:
    """CommitCommitted: only an active can be committed."""
    with in_write_transaction(ms) as tx:
        base_populate(tx)
        with pytest.raises(FailedPreconditionError):
            tx.commit_active("committed-1", "committed-3")


def test_commit_readonly(ms: MetaStore) -> None:
    """CommitReadonly (CommitViewFails in today's containerd): a readonly active stays active."""
    with in_write_transaction(ms) as tx:
        base_populate(tx)
        with pytest.raises(CatalogError):
            tx.commit_active("active-5", "committed-3")
        # Ours is the contract's error, and the active survives.
        with pytest.raises(FailedPreconditionError):
            tx.commit_active("active-4", "committed-3")
        assert tx.get_active("active-5").readonly


# -- Remove -------------------------------------------------------------------
def test_remove(ms: MetaStore) -> None:
    """Remove: ids returned match the created and committed ids."""
    with in_write_transaction(ms) as tx:
        a1 = tx.create_active("active-1", "", False)
        commit_id = tx.commit_active("active-1", "committed-1")
        assert commit_id == a1.id, "the id must not change on commit"
        a2 = tx.create_active("active-2", "committed-1", True)
        a3 = tx.create_active("active-3", "committed-1", True)

        with pytest.raises(NotFoundError):
            tx.remove("active-1")

        assert tx.remove("active-3") == a3.id
        assert tx.remove("active-2") == a2.id
        assert tx.remove("committed-1") == commit_id
        # The seed's Remove also returns the kind; ours returns the id, so
        # the kinds are checked by what is gone.
        with pytest.raises(NotFoundError):
            tx.stat("committed-1")


def test_remove_not_exist(ms: MetaStore) -> None:
    """RemoveNotExist."""
    with in_write_transaction(ms) as tx, pytest.raises(NotFoundError):
        tx.remove("does-not-exist")


def test_remove_with_children(ms: MetaStore) -> None:
    """RemoveWithChildren: fails, and fails again (the first failure changed nothing)."""
    with in_write_transaction(ms) as tx:
        base_populate(tx)
        with pytest.raises(FailedPreconditionError):
            tx.remove("committed-1")
        with pytest.raises(FailedPreconditionError):
            tx.remove("committed-1")


# -- ParentIDs (today's containerd) -------------------------------------------
@pytest.mark.parametrize(
    ("name", "depth"),
    [
        ("committed-1", 0),
        ("committed-2", 1),
        ("active-1", 0),
        ("active-2", 1),
        ("active-3", 2),
        ("active-4", 0),  # containerd's view-1
        ("active-5", 2),  # containerd's view-2
    ],
)
def test_parent_ids(ms: MetaStore, name: str, depth: int) -> None:
    """ParentIDs: walking down the chain, every level agrees with get_info's id.

    A committed snapshot is resolved through a readonly active made on it
    (containerd makes a view); an active through get_active.
    """
    with in_write_transaction(ms) as tx:
        base_populate(tx)
        expected_id = ""
        expected_parents: list[str] = []
        for i in range(depth, -1, -1):
            sid, info = tx.get_info(name)
            if info.kind == Kind.COMMITTED:
                s = tx.create_active(f"test-{name}-{i}", name, True)
                assert len(s.parent_ids) == i + 1
                got_id, parents = s.parent_ids[0], s.parent_ids[1:]
            else:
                a = tx.get_active(name)
                assert len(a.parent_ids) == i
                got_id, parents = a.id, a.parent_ids
            assert sid == got_id, f"get_info id differs from the resolved id for {name}"
            if expected_id:
                assert got_id == expected_id
            assert parents[: len(expected_parents)] == expected_parents
            if i > 0:
                name = info.parent
                expected_id, expected_parents = parents[0], parents[1:]


# -- Rebase (today's containerd) ----------------------------------------------
@pytest.mark.parametrize(
    ("key", "name", "old_parent", "new_parent", "fails"),
    [
        ("rebase-active-1", "rebase-committed-1", "", "committed-1", False),
        ("rebase-active-2", "rebase-committed-2", "committed-1", "committed-1", False),
        ("rebase-active-3", "rebase-committed-3", "", "nonexist", True),
        ("rebase-active-4", "rebase-committed-4", "committed-1", "", False),
        ("rebase-active-5", "rebase-committed-5", "", "active-1", True),
    ],
)
def test_rebase(
    ms: MetaStore, key: str, name: str, old_parent: str, new_parent: str, fails: bool
) -> None:
    """Rebase: an active without a parent may take one on commit."""
    with in_write_transaction(ms) as tx:
        base_populate(tx)
        tx.create_active(key, old_parent, False)
        if fails:
            with pytest.raises(CatalogError):
                tx.commit_active(key, name, parent=new_parent)
            return
        commit_id = tx.commit_active(key, name, parent=new_parent)
        tx.create_active(f"{name}-view", name, True)
        pid, _ = tx.get_info(new_parent or old_parent)
        assert tx.get_active(f"{name}-view").parent_ids == [commit_id, pid]
        with pytest.raises(FailedPreconditionError):
            tx.remove(name)


def test_rebase_errors_are_the_contracts(ms: MetaStore) -> None:
    """Rebase's failing cases, with the contract's errors, and a changed parent refused."""
    with in_write_transaction(ms) as tx:
        base_populate(tx)
        tx.create_active("r", "", False)
        with pytest.raises(NotFoundError):
            tx.commit_active("r", "r-c", parent="nonexist")
        with pytest.raises(InvalidArgumentError):
            tx.commit_active("r", "r-c", parent="active-1")
        tx.create_active("s", "committed-1", False)
        with pytest.raises(InvalidArgumentError):
            tx.commit_active("s", "s-c", parent="committed-2")
        # Every refusal left both actives as they were.
        assert tx.get_active("r").parent_ids == []
        assert tx.stat("s").parent == "committed-1"
