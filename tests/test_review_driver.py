"""Review of the registry driver face: writer sessions across processes and signed URLs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
from pymongo.database import Database

from catalog import CatalogError, ManagedStorage, UploadPendingError
from catalog.driver import StorageDriver
from storage import GridFSStorage

MiB = 1024 * 1024
NAME = "regdrv"


@pytest.fixture
def short_lease(db: Database[Any]) -> ManagedStorage:
    return ManagedStorage(db, GridFSStorage(db), lease=1.0)


# -- a writer that lost its session must not touch the bytes of the one that took it --------
STALE_WRITER = r"""
import sys
from pymongo import MongoClient
from catalog import ManagedStorage
from catalog.driver import StorageDriver
from storage import GridFSStorage
uri, name, path = sys.argv[1:4]
db = MongoClient(uri, tz_aware=True)[name]
d = StorageDriver(ManagedStorage(db, GridFSStorage(db), lease=1.0), "reg")
w = d.writer(path)
w.write(b"\x01" * (1048576 + 17))
w.close()
w = d.writer(path, append=True)
print("ready", flush=True)
sys.stdin.readline()
try:
    w.write(b"\x03" * (2 * 1048576))
    w.close()
    print("kept", flush=True)
except Exception as exc:
    print("refused", type(exc).__name__, flush=True)
