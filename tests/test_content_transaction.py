"""ManagedStorage.transaction(): puts, removes and moves land together or not at all."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from pymongo.database import Database

from catalog import ManagedStorage, NotFoundError
from catalog.errors import NoTransactionError
from catalog.fsck import fsck
from catalog.gc import gc
from tests.helpers import b3, rand


def read(managed: ManagedStorage, env: str, path: str) -> bytes:
    reader, _ = managed.get_for_environment(env, path)
    with reader:
        return reader.read()


def test_group_takes_effect_together(managed: ManagedStorage) -> None:
    managed.put_for_environment("a", "old", io.BytesIO(b"old"))
    managed.put_for_environment("b", "gone", io.BytesIO(b"gone"))
    big = rand(300_000)
    with managed.transaction() as tx:
        tx.put("a", "new", io.BytesIO(big))
        tx.put("b", "small", io.BytesIO(b"small"))
        tx.remove("b", "gone")
        tx.move("a", "old", "renamed")
        with pytest.raises(NotFoundError):
            managed.stat_for_environment("a", "new")  # nothing visible before the end
    assert read(managed, "a", "new") == big
    assert read(managed, "b", "small") == b"small"
    assert read(managed, "a", "renamed") == b"old"
    assert managed.list_for_environment("a") == ["new", "renamed"]
    assert managed.list_for_environment("b") == ["small"]
    assert fsck(managed, grace=0).clean


def test_exception_rolls_everything_back(managed: ManagedStorage, db: Database[Any]) -> None:
    managed.put_for_environment("a", "keep", io.BytesIO(b"keep"))
    with pytest.raises(RuntimeError), managed.transaction() as tx:
        tx.put("a", "big", io.BytesIO(rand(500_000)))
        tx.put("a", "small", io.BytesIO(b"tiny"))
        tx.remove("a", "keep")
        raise RuntimeError("changed my mind")
    assert managed.list_for_environment("a") == ["keep"]
    gc(managed, grace=0)
    assert db["resources.files"].count_documents({}) == 0
    assert db["catalog"].count_documents({}) == 1
    assert fsck(managed, grace=0).clean


def test_missing_path_fails_and_nothing_takes_effect(managed: ManagedStorage) -> None:
    managed.put_for_environment("a", "x", io.BytesIO(b"x"))
    tx = managed.transaction()
    tx.put("a", "y", io.BytesIO(b"y"))
    with pytest.raises(NotFoundError):
        tx.remove("a", "missing")  # at the call
    tx.remove("a", "x")
    managed.remove_for_environment("a", "x")  # gone before the block ends
    with pytest.raises(NotFoundError):
        tx.commit()  # ... so at the end, and nothing happens
    assert managed.list_for_environment("a") == []
    assert fsck(managed, grace=0).clean


def test_calls_after_the_end_raise(managed: ManagedStorage) -> None:
    with managed.transaction() as tx:
        tx.put("a", "p", io.BytesIO(b"p"))
    for call in (
        lambda: tx.put("a", "q", io.BytesIO(b"q")),
        lambda: tx.remove("a", "p"),
        lambda: tx.move("a", "p", "r"),
        tx.commit,
        tx.rollback,
    ):
        with pytest.raises(NoTransactionError):
            call()
    tx2 = managed.transaction()
    tx2.rollback()
    with pytest.raises(NoTransactionError):
        tx2.put("a", "z", io.BytesIO(b"z"))
    assert managed.list_for_environment("a") == ["p"]


def test_reader_never_sees_half_a_group(managed: ManagedStorage) -> None:
    """Group i writes a=i and b=i, creates r/i and removes r/(i-1): listings show all or none."""
    stop = threading.Event()
    bad: list[Any] = []
    seen = 0

    def reader() -> None:
        nonlocal seen
        while not stop.is_set():
            docs = {d["path"]: d["hash"] for d in managed.iter_paths("e")}
            if not docs:
                continue
            seen += 1
            a = names.get(docs.get("a", ""))
            b = names.get(docs.get("b", ""))
            rs = sorted(p for p in docs if p.startswith("r/"))
            if a is None or a != b or rs != [f"r/{a}"]:
                bad.append((a, b, rs))

    names = {b3(f"{i}".encode()): i for i in range(40)}
    with managed.transaction() as tx:
        tx.put("e", "a", io.BytesIO(b"0"))
        tx.put("e", "b", io.BytesIO(b"0"))
        tx.put("e", "r/0", io.BytesIO(b"r"))
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 40):
            with managed.transaction() as tx:
                tx.put("e", "a", io.BytesIO(f"{i}".encode()))
                tx.put("e", "b", io.BytesIO(f"{i}".encode()))
                tx.put("e", f"r/{i}", io.BytesIO(b"r"))
                tx.remove("e", f"r/{i - 1}")
    finally:
        stop.set()
        thread.join(30)
    assert seen > 0
    assert not bad, bad[:5]


def test_calls_see_the_earlier_calls_of_their_transaction(managed: ManagedStorage) -> None:
    managed.put_for_environment("e", "a", io.BytesIO(b"A"))
    managed.put_for_environment("e", "z", io.BytesIO(b"Z"))
    with pytest.raises(NotFoundError), managed.transaction() as tx:
        tx.put("e", "n", io.BytesIO(b"N"))
        tx.move("e", "n", "n2")  # put, then moved on
        tx.move("e", "a", "c")
        tx.move("e", "c", "d")  # a chain of moves
        tx.put("e", "t", io.BytesIO(b"T"))
        tx.remove("e", "t")  # put, then removed
        tx.remove("e", "z")
        with pytest.raises(NotFoundError):
            tx.move("e", "a", "b")  # a moved away earlier in this transaction
    assert managed.list_for_environment("e") == ["a", "z"]  # ... so nothing took effect

    with managed.transaction() as tx:
        tx.put("e", "n", io.BytesIO(b"N"))
        tx.move("e", "n", "n2")
        tx.move("e", "a", "c")
        tx.move("e", "c", "d")
        tx.put("e", "t", io.BytesIO(b"T"))
        tx.remove("e", "t")
        tx.remove("e", "z")
    assert managed.list_for_environment("e") == ["d", "n2"]
    assert read(managed, "e", "d") == b"A" and read(managed, "e", "n2") == b"N"
    assert fsck(managed, grace=0).clean


def test_a_caught_not_found_still_means_nothing_takes_effect(managed: ManagedStorage) -> None:
    with pytest.raises(NotFoundError), managed.transaction() as tx:
        tx.put("e", "y", io.BytesIO(b"Y"))
        with pytest.raises(NotFoundError):
            tx.remove("e", "missing")
        # the caller went on; the block's end raises the error again
    assert managed.list_for_environment("e") == []
    assert fsck(managed, grace=0).clean


def test_a_transaction_puts_bytes_as_an_environment_does(managed: ManagedStorage) -> None:
    """env.put took bytes; tx.put raised AttributeError: 'bytes' object has no attribute
    'read'. Text is refused with a TypeError that says what to do, in both."""
    with managed.transaction() as tx:
        tx.put("e", "from-bytes", b"1")
        tx.put("e", "from-view", memoryview(b"22"))
        with pytest.raises(TypeError, match="binary"):
            tx.put("e", "text", "3")  # type: ignore[arg-type]
    assert managed.get_for_environment("e", "from-bytes")[0].read() == b"1"
    assert managed.get_for_environment("e", "from-view")[0].read() == b"22"
