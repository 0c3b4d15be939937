"""A three-member replica set on loopback, for failover tests.

Three small mongods (the field notes' disk flags), member 0 preferred as
primary. The tests pause members with SIGSTOP, kill them with SIGKILL and step
the primary down, so every member is a child process of the test.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from catalog.mongod import find_mongod, free_ports, stop_process

SET_NAME = "rsf"


@dataclass
class ReplicaSet:
    root: Path
    ports: list[int]
    procs: list[subprocess.Popen[bytes] | None] = field(default_factory=list)

    @property
    def uri(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return f"mongodb://{hosts}/?replicaSet={SET_NAME}&serverSelectionTimeoutMS=120000"

    def start(self, i: int) -> None:
        dbpath = self.root / f"m{i}"
        dbpath.mkdir(parents=True, exist_ok=True)
        args = [
            find_mongod(),
            "--dbpath", str(dbpath),
            "--port", str(self.ports[i]),
            "--bind_ip", "127.0.0.1",
            "--replSet", SET_NAME,
            "--oplogSize", "256",
            "--wiredTigerCacheSizeGB", "0.25",
            "--setParameter", "minSnapshotHistoryWindowInSeconds=0",
            "--logpath", str(dbpath / "mongod.log"),
        ]  # fmt: skip
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        if i < len(self.procs):
            self.procs[i] = proc
        else:
            self.procs.append(proc)

    def direct(self, i: int) -> MongoClient[Any]:
        return MongoClient(
            f"mongodb://127.0.0.1:{self.ports[i]}/?directConnection=true",
            serverSelectionTimeoutMS=2000,
        )

    def primary(self, timeout: float = 120.0) -> int:
        """The index of the member that is writable primary now (waits for one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, proc in enumerate(self.procs):
                if proc is None or proc.poll() is not None:
                    continue
                with contextlib.suppress(PyMongoError), self.direct(i) as client:
                    if client.admin.command("hello").get("isWritablePrimary"):
                        return i
            time.sleep(0.2)
        raise TimeoutError("no primary elected")

    def signal(self, i: int, sig: signal.Signals) -> None:
        proc = self.procs[i]
        assert proc is not None
        proc.send_signal(sig)

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        assert proc is not None
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None:
                with contextlib.suppress(OSError):
                    proc.send_signal(signal.SIGCONT)
                stop_process(proc)


@contextlib.contextmanager
def replica_set(members: int = 3) -> Iterator[ReplicaSet]:
    root = Path(tempfile.mkdtemp(prefix="rescat-rs-"))
    rs = ReplicaSet(root, free_ports(members))  # distinct: two members on one port fail
    try:
        for i in range(members):
            rs.start(i)
        config = {
            "_id": SET_NAME,
            "members": [
                {"_id": i, "host": f"127.0.0.1:{p}", "priority": 2 if i == 0 else 1}
                for i, p in enumerate(rs.ports)
            ],
            "settings": {"electionTimeoutMillis": 2000, "heartbeatIntervalMillis": 500},
        }
        deadline = time.monotonic() + 60
        while True:
            try:
                with rs.direct(0) as client:
                    client.admin.command("replSetInitiate", config)
                break
            except PyMongoError as exc:
                if "already initialized" in str(exc):
                    break
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        assert rs.primary() == 0
        _wait_secondaries(rs)
        yield rs
    finally:
        rs.stop()
        shutil.rmtree(root, ignore_errors=True)


def _wait_secondaries(rs: ReplicaSet, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with rs.direct(0) as client:
        while time.monotonic() < deadline:
            status = client.admin.command("replSetGetStatus")
            states = [m["stateStr"] for m in status["members"]]
            if states.count("SECONDARY") == len(rs.ports) - 1:
                return
            time.sleep(0.3)
    raise TimeoutError("secondaries did not come up")
