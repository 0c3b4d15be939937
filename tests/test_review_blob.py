"""Review of the blob-server face: what a demanding client of `rescat serve` runs into.

Each test runs a real `rescat serve` (or the app in a uvicorn thread) on a real mongod.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from catalog.mongod import free_port
from tests.test_service_support import (
    REPO,
    cli_env,
    rescat_command,
    serve_popen,
    server_process,
    wait_until,
)

MiB = 1024 * 1024


def _serve(mongo_uri: str, database: str, port: int, **env: str) -> subprocess.Popen[bytes]:
    return serve_popen(mongo_uri, database, port, "--no-auth", **env)


def test_upload_whose_server_died_is_failed_once_its_lease_ran_out(
    mongo_uri: str, database: str, mongo_client: MongoClient[Any]
) -> None:
    """The contract: an upload whose uploader died becomes `failed` once its lease runs
    out *or* gc runs; without gc, its history said `pending` forever."""
    port = free_port()
    proc = _serve(mongo_uri, database, port, RESCAT_UPLOAD_LEASE="1")
    url = f"http://127.0.0.1:{port}"
    released = threading.Event()
    try:
        assert wait_until(lambda: _healthy(url), 30)

        def body() -> Iterator[bytes]:
            yield b"x" * (6 * MiB)  # past the first fill: a streamed upload, shown as pending
            released.wait(60)

        def upload() -> None:
            try:
                with httpx.Client(timeout=60) as c:
                    c.put(f"{url}/v1/environments/e/resources/big", content=body())
            except httpx.HTTPError:
                pass  # the server is killed under it

        uploader = threading.Thread(target=upload)
        uploader.start()
        history = mongo_client[database]["path_history"]
        assert wait_until(
            lambda: history.find_one({"env": "e", "path": "big", "events.state": "pending"}), 30
        )
        proc.kill()  # the uploader dies: nobody renews the lease, nobody marks it failed
        proc.wait()
        released.set()
        uploader.join(60)
        time.sleep(1.5)  # the 1 s lease has run out (no gc runs in this test)
    finally:
        released.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with server_process(mongo_uri, database, "--no-auth") as url2:
        got = httpx.get(f"{url2}/v1/environments/e/history/big")
        assert got.status_code == 200
        assert [(i["event"], i["state"]) for i in got.json()["items"]] == [("upload", "failed")]
        assert httpx.get(f"{url2}/v1/environments/e/resources/big").status_code == 404
    run = subprocess.run(
        rescat_command("--mongo-uri", mongo_uri, "--database", database, "history", "e", "big"),
        capture_output=True,
        env=cli_env(),
        cwd=REPO,
        check=True,
    )
    assert b"failed" in run.stdout and b"pending" not in run.stdout


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def store(mongo_uri: str, database: str) -> Iterator[str]:
    with server_process(mongo_uri, database, "--no-auth", "--compat-store", "seed") as url:
        yield url + "/store"


STALE = f'"blake3:{"0" * 64}"'


def test_store_writes_honour_the_clients_if_match(store: str) -> None:
    """/store hands out ETags; a replace or delete conditioned on one must not go through
    when the blob changed since (it did: the condition was dropped, a lost update)."""
    with httpx.Client() as c:
        first = c.post(f"{store}/k", content=b"v1")
        assert first.status_code == 201
        etag = first.headers["etag"]
        stale_put = c.put(f"{store}/k", content=b"lost", headers={"If-Match": STALE})
        assert stale_put.status_code == 412
        assert stale_put.json()["error"]["code"] == "precondition_failed"
        assert c.delete(f"{store}/k", headers={"If-Match": STALE}).status_code == 412
        assert c.put(f"{store}/k", content=b"x", headers={"If-None-Match": "*"}).status_code == 412
        assert c.get(f"{store}/k").content == b"v1"
        replaced = c.put(f"{store}/k", content=b"v2", headers={"If-Match": etag})
        assert replaced.status_code == 200
        # The old ETag is stale now; the revision the replace answered with is current.
        assert c.put(f"{store}/k", content=b"lost", headers={"If-Match": etag}).status_code == 412
        rev = {"If-Match": f'"{replaced.headers["x-revision"]}"'}
        assert c.delete(f"{store}/k", headers=rev).status_code == 204
        # Absent: 404 as without a condition (RFC 9110 §13.2.1).
        assert c.put(f"{store}/k", content=b"x", headers={"If-Match": etag}).status_code == 404
        assert c.delete(f"{store}/k", headers={"If-Match": etag}).status_code == 404
        assert c.get(f"{store}/k").status_code == 404


def test_store_conditional_replaces_race_one_wins(store: str) -> None:
    with httpx.Client() as c:
        etag = c.post(f"{store}/r", content=b"v0").headers["etag"]
    barrier = threading.Barrier(4)

    def put(i: int) -> int:
        with httpx.Client(timeout=60) as c:
            barrier.wait()
            body = f"writer {i}".encode()
            return c.put(f"{store}/r", content=body, headers={"If-Match": etag}).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(put, range(4)))
    assert sorted(statuses) == [200, 412, 412, 412], statuses
    assert httpx.get(f"{store}/r").content == f"writer {statuses.index(200)}".encode()


def test_store_reads_honour_conditions_and_ranges(store: str) -> None:
    """/store GET hands out an ETag: If-None-Match with it is 304 and a stale If-Match 412
    (RFC 9110 §13.1: an origin server evaluates them); it answered 200 and the whole body."""
    body = bytes(range(256)) * 4
    with httpx.Client() as c:
        etag = c.post(f"{store}/c", content=body).headers["etag"]
        for method in ("GET", "HEAD"):
            cached = c.request(method, f"{store}/c", headers={"If-None-Match": etag})
            assert (cached.status_code, cached.content) == (304, b""), method
            assert cached.headers["etag"] == etag
            stale = c.request(method, f"{store}/c", headers={"If-Match": STALE})
            assert stale.status_code == 412, method
        part = c.get(f"{store}/c", headers={"Range": "bytes=10-19"})
        assert (part.status_code, part.content) == (206, body[10:20])
        assert part.headers["content-range"] == f"bytes 10-19/{len(body)}"
        assert c.get(f"{store}/c", headers={"Range": "bytes=5000-"}).status_code == 416
        whole, head = c.get(f"{store}/c"), c.head(f"{store}/c")
        assert whole.content == body
        for name in ("etag", "content-length", "content-type", "last-modified", "x-revision"):
            assert whole.headers[name] == head.headers[name], name


def _first_answer(url: str, head: str) -> bytes:
    """The status line the server sends to a request whose body waits for 100 Continue."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    with socket.create_connection((host, int(port))) as s:
        s.settimeout(60)  # a guard against a hang only: the answer comes at once either way
        s.sendall(head.encode() + b"Expect: 100-continue\r\nContent-Length: 1000000000\r\n\r\n")
        return s.recv(4096).split(b"\r\n", 1)[0]


