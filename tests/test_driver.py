"""rescat-specific driver behaviour: sessions in MongoDB, no copies, bad input, signing."""

from __future__ import annotations

import datetime
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo import monitoring
from pymongo.database import Database

from catalog import (
    BadRequestError,
    ForbiddenError,
    HashMismatchError,
    InvalidOffsetError,
    InvalidPathError,
    ManagedStorage,
    NotFoundError,
    OffsetMismatchError,
    UploadPendingError,
)
from catalog.driver import FileInfo, StorageDriver
from catalog.sessions import UPLOAD, SessionStore, live_session_file_ids, reclaim_sessions
from service.signing import URLSigner, shared_secret
from storage import GridFSStorage
from tests.helpers import BrokenReader, b3, rand

MiB = 1024 * 1024
NAME = "regdrv"


@pytest.fixture
def driver(managed: ManagedStorage) -> StorageDriver:
    return StorageDriver(managed, "reg", name=NAME)


@pytest.fixture
def short_lease(db: Database[Any]) -> ManagedStorage:
    return ManagedStorage(db, GridFSStorage(db), lease=1.0)


def counts(db: Database[Any]) -> dict[str, int]:
    names = ("paths", "catalog", "resources.files", "resources.chunks", "upload_sessions")
    return {name: db[name].count_documents({}) for name in names}


# -- the face over ManagedStorage -------------------------------------------------------
def test_driver_paths_are_environment_paths(driver: StorageDriver, managed: ManagedStorage) -> None:
    driver.put_content("/a/b", b"one")
    reader, length = managed.get_for_environment("reg", "a/b")
    assert reader.read() == b"one" and length == 3
    managed.put_for_environment("reg", "x/y/z", io.BytesIO(b"two"))
    assert driver.get_content("/x/y/z") == b"two"
    assert driver.list("/") == ["/a", "/x"]
    assert driver.stat("/x/y") == FileInfo("/x/y", 0, driver.stat("/x/y").mod_time, True)
    other = StorageDriver(managed, "other", name=NAME)
    assert other.list("/") == []
    with pytest.raises(NotFoundError):
        other.get_content("/a/b")


def test_writer_is_invisible_until_commit(driver: StorageDriver, managed: ManagedStorage) -> None:
    writer = driver.writer("/new/file")
    writer.write(rand(3 * MiB))
    writer.close()
    assert driver.list("/") == []
    with pytest.raises(NotFoundError) as err:
        driver.stat("/new/file")
    assert err.value.path == "/new/file"
    assert managed.list_for_environment("reg") == []

    driver.put_content("/old", b"old bytes")
    w = driver.writer("/old")
    w.write(rand(2 * MiB))
    w.close()
    w = driver.writer("/old", append=True)
    assert w.size() == 2 * MiB
    w.write(b"more")
    assert driver.get_content("/old") == b"old bytes"
    w.commit()
    assert driver.stat("/old").size == 2 * MiB + 4


def test_commit_keeps_session_chunks_for_new_content(
    driver: StorageDriver, db: Database[Any]
) -> None:
    data = rand(5 * MiB + 123)
    writer = driver.writer("/blob")
    for i in range(0, len(data), 300_000):
        writer.write(data[i : i + 300_000])
    file_id = writer._writer.file_id
    writer.commit()
    files = list(db["resources.files"].find({}))
    assert [f["_id"] for f in files] == [file_id]  # the session's chunks became the file
    assert db["resources.chunks"].count_documents({"files_id": file_id}) == 6
    assert db["resources.chunks"].count_documents({}) == 6
    assert db["upload_sessions"].count_documents({}) == 0
    assert driver.get_content("/blob") == data
    assert driver.managed.stat_for_environment("reg", "blob").hash == b3(data)


def test_commit_of_known_content_drops_the_session_chunks(
    driver: StorageDriver, db: Database[Any]
) -> None:
    data = rand(3 * MiB)
    driver.put_content("/first", data)
    writer = driver.writer("/second")
    writer.write(data)
    writer.commit()
    assert db["resources.files"].count_documents({}) == 1
    assert db["resources.chunks"].count_documents({}) == 3
    assert db["catalog"].find_one({})["refcount"] == 2
    assert driver.get_content("/second") == data


