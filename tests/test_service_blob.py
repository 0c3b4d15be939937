"""Blob-server semantics over HTTP: atomic conditional writes, X-Revision, Content-Type,
history, readers during replaces, online gc's lease."""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from pymongo.database import Database

import cli.main  # noqa: F401  (registers every command)
from catalog import ManagedStorage, NotFoundError
from catalog.clock import utcnow as hist_utcnow
from catalog.history import items as history_items
from catalog.online_gc import Lease, OnlineGc
from cli.app import cli as rescat
from service.app import create_app
from service.client import CatalogClient, _listed_items
from service.conditions import content_type, parse_tag
from service.errors import ServiceError
from tests.helpers import b3, rand
from tests.test_service_support import ServerThread, server_process

MiB = 1024 * 1024
V1 = "/v1/environments/e/resources"


@pytest.fixture
def url(managed: ManagedStorage) -> Iterator[str]:
    with ServerThread(create_app(managed, auth=False)) as server:
        yield server.url


def race(n: int, fn: Any) -> list[int]:
    """Run fn(i) for i in range(n) at once (released by one barrier); their statuses."""
    barrier = threading.Barrier(n)

    def one(i: int) -> int:
        barrier.wait()
        return int(fn(i))

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.parametrize("size", [100, 2 * MiB])
def test_six_create_only_puts_one_wins(url: str, managed: ManagedStorage, size: int) -> None:
    bodies = [rand(size) for _ in range(6)]

    def put(i: int) -> int:
        with httpx.Client(base_url=url, timeout=60) as c:
            return c.put(f"{V1}/new", content=bodies[i], headers={"If-None-Match": "*"}).status_code

    statuses = race(6, put)
    assert sorted(statuses) == [201] + [412] * 5, statuses
    winner = bodies[statuses.index(201)]
    assert managed.stat_for_environment("e", "new").hash == b3(winner)
    assert httpx.get(f"{url}{V1}/new").content == winner
    # A loser's bytes are not kept: only the winner's content is referenced.
    assert managed.db.catalog.count_documents({}) == 1


@pytest.mark.parametrize("form", ["etag", "revision"])
def test_four_if_match_replaces_one_wins(url: str, managed: ManagedStorage, form: str) -> None:
    first = httpx.put(f"{url}{V1}/p", content=b"v0")
    assert first.status_code == 201
    tag = first.headers["etag"] if form == "etag" else f'"{first.headers["x-revision"]}"'
    bodies = [rand(1000) for _ in range(4)]

    def put(i: int) -> int:
        with httpx.Client(base_url=url, timeout=60) as c:
            return c.put(f"{V1}/p", content=bodies[i], headers={"If-Match": tag}).status_code

    statuses = race(4, put)
    assert sorted(statuses) == [201, 412, 412, 412], statuses
    assert httpx.get(f"{url}{V1}/p").content == bodies[statuses.index(201)]


def test_conditional_delete_and_revision_headers(url: str, managed: ManagedStorage) -> None:
    with httpx.Client(base_url=url) as c:
        put = c.put(f"{V1}/d.txt", content=b"one")
        rev = int(put.headers["x-revision"])
        assert rev == managed.stat_for_environment("e", "d.txt").revision
        for method in ("GET", "HEAD"):
            got = c.request(method, f"{V1}/d.txt")
            assert got.headers["x-revision"] == str(rev)
            assert got.headers["etag"] == put.headers["etag"]
        again = c.put(f"{V1}/d.txt", content=b"two", headers={"If-Match": f'"{rev}"'})
        assert again.status_code == 201 and int(again.headers["x-revision"]) > rev
        # Stale revision and ETag: 412 and nothing changes.
        stale_rev = {"If-Match": f'"{rev}"'}
        assert c.put(f"{V1}/d.txt", content=b"x", headers=stale_rev).status_code == 412
        assert c.delete(f"{V1}/d.txt", headers={"If-Match": put.headers["etag"]}).status_code == 412
        assert c.delete(f"{V1}/d.txt", headers={"If-None-Match": "*"}).status_code == 412
        assert c.get(f"{V1}/d.txt").content == b"two"
        # GET's If-Match takes revisions too.
        assert c.get(f"{V1}/d.txt", headers={"If-Match": f'"{rev}"'}).status_code == 412
        current = f'"{again.headers["x-revision"]}"'
        assert c.get(f"{V1}/d.txt", headers={"If-Match": current}).status_code == 200
        # If-Match: * needs the path; a list of tags matches the current one.
        assert c.put(f"{V1}/absent", content=b"x", headers={"If-Match": "*"}).status_code == 412
        tags = f'"blake3:{"0" * 64}", {again.headers["etag"]}'
        assert c.put(f"{V1}/d.txt", content=b"3", headers={"If-Match": tags}).status_code == 201
        # If-None-Match with an ETag that is not current: written.
        stale = {"If-None-Match": put.headers["etag"]}
        assert c.put(f"{V1}/d.txt", content=b"4", headers=stale).status_code == 201
        etag = c.head(f"{V1}/d.txt").headers["etag"]
        assert c.delete(f"{V1}/d.txt", headers={"If-Match": etag}).status_code == 204
        assert c.get(f"{V1}/d.txt").status_code == 404
        assert c.put(f"{V1}/w", content=b"x", headers={"If-Match": 'W/"1"'}).status_code == 412


