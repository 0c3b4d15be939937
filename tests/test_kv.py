"""rescat's own KV promises: beyond libkv's suite (tests/test_kv_libkv.py).

Concurrency (CAS increments, a watcher during rapid puts), crashes (a lock
holder and a TTL key owner killed with SIGKILL in a real subprocess), fenced
writes, resumed change streams, bad input, and the KV value as a path.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pymongo.database import Database

from catalog import ManagedStorage
from catalog.errors import (
    AlreadyExistsError,
    CannotLockError,
    InvalidArgumentError,
    InvalidPathError,
    KeyModifiedError,
    NotFoundError,
)
from catalog.kv import MAX_VALUE, KeyWatch, KVPair, KVStore, reclaim_expired
from tests.helpers import pump

ENV = "kvtest"


@pytest.fixture
def kv(managed: ManagedStorage) -> Iterator[KVStore]:
    store = KVStore(managed, ENV)
    yield store
    store.close()


# -- the value is a path -------------------------------------------------------------------
def test_values_are_paths(kv: KVStore, managed: ManagedStorage) -> None:
    pair = kv.put("/conf/db/", b"postgres://x")
    assert pair.key == "conf/db"
    reader, length = managed.get_for_environment(ENV, "conf/db")
    assert reader.read() == b"postgres://x" and length == 12
    assert managed.stat_for_environment(ENV, "conf/db").revision == pair.last_index
    assert managed.list_for_environment(ENV) == ["conf/db"]
    # And a path written through the core is a key.
    managed.put_for_environment(ENV, "conf/other", io.BytesIO(b"v"))
    assert kv.get("conf/other").value == b"v"
    big = os.urandom(200 * 1024)  # beyond inline content: stored in GridFS
    kv.put("conf/big", big)
    assert kv.get("conf/big").value == big
    assert [p.key for p in kv.get_range("conf")] == ["conf/big", "conf/db", "conf/other"]


def test_revisions_grow_across_the_environment(kv: KVStore) -> None:
    seen = [kv.put(f"k{i % 3}", str(i).encode()).last_index for i in range(12)]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    before = kv.get("k0").last_index
    kv.delete("k1")
    assert kv.put("k2", b"x").last_index > before


def test_prefixes_respect_segments(kv: KVStore) -> None:
    for key in ("p", "p/x", "p/y/z", "pq/x", "q"):
        kv.put(key, key.encode())
    for prefix in ("p", "p/", "/p/"):
        assert [pair.key for pair in kv.get_range(prefix)] == ["p", "p/x", "p/y/z"]
    kv.delete_range("p/")
    assert [pair.key for pair in kv.get_range("")] == ["pq/x", "q"]


def test_environments_are_isolated(managed: ManagedStorage, kv: KVStore) -> None:
    other = KVStore(managed, "elsewhere")
    kv.put("k", b"a")
    with pytest.raises(NotFoundError):
        other.get("k")
    other.close()


# -- CAS under contention --------------------------------------------------------------------
def test_concurrent_cas_increments_lose_nothing(kv: KVStore) -> None:
    threads, increments = 16, 100
    kv.put("counter", b"0")
    conflicts = [0] * threads

    def worker(n: int) -> None:
        done = 0
        while done < increments:
            pair = kv.get("counter")
            try:
                kv.atomic_put("counter", str(int(pair.value) + 1).encode(), pair)
            except KeyModifiedError:
                conflicts[n] += 1
                continue
            done += 1

    pool = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=300)
    assert int(kv.get("counter").value) == threads * increments
    assert sum(conflicts) > 0  # there was contention to lose increments to


def test_create_only_has_one_winner(kv: KVStore) -> None:
    wins: list[int] = []
    losses: list[int] = []
    barrier = threading.Barrier(8)

    def create(n: int) -> None:
        barrier.wait()
        try:
            kv.atomic_put("once", str(n).encode(), None)
            wins.append(n)
        except AlreadyExistsError:
            losses.append(n)

    pool = [threading.Thread(target=create, args=(n,)) for n in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    assert kv.get("once").value == str(wins[0]).encode()


# -- watches ----------------------------------------------------------------------------------
def test_watch_during_rapid_puts_misses_and_repeats_nothing(kv: KVStore) -> None:
    total = 500
    started = threading.Event()

    def writer() -> None:
        for i in range(total):
            kv.put("rapid", str(i).encode())
            if i == 100:
                started.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert started.wait(60)
    stop = threading.Event()
    items: list[KVPair | None] = []
    watch = kv.watch("rapid", stop=stop)
    for item in watch:
        assert item is not None
        items.append(item)
        if item.value == str(total - 1).encode():
            break
    stop.set()
    thread.join()
    values = [int(item.value) for item in items if item is not None]
    revisions = [item.last_index for item in items if item is not None]
    # From the first read on, every put once, in order, each with its own value.
    assert values == list(range(values[0], total))
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert values[0] >= 100


def test_watch_items_carry_the_value_of_their_change(kv: KVStore) -> None:
    kv.put("slow", b"start")
    watch = kv.watch("slow")
    assert next(watch) == kv.get("slow")
    written = [kv.put("slow", f"value-{i}".encode()) for i in range(20)]
    kv.delete("slow")
    # Read only now: every value was overwritten (and its content deleted) meanwhile.
    seen = [next(watch) for _ in range(21)]
    assert seen == [*written, None]
    assert isinstance(watch, KeyWatch)
    watch.close()


def test_watch_of_a_missing_key_then_created(kv: KVStore) -> None:
    kv.put("gone", b"1")
    kv.delete("gone")
    watch = kv.watch("gone")
    assert next(watch) is None
    pair = kv.put("gone", b"2")
    assert next(watch) == pair
    watch.close()


def test_watch_resumes_after_its_stream_breaks(kv: KVStore) -> None:
    kv.put("resume", b"0")
    watch = kv.watch("resume")
    assert isinstance(watch, KeyWatch)
    assert next(watch) is not None
    kv.put("resume", b"1")
    assert next(watch).value == b"1"  # type: ignore[union-attr]
    assert watch._changes is not None
    watch._changes.break_for_test()
    written = [kv.put("resume", str(i).encode()) for i in range(2, 6)]
    assert [next(watch) for _ in range(4)] == written
    watch.close()


def test_dropping_the_database_ends_a_watch(kv: KVStore, db: Database[Any]) -> None:
    kv.put("k", b"v")
    watch = kv.watch("k")
    assert next(watch) is not None
    db.client.drop_database(db.name)
    started = time.monotonic()
    assert list(watch) == []  # ends instead of resuming forever
    assert time.monotonic() - started < 10


def test_watch_from_another_process(kv: KVStore, mongo_uri: str, db: Database[Any]) -> None:
    events: queue.Queue[KVPair | None] = queue.Queue()
    stop = threading.Event()
    pump(kv.watch("remote", stop=stop), events)
    assert events.get(timeout=5) is None
    script = """
        kv.put("remote", b"from-child")
        kv.delete("remote")
        kv.close()
    """
    try:
        proc = _child(mongo_uri, db.name, script)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        _kill(proc)
        assert events.get(timeout=5).value == b"from-child"  # type: ignore[union-attr]
        assert events.get(timeout=5) is None
    finally:
        stop.set()


def test_watch_sees_a_ttl_key_expire(kv: KVStore, managed: ManagedStorage) -> None:
    owner = KVStore(managed, ENV)
    owner.put("lease", b"x", ttl=1)
    events: queue.Queue[KVPair | None] = queue.Queue()
    stop = threading.Event()
    pump(kv.watch("lease", stop=stop), events)
    try:
        assert events.get(timeout=5) is not None
        owner._renewer.pause()
        assert events.get(timeout=3) is None  # at read time, not at a TTL-monitor pass
    finally:
        owner.close()
        stop.set()


def test_watch_range_lists_after_each_change(kv: KVStore) -> None:
    kv.put("dir/a", b"1")
    kv.put("dirx/a", b"outside")
    watch = kv.watch_range("dir")
    assert [(p.key, p.value) for p in next(watch)] == [("dir/a", b"1")]
    kv.put("dirx/b", b"outside")  # not under dir/: no item
    kv.put("dir/b", b"2")
    assert [p.key for p in next(watch)] == ["dir/a", "dir/b"]
    kv.delete("dir/a")
    assert [p.key for p in next(watch)] == ["dir/b"]
    kv.delete("dir/b")
    assert next(watch) == []
    watch.close()  # type: ignore[attr-defined]


# -- TTL -------------------------------------------------------------------------------------
def test_ttl_key_gone_after_its_process_is_killed(
    kv: KVStore, managed: ManagedStorage, mongo_uri: str, db: Database[Any]
) -> None:
    ttl = 1.0
    proc = _child(mongo_uri, db.name, f'kv.put("ephemeral", b"alive", ttl={ttl})\nready()')
    try:
        _wait_ready(proc)
        time.sleep(ttl * 1.5)  # the child renews it past its ttl
        assert kv.get("ephemeral").value == b"alive"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()
        while kv.exists("ephemeral"):
            assert time.monotonic() - killed < ttl + 1.0, "TTL key outlived its owner"
            time.sleep(0.05)
    finally:
        _kill(proc)
    with pytest.raises(NotFoundError):
        kv.get("ephemeral")
    # gc deletes it and releases its content.
    assert reclaim_expired(managed) == 1
    assert managed.catalog.lookup(_blake3(b"alive")) is None
    assert managed.history_for_environment(ENV, "ephemeral")[-1]["event"] == "delete"


def test_put_without_ttl_makes_a_key_permanent(kv: KVStore, managed: ManagedStorage) -> None:
    owner = KVStore(managed, ENV)
    owner.put("k", b"temp", ttl=1)
    kv.put("k", b"kept")  # another store's permanent put
    owner.close()
    time.sleep(1.2)
    assert kv.get("k").value == b"kept"
    assert reclaim_expired(managed) == 0


# -- locks -----------------------------------------------------------------------------------
def test_killed_lock_holder_loses_the_lock(kv: KVStore, mongo_uri: str, db: Database[Any]) -> None:
    ttl = 1.5
    script = f"""
        lock = kv.lock("leader", b"child", ttl={ttl})
        assert lock.acquire(timeout=10)
        print(lock.fence, flush=True)
        ready()
    """
    proc = _child(mongo_uri, db.name, script)
    try:
        fence = int(_wait_ready(proc))
        assert kv.get("leader").value == b"child"
        mine = kv.lock("leader", b"parent", ttl=ttl)
        assert mine.acquire(timeout=ttl) is False  # renewed by a live holder
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()
        assert mine.acquire(timeout=ttl + 1.0) is True
        assert time.monotonic() - killed <= ttl + 1.0
    finally:
        _kill(proc)
    assert mine.fence > fence
    assert kv.get("leader").value == b"parent"
    mine.release()


def test_fenced_put_refused_once_a_newer_holder_exists(
    kv: KVStore, managed: ManagedStorage
) -> None:
    stale_store = KVStore(managed, ENV)
    stale = stale_store.lock("job", ttl=1)
    assert stale.acquire()
    assert stale.put("job/output", b"first").value == b"first"
    stale_store._renewer.pause()  # a holder stuck in a GC pause, say
    newer = kv.lock("job", ttl=1)
    assert newer.acquire(timeout=3)
    assert newer.fence > stale.fence
    assert stale.lost.wait(2)
    with pytest.raises(CannotLockError):
        stale.put("job/output", b"stale")
    assert newer.put("job/output", b"fresh").value == b"fresh"
    assert kv.get("job/output").value == b"fresh"
    newer.release()
    with pytest.raises(CannotLockError):
        newer.put("job/output", b"after release")
    stale_store.close()


def test_lock_is_not_reentrant_and_times_out(kv: KVStore) -> None:
    lock = kv.lock("solo", ttl=2)
    assert lock.acquire()
    started = time.monotonic()
    assert lock.acquire(timeout=0.5) is False
    assert 0.4 <= time.monotonic() - started < 2
    stop = threading.Event()
    stop.set()
    assert kv.lock("solo").acquire(stop=stop) is False
    assert kv.lock("solo").acquire(blocking=False) is False
    lock.release()


def test_close_releases_locks_and_sets_lost(managed: ManagedStorage, kv: KVStore) -> None:
    store = KVStore(managed, ENV)
    lock = store.lock("closing", b"v")
    assert lock.acquire()
    store.close()
    assert lock.lost.is_set()
    assert not kv.exists("closing")
    assert kv.lock("closing").acquire(blocking=False)


def test_seed_acquire_release(kv: KVStore, managed: ManagedStorage) -> None:
    session = kv.acquire("seed/lock", b"me")
    assert kv.get("seed/lock").value == b"me"
    other = KVStore(managed, ENV)
    with pytest.raises(CannotLockError):
        other.acquire("seed/lock")
    kv.release(session)
    with pytest.raises(CannotLockError):
        kv.release(session)
    assert other.acquire("seed/lock")
    other.close()


# -- bad input ---------------------------------------------------------------------------------
def test_bad_input_is_refused_and_changes_nothing(kv: KVStore, managed: ManagedStorage) -> None:
    kv.put("a", b"1")
    before = kv.get("a")
    for key in ("", "/", "//", "a//b", "../x", 7):
        with pytest.raises(InvalidPathError):
            kv.put(key, b"x")  # type: ignore[arg-type]
        with pytest.raises(InvalidPathError):
            kv.get(key)  # type: ignore[arg-type]
    for value in ("text", None, 5, [b"x"]):
        with pytest.raises(InvalidArgumentError):
            kv.put("a", value)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        kv.put("a", b"x" * (MAX_VALUE + 1))
    kv.put("max", b"x" * MAX_VALUE)  # exactly 1 MiB is fine
    for ttl in (-1, 0, float("nan"), "5", True):
        with pytest.raises(InvalidArgumentError):
            kv.put("a", b"x", ttl=ttl)  # type: ignore[arg-type]
    kv.put("b", b"2")
    with pytest.raises(InvalidArgumentError):
        kv.atomic_put("a", b"x", kv.get("b"))
    with pytest.raises(InvalidArgumentError):
        kv.atomic_delete("a", kv.get("b"))
    with pytest.raises(InvalidArgumentError):
        kv.atomic_delete("a", None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        kv.lock("l", ttl=-1)
    for timeout in (float("nan"), "1", None):
        with pytest.raises(InvalidArgumentError):  # not an endless wait
            kv.lock("l").acquire(timeout=timeout)  # type: ignore[arg-type]
    assert kv.get("a") == before
    assert kv.get("b").value == b"2"
    assert managed.list_for_environment(ENV) == ["a", "b", "max"]

    lock = kv.lock("l")
    assert lock.acquire()
    lock.release()
    with pytest.raises(CannotLockError):
        lock.release()
    with pytest.raises(CannotLockError):
        kv.lock("never").release()
    assert not kv.exists("l")


# -- helpers -----------------------------------------------------------------------------------
CHILD = """
import sys, time
from pymongo import MongoClient
from catalog import ManagedStorage
from catalog.kv import KVStore
from storage import GridFSStorage