def test_small_content_goes_inline(driver: StorageDriver, db: Database[Any]) -> None:
    writer = driver.writer("/small")
    writer.write(b"x" * 1000)
    writer.close()
    assert db["resources.chunks"].count_documents({}) == 1  # the session's tail
    writer = driver.writer("/small", append=True)
    writer.write(b"y")
    writer.commit()
    assert counts(db)["resources.chunks"] == 0 and counts(db)["resources.files"] == 0
    assert driver.get_content("/small") == b"x" * 1000 + b"y"


def test_append_to_committed_content(driver: StorageDriver) -> None:
    base = rand(MiB + 5)
    driver.put_content("/grow", base)
    writer = driver.writer("/grow", append=True)
    assert writer.size() == len(base)
    writer.write(b"tail")
    assert driver.get_content("/grow") == base
    writer.commit()
    assert driver.get_content("/grow") == base + b"tail"
    with pytest.raises(NotFoundError) as err:
        driver.writer("/nothing", append=True)
    assert NAME in str(err.value) and err.value.path == "/nothing"


def test_writer_without_append_starts_over(driver: StorageDriver, db: Database[Any]) -> None:
    writer = driver.writer("/p")
    writer.write(rand(2 * MiB))
    writer.close()
    writer = driver.writer("/p")
    assert writer.size() == 0
    writer.write(b"fresh")
    writer.commit()
    assert driver.get_content("/p") == b"fresh"
    assert counts(db)["resources.chunks"] == 0 and counts(db)["upload_sessions"] == 0


def test_a_new_writer_waits_for_a_commit_under_way(db: Database[Any]) -> None:
    """A writer opened without append discards the path's session, but never one
    being committed: its chunks were becoming the content (the path once pointed
    at a stored file with no chunks)."""
    committing, other = ManagedStorage(db, GridFSStorage(db)), ManagedStorage(db, GridFSStorage(db))
    data = rand(300_000)
    writer = StorageDriver(committing, "reg").writer("/p")
    writer.write(data)
    inside, started = threading.Event(), threading.Event()
    storage = committing.resource_storage
    original = storage.commit_session_file

    def slow_commit(*args: Any, **kwargs: Any) -> Any:
        inside.set()
        assert started.wait(10)
        time.sleep(0.5)  # the new writer comes in meanwhile
        return original(*args, **kwargs)

    storage.commit_session_file = slow_commit  # type: ignore[method-assign]
    opened: list[Any] = []

    def open_another() -> None:
        assert inside.wait(10)
        started.set()
        opened.append(StorageDriver(other, "reg").writer("/p"))

    thread = threading.Thread(target=open_another)
    thread.start()
    info = writer.commit()
    thread.join(30)
    assert info.length == len(data)
    assert StorageDriver(other, "reg").get_content("/p") == data
    assert opened and opened[0].size() == 0  # the new writer starts over after the commit
    opened[0].cancel()


def test_a_name_is_never_a_file_and_a_directory(driver: StorageDriver) -> None:
    """As distribution's drivers: no put, writer or move onto a directory or below a file."""
    driver.put_content("/dir/x", b"1")
    driver.put_content("/t", b"T")
    driver.put_content("/f", b"F")
    calls = {
        "move onto a directory": lambda: driver.move("/t", "/dir"),
        "put onto a directory": lambda: driver.put_content("/dir", b"D"),
        "put below a file": lambda: driver.put_content("/f/g", b"G"),
        "move below a file": lambda: driver.move("/t", "/f/g/h"),
        "writer below a file": lambda: driver.writer("/f/w"),
    }
    for name, call in calls.items():
        with pytest.raises(InvalidPathError) as caught:
            call()
        assert str(caught.value).startswith(f"{NAME}: "), name
    writer = driver.writer("/late")
    writer.write(b"w")
    driver.put_content("/late/child", b"c")  # a directory appears before the commit
    with pytest.raises(InvalidPathError):
        writer.commit()
    writer.cancel()
    assert driver.stat("/dir").is_dir and driver.get_content("/t") == b"T"
    seen: list[tuple[str, bool]] = []
    driver.walk("/", lambda fi: seen.append((fi.path, fi.is_dir)))
    assert seen == [
        ("/dir", True), ("/dir/x", False), ("/f", False), ("/late", True),
        ("/late/child", False), ("/t", False),
    ]  # fmt: skip