"""


@pytest.mark.slow
def test_a_stopped_writer_cannot_overwrite_the_content_of_the_writer_that_took_over(
    short_lease: ManagedStorage, mongo_uri: str, db: Database[Any]
) -> None:
    """A writer stalled past its lease (SIGSTOP, a paused VM) wakes up mid-write.

    Another process took the session over and committed it meanwhile; the
    stalled writer's next chunk write must fail, not overwrite a chunk of
    the committed file (which every path deduplicated to that hash reads).
    """
    driver = StorageDriver(short_lease, "reg", name=NAME)
    child = subprocess.Popen(
        [sys.executable, "-c", STALE_WRITER, mongo_uri, db.name, "/layer"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while True:
            try:
                writer = driver.writer("/layer", append=True)
                break
            except UploadPendingError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert writer.size() == MiB + 17
        writer.write(b"\x02" * (2 * MiB))
        writer.commit()
        expected = b"\x01" * (MiB + 17) + b"\x02" * (2 * MiB)
        assert driver.get_content("/layer") == expected
    finally:
        os.kill(child.pid, signal.SIGCONT)
    out, err = child.communicate("go\n", timeout=120)
    assert child.returncode == 0, err
    assert out.split()[0] == "refused", out
    assert driver.get_content("/layer") == expected
    chunks = db["resources.chunks"].find({}, {"n": 1, "data": 1}, sort=[("n", 1)])
    assert b"".join(bytes(c["data"]) for c in chunks) == expected


def test_a_writer_stalled_between_its_claim_check_and_its_write_changes_nothing(
    short_lease: ManagedStorage, db: Database[Any]
) -> None:
    """The claim check before each chunk write leaves a window: a writer that stalls
    after it (and before the database applies the write) still overwrote the tail chunk
    of the file its successor committed. The chunk is now replaced only if it still holds
    what this writer stored there, so the stale write is refused by the database itself."""
    driver = StorageDriver(short_lease, "reg", name=NAME)
    first = driver.writer("/layer")
    first.write(b"\x01" * (MiB + 17))
    first.close()  # a partial tail of 17 bytes is stored as chunk 1
    stale = driver.writer("/layer", append=True)
    session = stale._writer
    session._heartbeat.__exit__(None, None, None)  # it stalls: no more renewals...
    deadline = time.monotonic() + 60
    while True:
        try:
            successor = driver.writer("/layer", append=True)
            break
        except UploadPendingError:  # ...until its lease runs out and another writer takes over
            assert time.monotonic() < deadline
            time.sleep(0.2)
    successor.write(b"\x02" * (2 * MiB))
    successor.commit()
    expected = b"\x01" * (MiB + 17) + b"\x02" * (2 * MiB)
    assert driver.get_content("/layer") == expected
    # It wakes up past its claim check (the stall came just after it) and writes.
    session._fence = lambda: None  # type: ignore[method-assign]
    with pytest.raises(CatalogError):
        stale.write(b"\x03" * (2 * MiB))
        stale.close()
    assert driver.get_content("/layer") == expected
    chunks = db["resources.chunks"].find({}, {"n": 1, "data": 1}, sort=[("n", 1)])
    assert b"".join(bytes(c["data"]) for c in chunks) == expected


def test_delete_of_a_directory_discards_the_writes_unfinished_under_it(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """A deleted directory's unfinished writer sessions must not come back.

    They stayed until gc's --session-max-age (7 days): writer(append=True)
    after the delete resumed the old bytes, where a file system (the registry's
    reference driver) has no file there any more. A session a live writer
    holds is that writer's.
    """
    driver = StorageDriver(managed, "reg", name="rescat")
    stale = driver.writer("/dir/stale")
    stale.write(b"written before the delete")
    stale.close()
    keep = driver.writer("/dirx/other")  # beside the directory, not under it
    keep.write(b"kept")
    keep.close()
    live = driver.writer("/dir/live")
    live.write(b"still writing")
    driver.put_content("/dir/file", b"x")
    driver.delete("/dir")
    assert db["upload_sessions"].count_documents({"path": "dir/stale"}) == 0
    with pytest.raises(CatalogError):  # nothing to append to: no file, no session
        driver.writer("/dir/stale", append=True)
    resumed = driver.writer("/dirx/other", append=True)
    assert resumed.size() == 4
    resumed.close()
    live.write(b", and done")
    live.commit()
    assert driver.get_content("/dir/live") == b"still writing, and done"


@pytest.mark.parametrize("change", ["delete", "move", "replace", "kv delete"])
def test_an_append_session_does_not_outlive_the_bytes_it_began_with(
    managed: ManagedStorage, change: str
) -> None:
    """An append session starts as a copy of the file. Deleted, moved away or replaced
    through another face (HTTP, the CLI, the KV store all change paths through
    ManagedStorage), the file's old bytes came back through writer(append=True)."""
    import io

    from catalog import NotFoundError
    from catalog.kv import KVStore

    driver = StorageDriver(managed, "reg", name="rescat")
    driver.put_content("/f", b"secret-base")
    w = driver.writer("/f", append=True)
    w.write(b"+tail")
    w.close()
    again = driver.writer("/f", append=True)  # unchanged: it resumes
    assert again.size() == len(b"secret-base+tail")
    again.close()
    if change == "delete":
        managed.delete_path("reg", "f")
    elif change == "move":
        managed.move_for_environment("reg", "f", "g")
    elif change == "replace":
        managed.put_path("reg", "f", io.BytesIO(b"new"), 3)
    else:
        store = KVStore(managed, "reg")
        store.delete("f")
        store.close()
    if change == "replace":  # appends to what the file holds now
        w = driver.writer("/f", append=True)
        assert w.size() == 3
        w.write(b"+more")
        w.commit()
        assert driver.get_content("/f") == b"new+more"
    else:
        with pytest.raises(NotFoundError):
            driver.writer("/f", append=True)
        with pytest.raises(NotFoundError):
            driver.get_content("/f")
    assert managed.db["upload_sessions"].count_documents({"path": "f"}) == 0