db = MongoClient(sys.argv[1], tz_aware=True)[sys.argv[2]]
kv = KVStore(ManagedStorage(db, GridFSStorage(db)), sys.argv[3])

def ready():
    print("ready", flush=True)
    while True:
        time.sleep(60)

"""


def _child(uri: str, database: str, script: str) -> subprocess.Popen[str]:
    code = CHILD + textwrap.dedent(script)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.Popen(
        [sys.executable, "-c", code, uri, database, ENV],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=root,
    )


def _wait_ready(proc: subprocess.Popen[str]) -> str:
    """Lines the child printed before `ready`, joined."""
    assert proc.stdout is not None
    lines: list[str] = []
    while True:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"child exited: {err}")
        if line.strip() == "ready":
            return "".join(lines).strip()
        lines.append(line)


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _blake3(data: bytes) -> str:
    import blake3

    return blake3.blake3(data).hexdigest()


# -- CLI -----------------------------------------------------------------------------------------
def _rescat(base: list[str], *args: str, input: bytes | None = None) -> tuple[int, bytes, str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", *base, *args],
        input=input,
        capture_output=True,
        cwd=root,
        timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr.decode()


def test_cli_put_get_ls_rm(mongo_uri: str, db: Database[Any], tmp_path: Any) -> None:
    base = ["--mongo-uri", mongo_uri, "--database", db.name]
    code, out, _ = _rescat(base, "kv", "put", ENV, "conf/a", "hello")
    assert code == 0 and int(out) > 0
    assert _rescat(base, "kv", "put", ENV, "conf/b", "-", input=b"\x00\xff")[0] == 0
    source = tmp_path / "v.bin"
    source.write_bytes(b"from a file")
    assert _rescat(base, "kv", "put", ENV, "/conf/c/", f"@{source}")[0] == 0
    assert _rescat(base, "kv", "get", ENV, "conf/a")[1] == b"hello"
    assert _rescat(base, "kv", "get", ENV, "conf/b")[1] == b"\x00\xff"
    assert _rescat(base, "get", ENV, "conf/c")[1] == b"from a file"  # a key is a path
    assert _rescat(base, "kv", "ls", ENV, "conf")[1].decode().split() == [
        "conf/a",
        "conf/b",
        "conf/c",
    ]
    listed = json.loads(_rescat(base, "kv", "ls", ENV, "--json")[1])
    assert [item["key"] for item in listed] == ["conf/a", "conf/b", "conf/c"]
    assert listed[0]["value"] == "hello" and "value" not in listed[1]
    assert listed[1]["value_base64"] == "AP8="
    assert _rescat(base, "kv", "rm", ENV, "conf/a")[0] == 0
    code, out, err = _rescat(base, "kv", "get", ENV, "conf/a")
    assert code != 0 and out == b"" and len(err.strip().splitlines()) == 1
    assert _rescat(base, "kv", "rm", "-r", ENV, "conf")[0] == 0
    assert _rescat(base, "kv", "ls", ENV)[1] == b""
    for bad in (["kv", "put", ENV, "/", "x"], ["kv", "put", ENV, "k", "x", "--ttl", "-1"]):
        code, out, err = _rescat(base, *bad)
        assert code != 0 and len(err.strip().splitlines()) == 1, err


def test_cli_put_reads_no_more_than_a_value_and_keeps_argument_bytes(
    mongo_uri: str, db: Database[Any], kv: KVStore
) -> None:
    """`yes | rescat kv put ... -` or `@/dev/zero` stop at 1 MiB (they filled the memory)."""
    base = ["--mongo-uri", mongo_uri, "--database", db.name]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    endless = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *base, "kv", "put", ENV, "big", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=root,
    )
    assert endless.stdin is not None
    stopped_reading = False
    try:
        for _ in range(4096):  # 256 MiB: it stops taking them after 1 MiB
            endless.stdin.write(b"y\n" * 32768)
        endless.stdin.close()
    except BrokenPipeError:
        stopped_reading = True
    assert endless.wait(timeout=60) == 1
    assert stopped_reading
    assert endless.stderr is not None and b"at most 1048576 bytes" in endless.stderr.read()
    code, _, err = _rescat(base, "kv", "put", ENV, "big", "@/dev/zero")
    assert code == 1 and "at most 1048576 bytes" in err and len(err.strip().splitlines()) == 1
    code, _, err = _rescat(base, "kv", "put", ENV, "big", "@")
    assert code == 2 and "needs a file name" in err
    with pytest.raises(NotFoundError):
        kv.get("big")
    exact = b"x" * (1024 * 1024)
    assert _rescat(base, "kv", "put", ENV, "big", "-", input=exact)[0] == 0
    assert kv.get("big").value == exact
    code, _, err = _rescat(base, "kv", "put", ENV, "raw", os.fsdecode(b"a\xffb"))
    assert code == 0, err
    assert kv.get("raw").value == b"a\xffb"  # the argument's bytes, as given


def test_cli_compare_and_swap(mongo_uri: str, db: Database[Any], kv: KVStore) -> None:
    """kv put --create / --if-revision and kv rm --if-revision: the store's atomic calls."""
    base = ["--mongo-uri", mongo_uri, "--database", db.name]
    code, out, _ = _rescat(base, "kv", "put", ENV, "leader", "n1", "--create")
    assert code == 0 and kv.get("leader") == KVPair("leader", b"n1", int(out))
    first = int(out)
    code, out, err = _rescat(base, "kv", "put", ENV, "leader", "n2", "--create")
    assert (code, out) == (1, b"") and "exists" in err and len(err.strip().splitlines()) == 1
    shown = json.loads(_rescat(base, "kv", "get", ENV, "leader", "--json")[1])
    assert (shown["key"], shown["revision"], shown["value"]) == ("leader", first, "n1")
    code, out, _ = _rescat(base, "kv", "put", ENV, "leader", "n3", "--if-revision", str(first))
    assert code == 0 and int(out) > first
    second = int(out)
    code, _, err = _rescat(base, "kv", "put", ENV, "leader", "n4", "--if-revision", str(first))
    assert code == 1 and f"changed since revision {first}" in err  # stale: nothing written
    code, _, err = _rescat(base, "kv", "rm", ENV, "leader", "--if-revision", str(first))
    assert code == 1 and kv.get("leader") == KVPair("leader", b"n3", second)
    assert _rescat(base, "kv", "rm", ENV, "leader", "--if-revision", str(second))[0] == 0
    assert not kv.exists("leader")
    code, _, err = _rescat(base, "kv", "put", ENV, "x", "v", "--create", "--if-revision", "3")
    assert code == 2 and "exclude each other" in err and not kv.exists("x")


