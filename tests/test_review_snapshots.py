"""Review of the snapshot metastore as a containerd snapshotter would use it.

Each test reproduces one defect found in review (real mongod, no mocks).
"""

from __future__ import annotations

from typing import Any

import pytest
from pymongo.database import Database

from catalog import ManagedStorage
from catalog.errors import InvalidArgumentError
from catalog.snapshots import MetaStore


@pytest.fixture
def ms(managed: ManagedStorage) -> MetaStore:
    return MetaStore(managed)


def test_transactions_creating_unrelated_snapshots_both_commit(
    ms: MetaStore, db: Database[Any]
) -> None:
    """Two open transactions that create different keys share no data: neither may lose.

    containerd's bolt store serializes writers, so parallel Prepare calls of
    unrelated snapshots all succeed; here they used to collide on the
    namespace's id counter and the second one failed with a write conflict.
    """
    with ms.transaction(True) as tx:
        tx.create_active("tmp")
        tx.commit_active("tmp", "base-1")
        tx.create_active("tmp")
        tx.commit_active("tmp", "base-2")
    first = ms.transaction_context(True)
    second = ms.transaction_context(True)
    try:
        a = first.create_active("a")  # first stays open while second writes
        b = second.create_active("b")
        c = first.create_active("c", "base-1")
        d = second.create_active("d", "base-2")
        second.commit()
        first.commit()
    finally:
        for tx in (first, second):
            if tx.open:  # a failure must not leave a transaction holding its locks
                tx.rollback()
    assert len({a.id, b.id, c.id, d.id}) == 4
    with ms.transaction(False) as tx:
        id_map = tx.id_map()
        assert [id_map[x.id] for x in (a, b, c, d)] == ["a", "b", "c", "d"]
        assert tx.get_active("d") == d


def test_an_empty_label_value_unsets_the_label(ms: MetaStore) -> None:
    """containerd never stores a label whose value is empty: setting one to "" removes it.

    That is how its clients drop a label through UpdateInfo (e.g. a GC root or
    reference, where the mere presence of the key counts); a stored "" kept it.
    """
    gc_root = "containerd.io/gc.root"
    with ms.transaction(True) as tx:
        tx.create_active("a", labels={gc_root: "", "keep": "1"})
        assert tx.stat("a").labels == {"keep": "1"}
        tx.update("a", {gc_root: "2024", "keep": "1"})
        assert tx.update("a", {gc_root: ""}, ["labels." + gc_root]).labels == {"keep": "1"}
        assert tx.stat("a").labels == {"keep": "1"}
        assert tx.update("a", {"keep": "", "x": "y"}).labels == {"x": "y"}
        assert tx.update("a", {"x": "", "z": "1"}, ["labels"]).labels == {"z": "1"}
        tx.commit_active("a", "a-c", labels={gc_root: "", "z": "2"})
    with ms.transaction(False) as tx:
        assert tx.stat("a-c").labels == {"z": "2"}


def test_bad_input_raises_invalid_argument_and_leaves_the_transaction_usable(
    ms: MetaStore,
) -> None:
    """Keys and labels that are no UTF-8 text, or label keys that are not strings, are bad input.

    They used to escape as UnicodeEncodeError (from the BSON encoder) or
    TypeError (from sorting mixed keys), not the contract's InvalidArgumentError.
    """
    bad = "snap\udc80"  # a lone surrogate: no UTF-8 encoding exists
    tx = ms.transaction_context(True)
    try:
        calls: list[Any] = [
            lambda: tx.stat(bad),  # the first call of the transaction
            lambda: tx.create_active(bad),
            lambda: tx.create_active("ok", bad),
            lambda: tx.get_active(bad),
            lambda: tx.get_info(bad),
            lambda: tx.remove(bad),
            lambda: tx.commit_active(bad, "name"),
            lambda: tx.commit_active("ok", bad),
            lambda: tx.update(bad, {}),
            lambda: tx.create_active("ok", labels={bad: "v"}),
            lambda: tx.create_active("ok", labels={"k": bad}),
            lambda: tx.create_active("ok", labels={1: "a", "b": "c"}),
            lambda: tx.update("ok", {"k": "v"}, None),
            lambda: tx.update("ok", {"k": "v"}, 5),
        ]
        for call in calls:
            with pytest.raises(InvalidArgumentError):
                call()
            assert tx.open
        tx.create_active("ok", labels={"k": "v"})
        tx.commit()
    finally:
        if tx.open:
            tx.rollback()
    with ms.transaction(False) as ro:
        assert ro.stat("ok").labels == {"k": "v"}
        seen: list[str] = []
        ro.walk(lambda info: seen.append(info.name))
        assert seen == ["ok"]