def test_content_type_stored_or_guessed(url: str) -> None:
    with httpx.Client(base_url=url) as c:
        c.put(f"{V1}/page.html", content=b"<p>")
        c.put(f"{V1}/data.bin", content=b"\0", headers={"Content-Type": "application/x-thing"})
        c.put(f"{V1}/notes", content=b"n", headers={"Content-Type": "text/markdown; charset=utf-8"})
        c.put(f"{V1}/raw.json", content=b"{}", headers={"Content-Type": "application/octet-stream"})
        c.put(f"{V1}/plain", content=b"x")
        expected = {
            "page.html": "text/html",
            "data.bin": "application/x-thing",
            "notes": "text/markdown; charset=utf-8",
            "raw.json": "application/json",
            "plain": "application/octet-stream",
        }
        for name, media in expected.items():
            assert c.get(f"{V1}/{name}").headers["content-type"] == media, name
            assert c.get(f"{V1}/{name}").headers["x-content-type-options"] == "nosniff"
            assert c.head(f"{V1}/{name}").headers["content-type"] == media, name
        # A replace stores the new bytes' type (none given: no longer text/markdown).
        c.put(f"{V1}/notes", content=b"n2")
        assert c.get(f"{V1}/notes").headers["content-type"] == "application/octet-stream"


def test_condition_and_media_type_parsing() -> None:
    assert parse_tag('"12"') == 12 and parse_tag("12") == 12
    assert parse_tag(f'"blake3:{"A" * 64}"') == "a" * 64
    assert parse_tag("*") == "*"
    for never in ('W/"1"', '"x"', '"-1"', '"blake3:12"', '""', '"1' + "0" * 30 + '"'):
        assert parse_tag(never) is None, never
    assert content_type("text/plain", "a.bin") == "text/plain"
    assert content_type("application/x-www-form-urlencoded", "a.txt") == "text/plain"
    assert content_type("bad type", "a") is None
    assert content_type(None, "x/data:y.css") == "text/css"
    assert content_type("a/b\r\nx: y", "noext") is None


def test_history_over_http_22_events(mongo_uri: str, db: Database[Any]) -> None:
    """create + 20 replaces + delete through `rescat serve`; the same after a restart."""
    with server_process(mongo_uri, db.name, "--no-auth") as url, httpx.Client(base_url=url) as c:
        hashes = []
        for i in range(21):
            body = f"version {i}".encode()
            hashes.append(b3(body))
            assert c.put(f"{V1}/h", content=body).status_code == 201
        assert c.delete(f"{V1}/h").status_code == 204
        got = c.get("/v1/environments/e/history/h")
        assert got.status_code == 200
        items = got.json()["items"]
        assert [i["event"] for i in items] == ["create"] + ["replace"] * 20 + ["delete"]
        assert {i["state"] for i in items} == {"ok"}
        assert [i["hash"] for i in items[:21]] == hashes and items[21]["hash"] == hashes[-1]
        revisions = [i["revision"] for i in items]
        assert revisions == sorted(revisions) and len(set(revisions)) == 22
        assert all(i["at"].endswith("Z") for i in items)
        assert set(items[0]) == {"at", "event", "state", "hash", "length", "revision"}
        assert c.get("/v1/environments/e/history/never").status_code == 404
        assert c.get("/v1/environments/e/history/a/%2e%2e").status_code == 400
    with server_process(mongo_uri, db.name, "--no-auth") as url:
        again = httpx.get(f"{url}/v1/environments/e/history/h").json()
    assert again == {"items": items}