def test_cli_ttl_and_watch(mongo_uri: str, db: Database[Any], kv: KVStore) -> None:
    base = ["--mongo-uri", mongo_uri, "--database", db.name]
    assert _rescat(base, "kv", "put", ENV, "short", "x", "--ttl", "1")[0] == 0
    assert kv.get("short").value == b"x"  # outlives the command by its ttl
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    watcher = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *base, "kv", "watch", ENV, "w"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=root,
    )
    try:
        assert watcher.stdout is not None
        assert json.loads(watcher.stdout.readline()) == {"type": "delete", "key": "w"}
        pair = kv.put("w", b"1")
        line = json.loads(watcher.stdout.readline())
        assert line["type"] == "put" and line["value"] == "1"
        assert line["revision"] == pair.last_index
        kv.delete("w")
        assert json.loads(watcher.stdout.readline()) == {"type": "delete", "key": "w"}
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=10) == 0  # Ctrl-C ends a watch normally
    finally:
        _kill(watcher)
    time.sleep(1.1)
    assert not kv.exists("short")


def test_cli_watch_whose_reader_goes_away_ends_as_sigpipe(
    mongo_uri: str, db: Database[Any], kv: KVStore
) -> None:
    """`rescat kv watch ... | head -1`: status 141 (as if killed by SIGPIPE), nothing on stderr."""
    base = ["--mongo-uri", mongo_uri, "--database", db.name]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    reader, writer = os.pipe()
    watcher = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *base, "kv", "watch", ENV, "gone"],
        stdout=writer,
        stderr=subprocess.PIPE,
        cwd=root,
    )
    os.close(writer)
    try:
        with os.fdopen(reader, "rb") as out:
            assert json.loads(out.readline()) == {"type": "delete", "key": "gone"}
        # The reader is gone (as `head -1` exits): the next event cannot be written.
        deadline = time.monotonic() + 30
        n = 0
        while watcher.poll() is None and time.monotonic() < deadline:
            kv.put("gone", str(n).encode())
            n += 1
            time.sleep(0.2)
        assert watcher.wait(timeout=10) == 128 + signal.SIGPIPE
        assert watcher.stderr is not None and watcher.stderr.read() == b""
    finally:
        _kill(watcher)


