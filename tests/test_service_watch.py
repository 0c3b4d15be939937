"""The HTTP watch (Server-Sent Events) against a real `rescat serve`, and CatalogClient.watch.

Order and fields of puts and deletes, a replay with `since` joined to the live
stream without gap or duplicate while a writer keeps writing, two service
instances, 410 once the history was trimmed, the server side freed on
disconnect, and the client reconnecting across a service restart.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from catalog import ManagedStorage
from catalog import history as hist
from catalog.errors import RequestExpiredError
from catalog.kv import KVStore
from catalog.managed import PLAIN, WriteOptions
from catalog.mongod import free_port
from catalog.resources import object_id
from catalog.tokens import TokenStore
from service import routes_watch
from service.app import create_app
from service.client import CatalogClient
from service.routes_watch import open_watches
from tests.helpers import change_streams
from tests.test_service_support import (
    REPO,
    ServerThread,
    cli_env,
    rescat_command,
    serve_popen,
    server_process,
    wait_until,
)

ENV = "watched"
Event = dict[str, Any]


@pytest.fixture
def database(managed: ManagedStorage) -> str:
    return str(managed.db.name)


@pytest.fixture
def token(managed: ManagedStorage) -> str:
    return TokenStore(managed.db).create(env=ENV)[0]


def put(managed: ManagedStorage, path: str, data: bytes) -> int:
    return managed.put_path(ENV, path, io.BytesIO(data), len(data)).revision


def collect(
    client: CatalogClient, into: queue.Queue[Event], stop: threading.Event, **kwargs: Any
) -> threading.Thread:
    def run() -> None:
        try:
            for event in client.watch(ENV, stop=stop, **kwargs):
                into.put(event)
        except Exception as exc:  # surfaced by the test
            into.put({"error": repr(exc)})

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def take(into: queue.Queue[Event], count: int, timeout: float = 30.0) -> list[Event]:
    out: list[Event] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        event = into.get(timeout=max(deadline - time.monotonic(), 0.01))
        assert "error" not in event, event
        out.append(event)
    return out


def open_stream(http: httpx.Client, url: str, **params: Any) -> Iterator[str]:
    """Lines of an SSE response, returned once its `: open` comment says the watch is open."""

    def lines() -> Iterator[str]:
        with http.stream("GET", url, params=params) as response:
            assert response.status_code == 200, response.read()
            assert response.headers["content-type"].startswith("text/event-stream")
            it = response.iter_lines()
            assert next(it) == ": open"
            line = next(it)
            if line.startswith("id: "):  # where the watch starts
                assert int(line[4:]) > 0
                line = next(it)
            assert line == ""
            yield ""
            yield from it

    stream = lines()
    next(stream)
    return stream


def test_events_in_revision_order_with_their_fields(
    managed: ManagedStorage, mongo_uri: str, database: str, token: str
) -> None:
    with server_process(mongo_uri, database, "--log-level", "warning") as url:
        headers = {"authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            path = f"/v1/environments/{ENV}/watch"
            lines = open_stream(http, path, prefix="cfg/", max_events=4)
            wrote = [
                ("put", "cfg/a", put(managed, "cfg/a", b"one")),
                ("put", "other", put(managed, "other", b"x")),  # not under the prefix
                ("put", "cfg/a", put(managed, "cfg/a", b"two!")),
                ("put", "cfg/b", put(managed, "cfg/b", b"three")),
                ("delete", "cfg/a", managed.delete_path(ENV, "cfg/a")),
            ]
            text = "\n".join(lines).strip()  # the stream ends after max_events
            frames = [f for f in text.split("\n\n") if f.strip()]
            events = []
            for chunk in frames:
                fields = dict(line.split(": ", 1) for line in chunk.split("\n"))
                data = json.loads(fields["data"])
                assert fields["id"] == str(data["revision"]) and fields["event"] == data["type"]
                events.append(data)
            expected = [(k, p, r) for k, p, r in wrote if p.startswith("cfg/")]
            assert [(e["type"], e["path"], e["revision"]) for e in events] == expected
            revisions = [e["revision"] for e in events]
            assert revisions == sorted(revisions)
            two = managed.stat_for_environment(ENV, "cfg/b")
            assert events[2] == {
                "type": "put",
                "path": "cfg/b",
                "hash": two.hash,
                "length": 5,
                "revision": two.revision,
            }
            assert events[1]["length"] == 4 and events[3] == {
                "type": "delete",
                "path": "cfg/a",
                "revision": wrote[4][2],
            }
            # A key watch, the token rules, and parameters refused before any stream.
            lines = open_stream(http, path, key="cfg/b", max_events=1)
            put(managed, "cfg/bb", b"not this one")
            rev = put(managed, "cfg/b", b"this one")
            assert f"id: {rev}" in "\n".join(lines)
            assert httpx.get(url + path).status_code == 401
            other = TokenStore(managed.db).create(env="elsewhere")[0]
            r = httpx.get(url + path, headers={"authorization": f"Bearer {other}"})
            assert r.status_code == 403
            past_int64 = (str(2**63), "9" * 20)  # were 500: the query overflowed
            for params in (
                {"since": "x"},
                {"key": "a", "prefix": "b"},
                {"timeout": "0"},
                *({"since": since} for since in past_int64),
            ):
                r = http.get(path, params=params)
                assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
            assert http.get(path, params={"key": "../x"}).status_code == 400
            assert http.head(path).status_code == 200


def test_since_replays_then_continues_live_without_gap_or_duplicate(
    managed: ManagedStorage, mongo_uri: str, database: str, token: str
) -> None:
    written: list[tuple[str, int]] = []  # (path, revision) of every change, deletes included
    done = threading.Event()
    store = KVStore(managed, ENV)

    def writer() -> None:
        i = 0
        while not done.is_set() and i < 600:
            key = f"w/{i % 7}"
            if i % 5 == 4:
                written.append((key, managed.delete_path(ENV, key)))
            else:
                written.append((key, store.put(key, f"v{i}".encode()).last_index))
            i += 1

    for i in range(7):  # every key exists before the writer starts deleting
        written.append((f"w/{i}", store.put(f"w/{i}", b"start").last_index))
    thread = threading.Thread(target=writer, daemon=True)
    with server_process(mongo_uri, database, "--log-level", "warning") as url:
        client = CatalogClient(url, token)
        thread.start()
        assert wait_until(lambda: len(written) > 60)
        since = written[40][1]
        got: queue.Queue[Event] = queue.Queue()
        stop = threading.Event()
        watcher = collect(client, got, stop, prefix="w/", since=since)
        time.sleep(1.0)  # the writer goes on while the watch replays and joins the stream
        done.set()
        thread.join(30)
        expected = [(p, r) for p, r in written if r > since]
        events = take(got, len(expected), timeout=60)
        stop.set()
        watcher.join(10)
        client.close()
    store.close()
    received = [(e["path"], e["revision"]) for e in events]
    assert len(set(received)) == len(received), "a duplicate"
    assert sorted(received, key=lambda x: x[1]) == sorted(expected, key=lambda x: x[1])
    assert got.empty(), got.get()
    for key in {p for p, _ in expected}:  # each path's events come in revision order
        revs = [r for p, r in received if p == key]
        assert revs == sorted(revs)
    deletes = set(written[11::5])  # the writer's i % 5 == 4, after the 7 first puts
    assert all(managed.history.find_one({"env": ENV, "events.revision": r}) for _, r in deletes)
    kinds = {(e["path"], e["revision"]): e["type"] for e in events}
    assert {kinds[d] for d in deletes if d in kinds} == {"delete"}
    assert {t for m, t in kinds.items() if m not in deletes} == {"put"}


def test_write_through_one_instance_watch_through_the_other(
    managed: ManagedStorage, mongo_uri: str, database: str, token: str
) -> None:
    with (
        server_process(mongo_uri, database, "--log-level", "warning") as one,
        server_process(mongo_uri, database, "--log-level", "warning") as two,
        CatalogClient(one, token) as writer,
        CatalogClient(two, token) as reader,
    ):
        start = put(managed, "x/start", b"0")
        got: queue.Queue[Event] = queue.Queue()
        stop = threading.Event()
        watcher = collect(reader, got, stop, prefix="x/", since=start)
        results = [writer.upload(ENV, f"x/{i}", io.BytesIO(f"n{i}".encode())) for i in range(5)]
        writer.remove(ENV, "x/0")
        events = take(got, 6)
        stop.set()
        watcher.join(10)
    assert [e["path"] for e in events] == ["x/0", "x/1", "x/2", "x/3", "x/4", "x/0"]
    assert [e["hash"] for e in events[:5]] == [r.hash for r in results]
    assert events[5]["type"] == "delete"


def test_since_older_than_the_history_kept_is_410(
    managed: ManagedStorage, mongo_uri: str, database: str, token: str
) -> None:
    first = put(managed, "t/a", b"1")
    second = put(managed, "t/a", b"2")
    managed.delete_path(ENV, "t/a")
    with server_process(mongo_uri, database, "--log-level", "warning") as url:
        client = CatalogClient(url, token)
        path = f"/v1/environments/{ENV}/watch"
        headers = {"authorization": f"Bearer {token}"}
        stop = threading.Event()
        threading.Timer(3.0, stop.set).start()
        events = list(client.watch(ENV, prefix="t/", since=first, stop=stop))
        assert [e["type"] for e in events] == ["put", "delete"]
        assert events[0]["revision"] == second
        # A reconnecting EventSource's Last-Event-ID resumes like since.
        resumed = httpx.get(
            url + path,
            params={"prefix": "t/", "timeout": "1"},
            headers=headers | {"last-event-id": str(first)},
        )
        assert f"id: {second}\nevent: put" in resumed.text
        assert resumed.text.count("event: ") == 2
        assert resumed.text.startswith(f": open\nid: {first}\n\n")  # where it starts
        everything = {"prefix": "t/", "since": "0", "timeout": "1"}
        from_start = httpx.get(url + path, params=everything, headers=headers)
        assert from_start.text.startswith(": open\nid: 0\n\n")  # since 0 is a start too
        assert from_start.text.count("event: ") == 3
        # Retention trims everything older than now: the floor is the last revision trimmed.
        hist.trim([managed.paths, managed.history], 0)
        floor = hist.floor(managed.db, ENV)
        assert floor > second
        r = httpx.get(url + path, params={"since": first}, headers=headers)
        assert r.status_code == 410 and r.json()["error"]["code"] == "request_expired"
        r = httpx.get(url + path, params={"since": first}, headers=headers | {"last-event-id": "1"})
        assert r.status_code == 410
        with pytest.raises(RequestExpiredError):
            next(iter(client.watch(ENV, since=first)))
        r = httpx.get(url + path, params={"since": floor, "timeout": "0.5"}, headers=headers)
        assert r.status_code == 200 and "event:" not in r.text
        client.close()


def test_a_client_disconnect_frees_the_server_side(
    managed: ManagedStorage,
    mongo_client: MongoClient[Any],
    database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(routes_watch, "HEARTBEAT", 0.2)

    def threads() -> int:
        return sum(t.name == "rescat-watch" for t in threading.enumerate())

    base_streams, base_threads = change_streams(mongo_client, database), threads()
    with (
        ServerThread(create_app(managed, auth=False)) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as http,
    ):
        path = f"/v1/environments/{ENV}/watch"
        opened = [open_stream(http, path, prefix=f"p{i}/") for i in range(3)]
        for i, stream in enumerate(opened):
            assert next(stream) == ": keep-alive"  # after HEARTBEAT seconds of silence
            assert next(stream) == ""
            put(managed, f"p{i}/k", b"v")
            assert next(stream).startswith("id: ")
        assert open_watches() == 3 and threads() == base_threads + 3
        # The watches share the process's one stream of the database (catalog.changehub).
        assert wait_until(lambda: change_streams(mongo_client, database) == base_streams + 1)
        for stream in opened:
            stream.close()  # closes the response: the client goes away
        assert wait_until(lambda: open_watches() == 0 and threads() == base_threads, 10)
        assert wait_until(lambda: change_streams(mongo_client, database) == base_streams, 10)


@contextmanager
def serve_on(port: int, mongo_uri: str, database: str) -> Iterator[str]:
    proc = serve_popen(mongo_uri, database, port, "--log-level", "warning")
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _healthy(url), 30)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_a_client_that_reads_nothing_holds_the_watch_thread_back() -> None:
    """At most BUFFER events are in flight to a response that sends none: the thread waits."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        handoff = asyncio.run_coroutine_threadsafe(_make_handoff(), loop).result(5)
        stop = threading.Event()
        posted = [handoff.post({"n": n}, stop) for n in range(routes_watch.BUFFER)]
        assert all(posted)
        blocked: list[bool] = []
        poster = threading.Thread(target=lambda: blocked.append(handoff.post({"n": -1}, stop)))
        poster.start()
        poster.join(timeout=1.0)
        assert poster.is_alive()  # no slot until the response takes one
        first = asyncio.run_coroutine_threadsafe(handoff.get(), loop).result(5)
        assert first == {"n": 0}
        poster.join(timeout=5)
        assert blocked == [True]  # the slot freed lets it through, in order, after the others
        poster = threading.Thread(target=lambda: blocked.append(handoff.post({"n": -2}, stop)))
        poster.start()
        poster.join(timeout=1.0)
        stop.set()  # the response ended: the waiting thread gives up, posting nothing
        poster.join(timeout=5)
        assert blocked == [True, False]
        rest = [
            asyncio.run_coroutine_threadsafe(handoff.get(), loop).result(5)
            for _ in range(routes_watch.BUFFER)
        ]
        assert rest == [{"n": n} for n in range(1, routes_watch.BUFFER)] + [{"n": -1}]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(timeout=5)
        loop.close()