def test_move_repoints_without_copying(driver: StorageDriver, db: Database[Any]) -> None:
    big, other = rand(2 * MiB), rand(2 * MiB)
    driver.put_content("/src", big)
    driver.put_content("/dst", other)
    rid = driver.managed.stat_for_environment("reg", "src").resource_id
    driver.move("/src", "/dst")
    assert driver.managed.stat_for_environment("reg", "dst").resource_id == rid
    assert driver.get_content("/dst") == big
    assert db["resources.files"].count_documents({}) == 1  # dst's old content was released
    with pytest.raises(NotFoundError):
        driver.stat("/src")


def test_a_move_leaves_no_unfinished_append_to_bring_the_old_path_back(
    driver: StorageDriver,
) -> None:
    """As delete does: a session of the moved file, resumed later, recreated it."""
    driver.put_content("/s", b"S")
    w = driver.writer("/s", append=True)
    w.write(b"more")
    w.close()
    driver.move("/s", "/t")
    with pytest.raises(NotFoundError):
        driver.writer("/s", append=True)
    with pytest.raises(NotFoundError):
        driver.stat("/s")
    assert driver.get_content("/t") == b"S"
    driver.put_content("/dir/x", b"x")
    with pytest.raises(NotFoundError, match="/dir is a directory; move takes a file"):
        driver.move("/dir", "/elsewhere")


def through_the_catalog(managed: ManagedStorage, path: str, data: bytes) -> None:
    """Write as the CLI or HTTP do: they may make a name both a file and a directory."""
    managed.put_for_environment("reg", path[1:], io.BytesIO(data), len(data))


def test_delete_directory_keeps_its_neighbours(
    driver: StorageDriver, managed: ManagedStorage
) -> None:
    for path in ("/a/b", "/a/b/c", "/a/b/d/e", "/a/bc", "/a/b-c", "/a/b.c/x", "/ab"):
        through_the_catalog(managed, path, path.encode())
    driver.delete("/a/b")
    assert driver.list("/a") == ["/a/b-c", "/a/b.c", "/a/bc"]
    assert driver.list("/") == ["/a", "/ab"]
    driver.delete("/a")
    driver.delete("/ab")
    assert driver.list("/") == []


def test_list_and_walk_order_with_dash_and_dot_siblings(
    driver: StorageDriver, managed: ManagedStorage
) -> None:
    paths = ["/d/a", "/d/a/x", "/d/a-b", "/d/a-b/y", "/d/a.c", "/d/a/z/w", "/d/a0", "/d/b-1/q"]
    for path in paths:
        through_the_catalog(managed, path, b"1")
    assert driver.list("/d") == ["/d/a", "/d/a-b", "/d/a.c", "/d/a0", "/d/b-1"]
    seen: list[tuple[str, bool]] = []
    driver.walk("/d", lambda fi: seen.append((fi.path, fi.is_dir)))
    walked = [p for p, _ in seen]
    # a directory before its contents, "/" before every other character
    assert walked == sorted(walked, key=lambda p: p.replace("/", "\x00"))
    assert ("/d/a", False) in seen and ("/d/a", True) in seen  # a file and a directory
    assert ("/d/b-1", True) in seen and ("/d/b-1/q", False) in seen
    assert [p for p, d in seen if not d] == sorted(
        (p for p in paths), key=lambda p: p.replace("/", "\x00")
    )
    driver.delete("/d")


def test_walk_reraises_fn_exception_unchanged(driver: StorageDriver) -> None:
    driver.put_content("/w/a", b"1")
    boom = RuntimeError("mine")

    def fn(fi: FileInfo) -> None:
        raise boom

    with pytest.raises(RuntimeError) as err:
        driver.walk("/", fn)
    assert err.value is boom
    with pytest.raises(NotFoundError) as missing:
        driver.walk("/nope", fn)
    assert missing.value.path == "/nope" and NAME in str(missing.value)