def test_malformed_arguments_are_invalid_argument_errors(kv: KVStore) -> None:
    """They escaped as AssertionError, TypeError and AttributeError (or KeyModifiedError)."""
    kv.put("x", b"1")
    for bad in (
        lambda: kv.lock("x", ttl=None),  # type: ignore[arg-type]
        lambda: kv.atomic_put("x", b"2", KVPair("x", b"1", None)),  # type: ignore[arg-type]
        lambda: kv.atomic_put("x", b"2", KVPair("x", b"1", "abc")),  # type: ignore[arg-type]
        lambda: kv.atomic_put("x", b"2", KVPair(None, b"1", 1)),  # type: ignore[arg-type]
        lambda: kv.atomic_delete("x", KVPair("x", b"1", -1)),
    ):
        with pytest.raises(InvalidArgumentError):
            bad()
    assert kv.get("x").value == b"1"  # nothing changed


def test_finding_expired_keys_is_an_index_probe(kv: KVStore, managed: ManagedStorage) -> None:
    """Each service looks for expired keys every second (catalog.reaper): never a scan."""
    for i in range(20):
        kv.put(f"plain/{i}", b"v")
    kv.put("leased", b"v", ttl=30)
    query = {"expires_at": {"$lte": datetime.datetime.now(datetime.UTC)}}
    plan = managed.paths.find(query, {"env": 1, "path": 1, "rev": 1}).explain()
    stats = plan["executionStats"]
    assert stats["totalDocsExamined"] == 0 and stats["totalKeysExamined"] <= 1, stats
    assert "IXSCAN" in json.dumps(plan["queryPlanner"]["winningPlan"])
