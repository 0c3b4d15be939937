"""Acknowledged means durable across failover (a 3-member replica set on loopback).

Reproduces the field notes' data-loss pattern: with both secondaries paused,
an upload's w=1 chunks reach only the primary; the primary is killed while
the majority write that follows waits; the driver retries that write on the
new primary, which never got the chunks. rescat must then refuse the upload
(nothing acknowledged) rather than acknowledge bytes that are gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import signal
import threading
import time
from typing import Any

import pytest
from pymongo import MongoClient

from catalog import CatalogError, ManagedStorage
from catalog.fsck import fsck
from catalog.gc import gc
from storage import GridFSStorage
from tests.helpers import OneWayReader, b3, rand
from tests.replset import ReplicaSet, replica_set

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def rs() -> Any:
    with replica_set() as members:
        yield members


def managed_on(client: MongoClient[Any], name: str) -> ManagedStorage:
    db = client[name]
    return ManagedStorage(db, GridFSStorage(db))


def read_back(managed: ManagedStorage, env: str, path: str) -> bytes:
    reader, _ = managed.get_for_environment(env, path)
    try:
        return reader.read()
    finally:
        reader.close()


def wait_for(predicate: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def test_paused_secondaries_then_kill_primary_acknowledges_nothing_lost(
    rs: ReplicaSet,
) -> None:
    client: MongoClient[Any] = MongoClient(rs.uri, tz_aware=True)
    try:
        managed = managed_on(client, "failover1")
        managed.put_for_environment("e", "warm", io.BytesIO(b"warm-up"))  # indexes exist
        big = rand(16 * MiB, seed=7)
        small = b"small and precious"
        outcome: dict[str, Any] = {}

        def upload(name: str, data: bytes, one_way: bool) -> None:
            reader: Any = OneWayReader(data) if one_way else io.BytesIO(data)
            try:
                outcome[name] = managed.put_for_environment("e", name, reader)
            except (CatalogError, Exception) as exc:  # refused: nothing acknowledged
                outcome[name] = exc

        primary = rs.primary()
        secondaries = [i for i in range(3) if i != primary]
        for i in secondaries:
            rs.signal(i, signal.SIGSTOP)
        threads = [
            threading.Thread(target=upload, args=("big", big, True)),
            threading.Thread(target=upload, args=("small", small, False)),
        ]
        for t in threads:
            t.start()
        # Wait until the big upload's files document reached the primary: every chunk
        # was acknowledged at w=1 and the majority write is waiting.
        with rs.direct(primary) as direct:
            files = direct["failover1"]["resources.files"]
            wait_for(lambda: files.count_documents({"length": len(big)}) == 1)
        rs.kill(primary)
        for i in secondaries:
            rs.signal(i, signal.SIGCONT)
        for t in threads:
            t.join(180)
        assert not any(t.is_alive() for t in threads)

        for name, data in (("big", big), ("small", small)):
            result = outcome[name]
            if isinstance(result, BaseException):
                with pytest.raises(CatalogError):
                    managed.stat_for_environment("e", name)
                continue
            # Acknowledged: it must be there, whole, after the failover.
            assert result.hash == b3(data)
            got = read_back(managed, "e", name)
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        # The 16 MiB upload could not have been durable: it must have been refused.
        assert isinstance(outcome["big"], BaseException), outcome["big"]
        gc(managed, grace=0)
        report = fsck(managed, grace=0, verify_content=True)
        assert report.clean, report.problems
    finally:
        client.close()
        # Bring the killed member back so the set has three members again.
        for i, proc in enumerate(rs.procs):
            if proc is not None and proc.poll() is not None:
                rs.start(i)


def test_step_down_under_concurrent_uploads(rs: ReplicaSet) -> None:
    client: MongoClient[Any] = MongoClient(rs.uri, tz_aware=True, retryWrites=True)
    try:
        managed = managed_on(client, "failover2")
        managed.put_for_environment("e", "warm", io.BytesIO(b"warm-up"))
        acknowledged: dict[str, bytes] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def worker(w: int) -> None:
            n = 0
            while not stop.is_set() and n < 40:
                data = rand(2 * MiB + w) if n % 4 == 0 else rand(4096 + n)
                name = f"w{w}/{n}"
                n += 1
                try:
                    managed.put_for_environment("e", name, OneWayReader(data))
                except Exception:
                    continue  # refused during the election: not acknowledged
                with lock:
                    acknowledged[name] = data

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        wait_for(lambda: len(acknowledged) >= 10)
        primary = rs.primary()
        # The step-down closes our own connection: its error says nothing.
        with rs.direct(primary) as direct, contextlib.suppress(Exception):
            direct.admin.command("replSetStepDown", 10, secondaryCatchUpPeriodSecs=5)
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(180)
        assert len(acknowledged) >= 10
        for name, data in acknowledged.items():
            assert read_back(managed, "e", name) == data, name
        gc(managed, grace=0)
        report = fsck(managed, grace=0, verify_content=True)
        assert report.clean, report.problems
    finally:
        client.close()