class CommandCounter(monitoring.CommandListener):
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.counts[event.command_name] = self.counts.get(event.command_name, 0) + 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.fixture
def counted(mongo_uri: str, db: Database[Any]) -> Iterator[tuple[StorageDriver, CommandCounter]]:
    from pymongo import MongoClient

    counter = CommandCounter()
    client: MongoClient[Any] = MongoClient(mongo_uri, tz_aware=True, event_listeners=[counter])
    cdb = client[db.name]
    yield StorageDriver(ManagedStorage(cdb, GridFSStorage(cdb)), "reg", name=NAME), counter
    client.close()


def test_directories_are_range_queries_not_scans(
    counted: tuple[StorageDriver, CommandCounter], managed: ManagedStorage
) -> None:
    driver, counter = counted
    paths = [f"flat/f{i:04d}" for i in range(1500)]
    paths += [f"deep/d{i:02d}/f{j:03d}" for i in range(20) for j in range(40)]
    paths += [f"zzz/other{i}" for i in range(300)]
    now = datetime.datetime.now(datetime.timezone.utc)
    # Path documents only (no content): listings read nothing else.
    fake = {"hash": "0" * 64, "length": 1, "updated_at": now, "resource_id": None}
    managed.paths.insert_many([{"env": "reg", "path": p, **fake} for p in paths])
    counter.counts.clear()
    assert len(driver.list("/flat")) == 1500
    assert counter.counts.get("find", 0) == 1 and counter.counts.get("getMore", 0) <= 2
    counter.counts.clear()
    assert len(driver.list("/deep")) == 20
    assert counter.counts.get("find", 0) <= 21  # a seek past each large subdirectory at most
    counter.counts.clear()
    seen: list[str] = []
    driver.walk("/deep", lambda fi: seen.append(fi.path))
    assert len(seen) == 20 + 800
    assert counter.counts.get("find", 0) == 1 and counter.counts.get("getMore", 0) <= 2
    counter.counts.clear()
    assert driver.stat("/deep").is_dir
    assert counter.counts.get("find", 0) == 2


# -- bad input ------------------------------------------------------------------------
BAD_PATHS = ["", "/", "abc", "//a", "/a/", "/a//b", "/a/./b", "/a/../b", "/.", "/..", "/a b",
             "/a\x00", "/é", "/a\nb", 7, None, "/" + "a" * 1100]  # fmt: skip


@pytest.mark.parametrize("bad", BAD_PATHS, ids=[repr(p)[:20] for p in BAD_PATHS])
def test_invalid_paths_rejected_before_any_write(
    driver: StorageDriver, db: Database[Any], bad: Any
) -> None:
    before = counts(db)
    calls = [
        lambda: driver.put_content(bad, b"x"),
        lambda: driver.get_content(bad),
        lambda: driver.reader(bad, 0),
        lambda: driver.writer(bad),
        lambda: driver.writer(bad, append=True),
        lambda: driver.move(bad, "/ok"),
        lambda: driver.move("/ok", bad),
        lambda: driver.delete(bad),
        lambda: driver.redirect_url("GET", bad),
    ]
    if bad != "/":
        calls += [
            lambda: driver.stat(bad),
            lambda: driver.list(bad),
            lambda: driver.walk(bad, print),
        ]
    for call in calls:
        with pytest.raises(InvalidPathError) as err:
            call()
        assert NAME in str(err.value)
    assert counts(db) == before


def test_bad_environment_names_the_driver(managed: ManagedStorage) -> None:
    with pytest.raises(InvalidPathError) as err:
        StorageDriver(managed, "../x", name=NAME)
    assert NAME in str(err.value)


def test_negative_offset(driver: StorageDriver, db: Database[Any]) -> None:
    before = counts(db)
    with pytest.raises(InvalidOffsetError) as err:
        driver.reader("/missing", -5)
    assert (err.value.path, err.value.offset) == ("/missing", -5) and NAME in str(err.value)
    assert counts(db) == before


