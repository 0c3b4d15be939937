"""kill -9 a `rescat put` mid-upload: nothing becomes visible, and gc leaves no bytes behind."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from pymongo.database import Database

from catalog import ManagedStorage, NotFoundError
from catalog.fsck import fsck
from catalog.gc import gc

RESCAT = str(Path(sys.executable).with_name("rescat"))
MiB = 1024 * 1024
LEASE = 2.0
GRACE = 1.0


def start_put(
    mongo_uri: str, db: Database[Any], args: list[str], stdin: Any = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "RESCAT_UPLOAD_LEASE": str(LEASE)}
    return subprocess.Popen(
        [RESCAT, "--mongo-uri", mongo_uri, "--database", db.name, "put", *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def kill_when_chunks(proc: subprocess.Popen[bytes], db: Database[Any], at_least: int) -> int:
    """SIGKILL `proc` once `at_least` chunks are stored; the chunk count then."""
    chunks = db["resources.chunks"]
    deadline = time.monotonic() + 120
    while chunks.count_documents({}) < at_least:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"put ended ({proc.returncode}) before it was killed: {out!r} {err!r}")
        assert time.monotonic() < deadline, "no chunks were written"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return chunks.count_documents({})


def gc_after_grace(mongo_uri: str, db: Database[Any]) -> dict[str, Any]:
    """`rescat gc --grace GRACE` once the lease and the grace have run out."""
    time.sleep(max(LEASE, GRACE) + 1.5)  # ObjectId times are whole seconds
    args = ["--mongo-uri", mongo_uri, "--database", db.name, "gc", "--grace", str(GRACE), "--json"]
    done = subprocess.run(
        [RESCAT, *args],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def assert_nothing_stored(db: Database[Any]) -> None:
    for name in ("catalog", "paths", "resources.files", "resources.chunks"):
        assert db[name].count_documents({}) == 0, name


@pytest.mark.slow
def test_kill_9_during_a_200_mib_put(
    mongo_uri: str, db: Database[Any], managed: ManagedStorage, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(200):
            f.write(os.urandom(MiB))

    proc = start_put(mongo_uri, db, ["env", "big.bin", str(big)])
    written = kill_when_chunks(proc, db, at_least=24)
    assert 0 < written < 200  # killed in the middle

    with pytest.raises(NotFoundError):
        managed.stat_for_environment("env", "big.bin")
    assert managed.list_for_environment("env") == []
    assert db["resources.files"].count_documents({}) == 0  # never committed
    (pending,) = db.catalog.find({})
    assert pending["state"] == "pending"  # the dead uploader's reference

    # Right away, gc keeps it all: the lease is live and the chunks are fresh.
    early = gc(managed, grace=60)
    assert (early.entries, early.bytes) == (0, 0)
    assert db["resources.chunks"].count_documents({}) >= written

    report = gc_after_grace(mongo_uri, db)
    assert report["abandoned_pending"] == 1
    assert report["orphan_chunk_files"] == 1
    assert report["orphan_chunks"] >= written
    assert report["bytes"] == report["orphan_chunks"] * MiB
    assert_nothing_stored(db)
    assert fsck(managed, grace=0).clean

    # The content can be stored afresh.
    proc = start_put(mongo_uri, db, ["env", "big.bin", str(big)])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert managed.stat_for_environment("env", "big.bin").length == 200 * MiB

    # `rescat get` streams: its memory stays far below the object's size.
    out = tmp_path / "out.bin"
    args = ["--mongo-uri", mongo_uri, "--database", db.name, "get", "env", "big.bin"]
    get = subprocess.Popen([RESCAT, *args, "-o", str(out)], stderr=subprocess.PIPE)
    peak = 0
    watched = psutil.Process(get.pid)
    while get.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, watched.memory_info().rss)
        time.sleep(0.01)
    assert get.returncode == 0, get.stderr
    assert out.stat().st_size == 200 * MiB
    assert 0 < peak < 120 * MiB, peak


@pytest.mark.slow
def test_kill_9_during_a_streamed_put(
    mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    """From a pipe the hash is unknown until the end: no catalog entry exists, only chunks."""
    proc = start_put(mongo_uri, db, ["env", "stream", "-"], stdin=subprocess.PIPE)
    assert proc.stdin is not None
    block = os.urandom(MiB)
    try:
        for _ in range(40):
            proc.stdin.write(block)
        proc.stdin.flush()
    except BrokenPipeError:  # pragma: no cover
        pytest.fail("rescat put died early")
    written = kill_when_chunks(proc, db, at_least=8)
    proc.stdin.close()
    assert written > 0
    with pytest.raises(NotFoundError):
        managed.stat_for_environment("env", "stream")
    assert db.catalog.count_documents({}) == 0

    report = gc_after_grace(mongo_uri, db)
    # An insert already sent when the client died may still land: >=.
    assert report["orphan_chunks"] >= written and report["entries"] == 0
    assert_nothing_stored(db)


_DIE_AFTER_LINK = """
import io, os, signal, sys
from catalog import connect
ms = connect(sys.argv[1], sys.argv[2], lease=float(sys.argv[3]))
ms.put_for_environment("env", "p", io.BytesIO(os.urandom(int(sys.argv[4]))))
# Die between a replace's commit point (the path's upsert) and the release of
# what the path held before, as a kill -9 landing there would.
ms._release = lambda rid: os.kill(os.getpid(), signal.SIGKILL)
ms.put_for_environment("env", "p", io.BytesIO(b"new small"))
"""


@pytest.mark.parametrize("old_size", [100, MiB], ids=["inline", "gridfs"])
def test_kill_9_between_a_replace_and_its_release(
    mongo_uri: str, db: Database[Any], managed: ManagedStorage, old_size: int
) -> None:
    """The replace stands; the count left one too high is fsck's to see and gc's to fix."""
    args = [mongo_uri, db.name, str(LEASE), str(old_size)]
    done = subprocess.run(
        [sys.executable, "-c", _DIE_AFTER_LINK, *args], capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    reader, _ = managed.get_for_environment("env", "p")
    assert reader.read() == b"new small"  # the commit point was passed
    time.sleep(LEASE + GRACE + 1.5)  # the old entry's lease, then gc's grace
    assert fsck(managed, grace=0).kinds() == {"refcount_mismatch"}
    assert gc(managed, grace=GRACE).entries == 1
    assert fsck(managed, grace=0).clean
    (entry,) = db["catalog"].find({})  # the old content went, with its bytes
    assert bytes(entry["data"]) == b"new small"
    assert db["resources.files"].count_documents({}) == 0
    reader, _ = managed.get_for_environment("env", "p")
    assert reader.read() == b"new small"


def test_a_failed_release_after_a_replace_does_not_fail_the_put(
    db: Database[Any], managed: ManagedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the commit point, the put stands and keeps the reference its path holds."""
    from pymongo.errors import AutoReconnect

    managed.put_for_environment("env", "p", io.BytesIO(b"old"))

    def lost(rid: str) -> None:
        raise AutoReconnect("connection lost while releasing")

    monkeypatch.setattr(managed, "_release", lost)
    managed.put_for_environment("env", "p", io.BytesIO(b"new"))
    monkeypatch.undo()
    reader, _ = managed.get_for_environment("env", "p")
    assert reader.read() == b"new"
    new = db["catalog"].find_one({"hash": managed.stat_for_environment("env", "p").hash})
    assert new is not None and new["refcount"] == 1  # the put's reference was kept
    assert db["catalog"].count_documents({}) == 2  # "old", one count too many until gc