def test_store_refuses_a_large_body_before_it_is_sent(store: str) -> None:
    """curl sends Expect: 100-continue for bodies over 1 MiB: a create of an existing blob,
    or a replace of an absent one, must be refused before the client sends 1 GB (the
    service answered 100 Continue and took the whole body to answer 409 / 404)."""
    with httpx.Client() as c:
        etag = c.post(f"{store}/there", content=b"v").headers["etag"]
    base = "/" + store.split("//", 1)[1].split("/", 1)[1]

    def ask(method: str, name: str, extra: str = "") -> bytes:
        return _first_answer(store, f"{method} {base}/{name} HTTP/1.1\r\nHost: x\r\n{extra}")

    assert ask("POST", "there") == b"HTTP/1.1 409 Conflict"
    assert ask("PUT", "absent") == b"HTTP/1.1 404 Not Found"
    assert ask("PUT", "absent", f"If-Match: {etag}\r\n") == b"HTTP/1.1 404 Not Found"
    assert ask("PUT", "there", f"If-Match: {STALE}\r\n") == b"HTTP/1.1 412 Precondition Failed"
    # What may go through is still taken: 100 Continue, then the body.
    assert ask("PUT", "there", f"If-Match: {etag}\r\n") == b"HTTP/1.1 100 Continue"
    assert ask("POST", "new") == b"HTTP/1.1 100 Continue"
    assert httpx.get(f"{store}/there").content == b"v"
    assert httpx.get(f"{store}/new").status_code == 404


def test_v1_create_only_put_refuses_a_large_body_before_it_is_sent(store: str) -> None:
    """`PUT /v1/...` with `If-None-Match: *` on an existing path answered 100 Continue and
    read the body (the first 4 MiB at least) before its 412; like If-Match, it is refused
    before the client sends anything, and a create of a new path still goes through."""
    root = store.removesuffix("/store")
    assert httpx.put(f"{root}/v1/environments/seed/resources/there", content=b"v").is_success

    def ask(name: str) -> bytes:
        head = f"PUT /v1/environments/seed/resources/{name} HTTP/1.1\r\nHost: x\r\n"
        return _first_answer(root, head + "If-None-Match: *\r\n")

    assert ask("there") == b"HTTP/1.1 412 Precondition Failed"
    assert ask("new") == b"HTTP/1.1 100 Continue"
    assert httpx.get(f"{root}/v1/environments/seed/resources/there").content == b"v"