def test_writer_misuse_is_a_clear_error_and_writes_nothing(
    driver: StorageDriver, db: Database[Any]
) -> None:
    writer = driver.writer("/w")
    writer.write(b"abc")
    writer.commit()
    after_commit = counts(db)
    for call in (lambda: writer.write(b"more"), writer.commit, writer.cancel):
        with pytest.raises(BadRequestError) as err:
            call()
        assert NAME in str(err.value) and "committed" in str(err.value)
    writer.close()  # closing after commit is fine
    assert counts(db) == after_commit

    cancelled = driver.writer("/c")
    cancelled.write(rand(MiB + 1))
    cancelled.cancel()
    assert counts(db) == after_commit  # its chunks and session are gone
    for call in (lambda: cancelled.write(b"x"), cancelled.commit):
        with pytest.raises(BadRequestError) as err:
            call()
        assert NAME in str(err.value) and "cancelled" in str(err.value)
    assert counts(db) == after_commit
    with pytest.raises(NotFoundError):
        driver.stat("/c")


def test_a_held_session_cannot_be_opened_twice(driver: StorageDriver) -> None:
    first = driver.writer("/held")
    first.write(b"1")
    with pytest.raises(UploadPendingError) as err:
        driver.writer("/held", append=True)
    assert NAME in str(err.value)
    first.close()
    second = driver.writer("/held", append=True)
    assert second.size() == 1
    second.cancel()


# -- processes ------------------------------------------------------------------------
CHILD = r"""
import sys, time
from pymongo import MongoClient
from catalog import ManagedStorage
from catalog.driver import StorageDriver
from storage import GridFSStorage
uri, name, mode, path = sys.argv[1:5]
db = MongoClient(uri, tz_aware=True)[name]
d = StorageDriver(ManagedStorage(db, GridFSStorage(db), lease=1.0), "reg")
if mode == "resume":
    w = d.writer(path, append=True)
    print(w.size(), flush=True)
    w.write(bytes.fromhex(sys.argv[5]) * 1024)
    w.commit()
    print("committed", flush=True)
else:
    w = d.writer(path)
    w.write(b"\x01" * (3 * 1048576 + 17))
    w.close()
    w = d.writer(path, append=True)
    w.write(b"\x02" * 1048576)
    print("ready", flush=True)
    while True:
        w.write(b"\x03" * 65536)
        time.sleep(0.01)
"""