def test_a_commit_whose_new_bytes_were_rolled_back_keeps_what_a_close_confirmed(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    """A failover rolls back the chunks written since the last checkpoint; the commit that
    finds them gone used to delete the whole session, the bytes an earlier close()
    confirmed durable with it. It keeps those, to resume from, and says from where."""
    from catalog import NotFoundError
    from storage import NotDurableError

    chunk = managed.resource_storage.chunk_size
    driver = StorageDriver(managed, "reg", name="rescat")
    first, more = os.urandom(3 * chunk), os.urandom(2 * chunk)
    w = driver.writer("/layer")
    w.write(first)
    w.close()  # checkpointed: durable
    w = driver.writer("/layer", append=True)
    w.write(more)
    chunks = db["resources.chunks"]
    session = db["upload_sessions"].find_one({"path": "layer"})
    assert session is not None
    deadline = time.monotonic() + 30
    while chunks.count_documents({"files_id": session["file_id"]}) < 5:  # the w=1 writes
        assert time.monotonic() < deadline
        time.sleep(0.01)
    chunks.delete_many({"files_id": session["file_id"], "n": {"$gte": 3}})  # ...rolled back
    with pytest.raises(NotDurableError, match=f"resume from offset {3 * chunk}"):
        w.commit()
    with pytest.raises(NotFoundError):
        driver.get_content("/layer")
    resumed = driver.writer("/layer", append=True)
    assert resumed.size() == 3 * chunk
    resumed.write(more)
    resumed.commit()
    assert driver.get_content("/layer") == first + more


def test_racing_writers_never_make_a_name_both_a_file_and_a_directory(
    managed: ManagedStorage,
) -> None:
    """put_content('/rN') and put_content('/rN/x') at once: both passed the check made
    before the write and both wrote, 150 rounds of 150. Now exactly one stands."""
    import threading

    from catalog.errors import InvalidPathError

    driver = StorageDriver(managed, "reg", name="rescat")
    both = 0
    for n in range(40):
        barrier = threading.Barrier(2)
        outcome: dict[str, bool] = {}

        def put(
            path: str, barrier: threading.Barrier = barrier, outcome: dict[str, bool] = outcome
        ) -> None:
            barrier.wait()
            try:
                driver.put_content(path, path.encode())
                outcome[path] = True
            except InvalidPathError:
                outcome[path] = False

        file, below = f"/r{n}", f"/r{n}/x"
        threads = [threading.Thread(target=put, args=(p,)) for p in (file, below)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        both += outcome[file] and outcome[below]
        assert outcome[file] != outcome[below], outcome  # one wins, the other is refused
        if outcome[file]:
            assert driver.get_content(file) == file.encode()
            assert not driver.stat(file).is_dir
        else:
            assert driver.list(file) == [below] and driver.get_content(below) == below.encode()
    assert both == 0


def test_a_driver_write_undoes_only_its_own_new_file(
    managed: ManagedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The undo of a write that lost a file/directory race deleted what the path held
    then: a file that was there before the write (its old bytes lost with it), or an
    acknowledged write made through another face right after. Other faces' writes land
    here between the driver's check and its write, and after its write."""
    import io

    from catalog.errors import InvalidPathError

    driver = StorageDriver(managed, "reg", name="rescat")
    real = managed.put_path
    driver.put_content("/cfg/app", b"v1")

    def below_first(env: str, rel: str, *args: Any, **kw: Any) -> Any:
        managed.put_for_environment("reg", rel + "/extra", io.BytesIO(b"x"), 1)
        return real(env, rel, *args, **kw)

    monkeypatch.setattr(managed, "put_path", below_first)
    driver.put_content("/cfg/app", b"v2")  # it was a file already: replaced, never undone
    monkeypatch.setattr(managed, "put_path", real)
    assert managed.get_for_environment("reg", "cfg/app")[0].read() == b"v2"

    def raced(env: str, rel: str, *args: Any, **kw: Any) -> Any:
        managed.put_for_environment("reg", rel + "/c", io.BytesIO(b"below"), 5)
        info = real(env, rel, *args, **kw)
        real("reg", rel, io.BytesIO(b"http"), 4)  # acknowledged, through another face
        return info

    monkeypatch.setattr(managed, "put_path", raced)
    with pytest.raises(InvalidPathError):
        driver.put_content("/a/b", b"driver")  # new, and later than a/b/c: it loses
    monkeypatch.setattr(managed, "put_path", real)
    assert managed.get_for_environment("reg", "a/b")[0].read() == b"http"


def test_an_append_commit_never_brings_old_bytes_back_over_a_newer_write(
    managed: ManagedStorage,
) -> None:
    """writer(append=True) begins with a copy of the file; another face replaced the file
    meanwhile, and the commit wrote the old bytes plus the appended ones over it. The
    commit is refused now, nothing changed, and the writer can be cancelled."""
    import io

    from catalog.errors import PreconditionFailedError

    driver = StorageDriver(managed, "reg", name="rescat")
    for size in (3, 5 * 1024 * 1024):  # inline and stored content
        driver.put_content("/f", b"v" * size)
        w = driver.writer("/f", append=True)
        w.write(b"appended;")
        managed.put_path("reg", "f", io.BytesIO(b"v2 from HTTP;"), 13)
        with pytest.raises(PreconditionFailedError, match="since this append began"):
            w.commit()
        assert driver.get_content("/f") == b"v2 from HTTP;"
        w.cancel()
        fresh = driver.writer("/f", append=True)  # over the current bytes, it commits
        fresh.write(b"+")
        fresh.commit()
        assert driver.get_content("/f") == b"v2 from HTTP;+"
