"""connect(): the embedded default, the in-memory mode, and a clear error without mongod."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import catalog
from catalog.mongod import MongodError, ensure_embedded, find_mongod
from catalog.proof import ranges_checksum


def test_memory_mode_full_cycle() -> None:
    ms = catalog.connect("mongomock://test-memory-mode")
    env = ms.environment("e")
    res = env.put("a", io.BytesIO(b"in memory"))
    assert env.get("a")[0].read() == b"in memory"
    env.put("b", io.BytesIO(b"in memory"))
    assert ms.catalog.get(res.id).refcount == 2
    req = env.request_put("c", res.hash)
    env.prove(req, ranges_checksum(io.BytesIO(b"in memory"), req.ranges))
    assert env.list() == ["a", "b", "c"]
    env.remove("a")
    env.remove("b")
    env.remove("c")
    assert ms.catalog.collection.count_documents({}) == 0
    # one store per URI, shared within the process
    assert catalog.connect("mongomock://test-memory-mode").list_for_environment("e") == []


def test_memory_stores_are_separate() -> None:
    catalog.connect("mongomock://one").put_for_environment("e", "p", io.BytesIO(b"1"))
    assert catalog.connect("mongomock://two").list_for_environment("e") == []


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    state = tmp_path / "mongod.json"
    if state.exists():
        pid = json.loads(state.read_text())["pid"]
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(200):
                os.kill(pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            pass


def test_embedded_mongod_is_started_once_and_reused(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESCAT_DATA_DIR", str(data_dir))
    monkeypatch.delenv("RESCAT_MONGO_URI", raising=False)
    uri = ensure_embedded()
    pid = json.loads((data_dir / "mongod.json").read_text())["pid"]
    assert ensure_embedded() == uri
    assert json.loads((data_dir / "mongod.json").read_text())["pid"] == pid
    ms = catalog.connect()
    ms.put_for_environment("e", "p", io.BytesIO(b"embedded"))
    assert catalog.connect().get_for_environment("e", "p")[0].read() == b"embedded"
    # transactions need a replica set: the embedded server is one
    assert ms._transactions


def test_embedded_mongod_restarts_after_it_died(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESCAT_DATA_DIR", str(data_dir))
    ensure_embedded()
    catalog.connect().put_for_environment("e", "p", io.BytesIO(b"kept"))
    pid = json.loads((data_dir / "mongod.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    ensure_embedded()
    assert json.loads((data_dir / "mongod.json").read_text())["pid"] != pid
    assert catalog.connect().get_for_environment("e", "p")[0].read() == b"kept"


def test_clear_error_without_mongod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESCAT_MONGOD", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(
        sys, "path", [p for p in sys.path if not (Path(p or ".") / "fiftyone").exists()]
    )
    with pytest.raises(MongodError) as info:
        find_mongod()
    message = str(info.value)
    assert "mongod" in message and "pip install" in message and "RESCAT_MONGO_URI" in message


def test_memory_mode_history_names_creates_and_replaces() -> None:
    """The contract's events (create, replace, move, delete), in memory too; not `put`."""
    ms = catalog.connect("mongomock://test-memory-history")
    env = ms.environment("e")
    env.put("a", io.BytesIO(b"1"))
    env.put("a", io.BytesIO(b"2"))
    env.move("a", "b")
    env.put("a", io.BytesIO(b"3"))
    env.remove("a")
    env.put("a", io.BytesIO(b"4"))
    events = [e["event"] for e in ms.history_for_environment("e", "a")]
    assert events == ["create", "replace", "move", "create", "delete", "create"]
    assert [e["event"] for e in ms.history_for_environment("e", "b")] == ["move"]