def run_child(mongo_uri: str, db: Database[Any], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, mongo_uri, db.name, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_another_process_resumes_and_commits(
    driver: StorageDriver, mongo_uri: str, db: Database[Any]
) -> None:
    head = rand(2 * MiB + 100)
    writer = driver.writer("/cross")
    writer.write(head)
    writer.close()
    child = run_child(mongo_uri, db, "resume", "/cross", "ab")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.split() == [str(len(head)), "committed"]
    assert driver.get_content("/cross") == head + bytes.fromhex("ab") * 1024
    assert db["upload_sessions"].count_documents({}) == 0


@pytest.mark.slow
def test_kill_9_of_a_writer_keeps_the_old_bytes(
    short_lease: ManagedStorage, mongo_uri: str, db: Database[Any]
) -> None:
    driver = StorageDriver(short_lease, "reg", name=NAME)
    old = rand(MiB + 3)
    driver.put_content("/victim", old)
    child = run_child(mongo_uri, db, "write", "/victim")
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert driver.get_content("/victim") == old
    assert driver.list("/") == ["/victim"]
    # The session resumes from its last checkpoint once the dead writer's lease is out.
    deadline = time.monotonic() + 30
    while True:
        try:
            writer = driver.writer("/victim", append=True)
            break
        except UploadPendingError:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    assert writer.size() == 3 * MiB + 17
    writer.write(b"end")
    writer.commit()
    assert driver.get_content("/victim") == b"\x01" * (3 * MiB + 17) + b"end"
    assert db["resources.files"].count_documents({}) == 1
    assert db["resources.chunks"].count_documents({}) == 4  # the strays were cut


# -- sessions by id (the HTTP resumable uploads' machinery) ------------------------------
def test_session_append_offsets_commit_and_cancel(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    store = SessionStore(managed)
    session = store.create("reg", "up/file", kind=UPLOAD)
    assert session.offset == 0
    data = rand(3 * MiB + 11)
    assert store.append("reg", session.id, 0, io.BytesIO(data[: MiB + 5])) == MiB + 5
    with pytest.raises(OffsetMismatchError) as err:
        store.append("reg", session.id, 0, io.BytesIO(b"zzz"))
    assert err.value.code == "offset_mismatch" and err.value.expected == MiB + 5
    assert store.get("reg", session.id).offset == MiB + 5
    with pytest.raises(InvalidOffsetError):
        store.append("reg", session.id, -1, io.BytesIO(b"zzz"))
    # a dropped connection: what arrived is kept
    with pytest.raises(OSError):
        store.append("reg", session.id, MiB + 5, BrokenReader(data[MiB + 5 :], 1_000_000))
    offset = store.get("reg", session.id).offset
    assert MiB + 5 < offset <= MiB + 5 + 1_000_000 + 65536  # what the reader gave
    assert store.append("reg", session.id, offset, io.BytesIO(data[offset:])) == len(data)
    assert managed.list_for_environment("reg") == []
    with pytest.raises(HashMismatchError):
        store.commit("reg", session.id, b3(b"other"))
    assert store.get("reg", session.id).offset == len(data)  # kept
    info = store.commit("reg", session.id, "blake3:" + b3(data))
    assert (info.path, info.hash, info.length) == ("up/file", b3(data), len(data))
    with pytest.raises(NotFoundError):
        store.get("reg", session.id)
    other = store.create("reg", "up/other")
    store.append("reg", other.id, 0, io.BytesIO(b"x" * 100))
    store.cancel("reg", other.id)
    with pytest.raises(NotFoundError):
        store.commit("reg", other.id)
    with pytest.raises(NotFoundError):
        store.append("reg", "no-such-id", 0, io.BytesIO(b""))
    with pytest.raises(NotFoundError):
        store.get("other-env", session.id)
    assert counts(db)["upload_sessions"] == 0


def test_reclaim_and_live_file_ids(short_lease: ManagedStorage, db: Database[Any]) -> None:
    store = SessionStore(short_lease)
    idle = store.create("reg", "idle")
    store.append("reg", idle.id, 0, io.BytesIO(rand(MiB + 1)))
    held = store.open("reg", store.create("reg", "held").id)
    held.write(rand(MiB))
    assert live_session_file_ids(short_lease) == {idle.file_id, held.file_id}
    assert reclaim_sessions(short_lease, max_age=3600) == 0
    time.sleep(1.2)
    assert reclaim_sessions(short_lease, max_age=0.5) == 1  # the held one's lease is renewed
    assert db["resources.chunks"].count_documents({"files_id": idle.file_id}) == 0
    assert live_session_file_ids(short_lease) == {held.file_id}
    held.commit()
    assert live_session_file_ids(short_lease) == set()


def test_concurrent_commits_of_one_content_share_one_copy(
    managed: ManagedStorage, db: Database[Any]
) -> None:
    data = rand(2 * MiB + 1)
    drivers = [StorageDriver(managed, "reg") for _ in range(4)]
    writers = [d.writer(f"/c{i}") for i, d in enumerate(drivers)]
    for w in writers:
        w.write(data)
    errors: list[BaseException] = []

    def commit(w: Any) -> None:
        try:
            w.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert db["resources.files"].count_documents({}) == 1
    assert db["resources.chunks"].count_documents({}) == 3
    assert db["catalog"].find_one({})["refcount"] == 4


# -- signing ----------------------------------------------------------------------------
def _query(url: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))


def test_url_signer() -> None:
    signer = URLSigner("http://svc:8470/", "topsecret", ttl=30)
    url = signer.sign("GET", "env", "a/b c")
    assert url.startswith("http://svc:8470/v1/signed/environments/env/resources/a/b%20c?")
    q = _query(url)
    signer.verify("GET", "env", "a/b c", q)
    signer.verify("HEAD", "env", "a/b c", q)
    for method, env, path, query in [
        ("PUT", "env", "a/b c", q),
        ("GET", "env2", "a/b c", q),
        ("GET", "env", "a/b", q),
        ("GET", "env", "a/b c", {**q, "signature": "0" * 64}),
        ("GET", "env", "a/b c", {**q, "expires": str(int(q["expires"]) + 100)}),
        ("GET", "env", "a/b c", {}),
        ("GET", "env", "a/b c", {**q, "expires": "soon"}),
    ]:
        with pytest.raises(ForbiddenError):
            signer.verify(method, env, path, query)
    expired = signer.sign("GET", "env", "p", ttl=0.001)
    time.sleep(1.1)
    with pytest.raises(ForbiddenError, match="expired"):
        signer.verify("GET", "env", "p", _query(expired))
    with pytest.raises(ForbiddenError):
        URLSigner("http://svc:8470", "othersecret").verify("GET", "env", "a/b c", q)
    assert "topsecret" not in repr(signer) and "topsecret" not in str(signer)


def test_database_secret_is_shared_and_created_once(
    managed: ManagedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RESCAT_SIGNING_SECRET", raising=False)
    found: list[str] = []
    threads = [
        threading.Thread(target=lambda: found.append(shared_secret(managed.db))) for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1 and len(found[0]) == 64
    a = URLSigner.for_database(managed, "http://one")
    b = URLSigner.for_database(managed, "http://one")
    url = a.sign("GET", "e", "p")
    b.verify("GET", "e", "p", _query(url))
    monkeypatch.setenv("RESCAT_SIGNING_SECRET", "from-env")
    c = URLSigner.for_database(managed, "http://one")
    with pytest.raises(ForbiddenError):
        c.verify("GET", "e", "p", _query(url))
    URLSigner("http://one", "from-env").verify("GET", "e", "p", _query(c.sign("GET", "e", "p")))


def test_a_commit_that_died_midway(short_lease: ManagedStorage, db: Database[Any]) -> None:
    store = SessionStore(short_lease)
    data = rand(2 * MiB + 9)
    intact = store.create("reg", "intact")
    store.append("reg", intact.id, 0, io.BytesIO(data))
    stored = store.create("reg", "stored")
    store.append("reg", stored.id, 0, io.BytesIO(data))
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=5)
    db["upload_sessions"].update_many(
        {}, {"$set": {"state": "committing", "owner": "dead", "lease_until": past}}
    )
    # the second one's chunks had become a stored file when its writer died
    short_lease.resource_storage.commit_session_file(stored.file_id, "x", len(data), b3(data))
    writer = store.open("reg", intact.id)
    assert writer.size() == len(data)
    writer.commit()
    assert short_lease.get_for_environment("reg", "intact")[0].read() == data
    with pytest.raises(NotFoundError):
        store.open("reg", stored.id)
    assert db["upload_sessions"].count_documents({}) == 0


def test_delete_of_a_large_directory(driver: StorageDriver, db: Database[Any]) -> None:
    for i in range(450):
        driver.put_content(f"/big/d{i % 7}/f{i:03d}", b"same small content")
    driver.put_content("/big-neighbour", b"stays")
    assert db["catalog"].find_one({"hash": b3(b"same small content")})["refcount"] == 450
    driver.delete("/big")
    assert driver.list("/") == ["/big-neighbour"]
    assert db["catalog"].count_documents({}) == 1  # the 450 references went with the paths
    assert db["path_history"].count_documents({}) == 450


def test_a_failed_chunk_write_ends_the_writer_and_frees_the_session(
    driver: StorageDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = driver.writer("/f")
    writer.write(rand(MiB + 10))
    writer.close()
    writer = driver.writer("/f", append=True)
    storage = driver.managed.resource_storage

    def broken(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(storage, "write_session_chunks", broken)
    with pytest.raises(OSError):
        for _ in range(4):
            writer.write(rand(MiB))
    monkeypatch.undo()
    with pytest.raises(BadRequestError) as err:
        writer.write(b"x")
    assert NAME in str(err.value)
    resumed = driver.writer("/f", append=True)  # no lease to wait for
    assert resumed.size() == MiB + 10
    resumed.cancel()


def test_in_memory_mode() -> None:
    from catalog import connect

    d = StorageDriver(connect(f"mongomock://driver-{os.getpid()}-{time.time_ns()}"), "mem")
    data = rand(2 * MiB + 3)
    writer = d.writer("/m/w")
    writer.write(data[:MiB])
    writer.close()
    writer = d.writer("/m/w", append=True)
    writer.write(data[MiB:])
    writer.commit()
    assert d.get_content("/m/w") == data
    assert d.list("/m") == ["/m/w"]
    d.delete("/m")
    assert d.list("/") == []