def long_history(db: Database[Any], managed: ManagedStorage, path: str, n: int) -> None:
    """`n` operations on `path` of environment e, all but the newest ~1,000 archived."""
    from catalog.pathdocs import HISTORY_KEPT

    now = hist_utcnow()
    past = [
        {"at": now, "event": "replace", "state": "ok", "hash": "h" * 64, "length": 1, "revision": r}
        for r in range(1, n + 1)
    ]
    db["path_history"].insert_one({"env": "e", "path": path, "events": past[: HISTORY_KEPT + 1]})
    managed._archive_old("e", path)
    db["path_history"].update_one(
        {"env": "e", "path": path}, {"$push": {"events": {"$each": past[HISTORY_KEPT + 1 :]}}}
    )
    assert db["path_archive"].count_documents({"path": path}) == 1


def test_a_long_history_over_http_is_sent_as_read(
    mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    """3,000 operations, most in archive buckets: all sent, in order, in pieces (chunked)."""
    long_history(db, managed, "long", 3000)
    with server_process(mongo_uri, db.name, "--no-auth") as url, httpx.Client(base_url=url) as c:
        got = c.get("/v1/environments/e/history/long")
    assert got.status_code == 200 and got.headers["content-type"] == "application/json"
    assert "content-length" not in got.headers  # streamed
    items = got.json()["items"]
    assert [i["revision"] for i in items] == list(range(1, 3001))
    assert set(items[0]) == {"at", "event", "state", "hash", "length", "revision"}


def test_the_client_and_the_cli_read_a_long_history_as_it_arrives(
    mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    """Neither holds the whole answer: the most either holds is a piece and an item."""
    long_history(db, managed, "long", 6000)
    with server_process(mongo_uri, db.name, "--no-auth") as url, CatalogClient(url) as client:
        whole = httpx.get(f"{url}/v1/environments/e/history/long")
        assert [i["revision"] for i in client.iter_history("e", "long")] == list(range(1, 6001))
        assert client.history("e", "long") == whole.json()["items"]

        def peak(read: Any) -> int:
            tracemalloc.start()
            try:
                read()
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

        streamed = peak(lambda: collections.deque(client.iter_history("e", "long"), maxlen=0))
        held = peak(lambda: httpx.get(f"{url}/v1/environments/e/history/long").json())
        assert streamed * 4 < held, (streamed, held)
        with pytest.raises(NotFoundError):
            next(client.iter_history("e", "never"))

        local = ["--mongo-uri", mongo_uri, "--database", db.name, "history", "e", "long"]
        for args in (local, ["history", "--server", url, "e", "long"]):
            out = CliRunner().invoke(rescat, [*args, "--json"], catch_exceptions=False)
            assert out.output == json.dumps(whole.json(), indent=2) + "\n"
            text = CliRunner().invoke(rescat, args, catch_exceptions=False)
            assert [line.split()[4] for line in text.output.splitlines()] == [
                str(r) for r in range(1, 6001)
            ]


def test_an_upload_whose_client_goes_away_early_shows_as_failed(
    mongo_uri: str, db: Database[Any]
) -> None:
    """Also when it breaks off in the first block, which the service receives before the put."""

    def broken_off(url: str, path: str, declared: int, sent: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            head = f"PUT /v1/environments/e/resources/{path} HTTP/1.1\r\nHost: x\r\n"
            sock.sendall(f"{head}Content-Length: {declared}\r\n\r\n".encode() + b"z" * sent)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(100)

    with server_process(mongo_uri, db.name, "--no-auth") as url:
        broken_off(url, "tiny", 100, 3)  # all of it in the first block
        broken_off(url, "some", 10_000_000, 3_000_000)  # within the first 4 MiB
        broken_off(url, "more", 20_000_000, 9_000_000)  # past it: the put was running
        httpx.put(f"{url}/v1/environments/e/resources/some", content=b"then whole")

        def shown(path: str) -> list[tuple[str, str]]:
            got = httpx.get(f"{url}/v1/environments/e/history/{path}")
            return [(i["event"], i["state"]) for i in got.json().get("items", [])]

        deadline = time.monotonic() + 20
        while shown("more") != [("upload", "failed")] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert shown("tiny") == [("upload", "failed")]
        assert shown("some") == [("upload", "failed"), ("create", "ok")]
        assert shown("more") == [("upload", "failed")]
        assert httpx.get(f"{url}/v1/environments/e/resources/tiny").status_code == 404


def test_a_history_answer_is_parsed_whatever_its_pieces() -> None:
    items = [{"at": "t", "event": "create", "revision": r, "hash": "x,]}[{"} for r in range(40)]
    body = json.dumps({"items": items}, indent=1)
    for size in (1, 2, 3, 7, 64, len(body)):
        pieces = iter([body[i : i + size] for i in range(0, len(body), size)])
        assert list(_listed_items(pieces)) == items
    assert list(_listed_items(iter(['{"items":[]}']))) == []
    with pytest.raises(ServiceError, match="ended before"):
        list(_listed_items(iter([body[: len(body) // 2]])))
    with pytest.raises(ServiceError, match="not a list of items"):
        list(_listed_items(iter(['{"error": {"code": "x", "message": "y"}}'])))


def test_history_orders_failed_uploads_by_time() -> None:
    import datetime

    t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

    def at(s: int) -> datetime.datetime:
        return t0 + datetime.timedelta(seconds=s)

    events = [
        {"at": at(5), "event": "upload", "state": "failed", "hash": "", "length": 0, "revision": 0},
        {"at": at(1), "event": "create", "state": "ok", "hash": "a", "length": 1, "revision": 3},
        {"at": at(9), "event": "replace", "state": "ok", "hash": "b", "length": 1, "revision": 7},
    ]
    shaped = history_items(events)
    assert [e["event"] for e in shaped] == ["create", "upload", "replace"]
    assert shaped[0]["at"] == "2026-01-01T00:00:01.000Z"


@pytest.mark.slow
def test_readers_during_64_mib_replaces_see_whole_versions(
    url: str, managed: ManagedStorage
) -> None:
    versions = [rand(64 * MiB, seed=i) for i in range(3)]
    digests = {b3(v): i for i, v in enumerate(versions)}
    with httpx.Client(base_url=url, timeout=120) as c:
        assert c.put(f"{V1}/big", content=versions[0]).status_code == 201
    stop = threading.Event()
    seen: list[list[int]] = [[] for _ in range(4)]
    errors: list[str] = []

    def reader(mine: list[int]) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                got = c.get(f"{V1}/big")
                if got.status_code != 200:
                    errors.append(f"status {got.status_code}")
                    continue
                digest = b3(got.content)
                if digest not in digests or got.headers["etag"] != f'"blake3:{digest}"':
                    errors.append(f"a body of {len(got.content)} bytes that is no version")
                mine.append(digests.get(digest, -1))

    threads = [threading.Thread(target=reader, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for version in versions[1:]:
                time.sleep(0.3)
                assert c.put(f"{V1}/big", content=version).status_code == 201
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors, errors[:5]
    assert sum(map(len, seen)) >= 4
    # Reads that overlap a replace may finish after it, so only each reader's own
    # sequence is ordered: no reader ever goes back to an older version.
    for mine in seen:
        assert mine == sorted(mine), mine
    with httpx.Client(base_url=url, timeout=120) as c:
        assert b3(c.get(f"{V1}/big").content) == b3(versions[2])
    assert managed.db["read_leases"].count_documents({}) == 0  # every reader closed


def test_get_dropped_by_the_client_closes_its_reader(url: str, managed: ManagedStorage) -> None:
    httpx.put(f"{url}{V1}/drop", content=rand(8 * MiB), timeout=60)
    with httpx.stream("GET", f"{url}{V1}/drop", timeout=60) as got:
        next(got.iter_bytes())  # the body has started: the reader is open
        assert managed.db["read_leases"].count_documents({}) == 1
    # The client went away mid-body: the service closes the reader (drops its lease).
    deadline = time.monotonic() + 15
    while managed.db["read_leases"].count_documents({}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert managed.db["read_leases"].count_documents({}) == 0


def test_gc_lease_one_holder_at_a_time(db: Database[Any], managed: ManagedStorage) -> None:
    a, b = Lease(db, "gc", "a"), Lease(db, "gc", "b")
    assert a.take(60) and a.take(60)  # taken, then renewed by its holder
    assert not b.take(60)
    a.release()
    assert b.take(0.2) and not a.take(60)
    time.sleep(0.3)
    assert a.take(60)  # b's lease ran out
    # Concurrent takers of a free lease: exactly one.
    db["service_leases"].delete_many({})
    leases = [Lease(db, "gc", f"h{i}") for i in range(6)]
    assert sorted(race(6, lambda i: leases[i].take(60))) == [0] * 5 + [1]


def test_online_gc_runs_on_one_instance(managed: ManagedStorage) -> None:
    one = OnlineGc(managed, 0.2, grace=0, holder="one")
    two = OnlineGc(managed, 0.2, grace=0, holder="two")
    with one, two:
        time.sleep(1.5)
        assert (one.runs > 0) != (two.runs > 0), (one.runs, two.runs)
        first = one if one.runs else two
    # Stopping released the lease: another instance takes over at its next tick.
    other = OnlineGc(managed, 0.2, grace=0, holder="three")
    assert other.run_once() is not None and first.lease.holder != other.lease.holder