async def _make_handoff() -> Any:
    return routes_watch._Handoff(asyncio.get_running_loop())


def test_client_watch_reconnects_after_the_service_restarts(
    managed: ManagedStorage, mongo_uri: str, database: str, token: str
) -> None:
    port = free_port()
    start = put(managed, "r/start", b"0")
    got: queue.Queue[Event] = queue.Queue()
    stop = threading.Event()
    with serve_on(port, mongo_uri, database) as url:
        client = CatalogClient(url, token)
        watcher = collect(client, got, stop, prefix="r/", since=start)
        before = [put(managed, f"r/{i}", b"a") for i in range(3)]
        assert [e["revision"] for e in take(got, 3)] == before
    during = [put(managed, f"r/{i}", b"b") for i in range(3)]  # while the service is down
    with serve_on(port, mongo_uri, database):
        after = [put(managed, f"r/{i}", b"c") for i in range(3)]
        assert [e["revision"] for e in take(got, 6)] == during + after
        stop.set()
        watcher.join(10)
        assert not watcher.is_alive()
    assert got.empty()
    client.close()


def test_cli_kv_watch_over_http(
    managed: ManagedStorage, mongo_uri: str, database: str, token: str
) -> None:
    start = put(managed, "c/start", b"0")
    with server_process(mongo_uri, database, "--log-level", "warning") as url:
        proc = subprocess.Popen(
            rescat_command(
                "kv", "watch", "--server", url, ENV, "--prefix", "c/", "--since", str(start)
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=cli_env(RESCAT_TOKEN=token, RESCAT_MONGO_URI="mongodb://127.0.0.1:1/"),
            cwd=REPO,
            text=True,
        )
        try:
            first = put(managed, "c/a", "é".encode())
            gone = managed.delete_path(ENV, "c/a")
            assert proc.stdout is not None
            lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
        finally:
            proc.terminate()
            proc.wait(15)
    data = "é".encode()
    assert lines[0]["type"] == "put" and lines[0]["key"] == "c/a"
    assert lines[0]["revision"] == first and lines[0]["length"] == len(data)
    assert lines[1] == {"type": "delete", "key": "c/a", "revision": gone}


def test_client_watch_resume_keeps_a_change_that_committed_after_a_newer_revision(
    managed: ManagedStorage, mongo_uri: str, database: str, token: str
) -> None:
    """Across paths events come in commit order, not revision order: a change whose
    revision was taken before another's can commit after it. A client that resumed
    from the last revision it got would never see that change."""
    port = free_port()
    start = put(managed, "r/start", b"0")
    got: queue.Queue[Event] = queue.Queue()
    stop = threading.Event()
    linked, release = threading.Event(), threading.Event()
    res, _ = managed._put(ENV, "r/a", io.BytesIO(b"a"), 1, None, WriteOptions(link=False))
    target = {"resource_id": object_id(res.id), "hash": res.hash, "length": res.length}

    def slow_link(session: Any, doomed: list[str]) -> None:
        managed._link_in(ENV, "r/a", target, PLAIN, session, doomed)  # its revision: now
        linked.set()
        release.wait(30)  # ... but it commits only later

    with serve_on(port, mongo_uri, database) as url:
        client = CatalogClient(url, token)
        watcher = collect(client, got, stop, prefix="r/", since=start)
        slow = threading.Thread(target=managed.transact, args=(slow_link,))
        slow.start()
        assert linked.wait(30)
        newer = put(managed, "r/b", b"b")
        assert [(e["path"], e["revision"]) for e in take(got, 1)] == [("r/b", newer)]
    release.set()  # r/a commits while the service is down, with a smaller revision
    slow.join(30)
    older = managed.stat_for_environment(ENV, "r/a").revision
    assert start < older < newer
    with serve_on(port, mongo_uri, database):
        assert [(e["path"], e["revision"]) for e in take(got, 1)] == [("r/a", older)]
        later = put(managed, "r/c", b"c")
        assert [(e["path"], e["revision"]) for e in take(got, 1)] == [("r/c", later)]
        stop.set()
        watcher.join(10)
    assert got.empty()  # r/b came once, r/start never
    client.close()


def test_a_revoked_token_s_watch_ends(managed: ManagedStorage) -> None:
    """Revocation takes effect at once (contract): an open stream too, within RECHECK."""
    secret, info = TokenStore(managed.db).create(env=ENV)
    with (
        ServerThread(create_app(managed, auth=True)) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as http,
    ):
        http.headers["authorization"] = f"Bearer {secret}"
        # timeout: a stream that is never cut ends anyway, and the test fails, not hangs
        lines = open_stream(http, f"/v1/environments/{ENV}/watch", prefix="v/", timeout="10")
        before = put(managed, "v/before", b"1")
        assert next(lines) == f"id: {before}"
        TokenStore(managed.db).revoke(info.id)
        assert http.get(f"/v1/environments/{ENV}/resources/v/before").status_code == 401
        time.sleep(routes_watch.RECHECK + 0.5)
        put(managed, "v/after", b"secret")
        rest = list(lines)  # the stream ends
        text = "\n".join(rest)
        assert "v/after" not in text
        assert "event: error" in text and '"code":"unauthorized"' in text


def test_a_watch_of_a_service_that_is_not_there_says_so_at_once() -> None:
    """It waited out its minute of reconnecting in silence (the CLI: nothing, for a minute)."""
    from service.client import ServiceUnavailableError

    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with CatalogClient(url) as client, pytest.raises(ServiceUnavailableError):
        next(client.watch(ENV, key="k"))
    assert time.monotonic() - started < 30  # not the 60 s of reconnecting
    for command in (  # each says where to look, as every other --server command does
        ("kv", "watch", "--server", url, ENV, "k"),
        ("download", "--server", url, ENV, "k", "-o", "/dev/null"),
        ("upload", "--server", url, ENV, "k", "/dev/null"),
    ):
        done = subprocess.run(
            rescat_command(*command),
            capture_output=True,
            env=cli_env(),
            cwd=REPO,
            text=True,
            timeout=30,
        )
        assert done.returncode == 1 and done.stdout == "", command
        assert len(done.stderr.splitlines()) == 1 and "check --server" in done.stderr, done.stderr


def test_a_ttl_key_s_expiry_reaches_the_sse_watch_as_one_delete(
    managed: ManagedStorage, mongo_uri: str, database: str, token: str
) -> None:
    """etcd sends a delete when a lease runs out; so do two services reaping at once.

    Was: the stream showed nothing until a gc (`--gc-interval`, off by default)
    deleted the key, so a watcher of a TTL key never learnt it had gone.
    """
    with (
        server_process(mongo_uri, database, "--log-level", "warning") as one,
        server_process(mongo_uri, database, "--log-level", "warning"),
        CatalogClient(one, token) as reader,
    ):
        store = KVStore(managed, ENV)
        start = put(managed, "ttl/start", b"0")
        got: queue.Queue[Event] = queue.Queue()
        stop = threading.Event()
        watcher = collect(reader, got, stop, prefix="ttl/", since=start)
        written = store.put("ttl/k", b"short-lived", ttl=1.0)
        store.close()  # no more renewals: it expires within a second
        put_event, delete_event = take(got, 2, timeout=20)
        time.sleep(2.5)  # a second reaper (or a later pass) would send another
        stop.set()
        watcher.join(10)
    assert got.empty(), got.get()
    assert (put_event["type"], put_event["revision"]) == ("put", written.last_index)
    assert delete_event["type"] == "delete" and delete_event["path"] == "ttl/k"
    assert delete_event["revision"] > written.last_index
    assert managed.paths.find_one({"env": ENV, "path": "ttl/k"}) is None
    assert (
        managed.paths.find_one({"expires_at": {"$lte": datetime.datetime.now(datetime.UTC)}})
        is None
    )
