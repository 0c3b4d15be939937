"""Clients that send slowly, too much, too deep or too often (issue 7): all loopback, bounded.

The server runs with the configuration `rescat serve` uses (`service.server`),
with short deadlines so that each test ends in seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from catalog import ManagedStorage
from service.app import create_app
from service.errors import STATUS_BY_CODE
from service.server import Limits, config

HASH = "blake3:" + "0" * 64


class Server:
    """`app` under `service.server.config` on a free loopback port, in a daemon thread."""

    def __init__(self, app: Any, limits: Limits, base: Any = None) -> None:
        self.server = uvicorn.Server(config(app, limits, host="127.0.0.1", port=0, base=base))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "no server"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture
def server(managed: ManagedStorage) -> Iterator[Server]:
    managed.put_for_environment("env", "a", io.BytesIO(b"0123456789"))
    app = create_app(managed, auth=False, read_timeout=3.0, min_rate=64.0, upload_threads=8)
    with Server(app, Limits(header_timeout=2.0, max_conns_per_client=250)) as srv:
        yield srv


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=20)


def answer(sock: socket.socket) -> tuple[int, bytes]:
    """Status and whatever the server sent until it closed (or 20 s passed)."""
    data = b""
    try:
        while True:
            more = sock.recv(65536)
            if not more:
                break
            data += more
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = [
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if length and len(rest) >= length[0]:
                    break
    except (ConnectionResetError, TimeoutError):
        pass
    if not data.startswith(b"HTTP/1.1 "):
        return 0, data
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def error_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


def test_nested_json_is_400(server: Server) -> None:
    deep = b"[" * 30_000 + b"]" * 30_000
    for route in ("put-requests", "put-requests/x/response"):
        r = httpx.post(f"{server.url}/v1/environments/env/{route}", content=deep)
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text
    nested = b'{"path": "p", "hash": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"
    r = httpx.post(f"{server.url}/v1/environments/env/put-requests", content=nested)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text


@pytest.mark.parametrize("length", [2**63, 2**64, 10**30])
@pytest.mark.parametrize("with_hash", [False, True])
def test_huge_content_length(server: Server, length: int, with_hash: bool) -> None:
    with connect(server.port) as sock:
        extra = f"X-Content-Hash: {HASH}\r\n" if with_hash else ""
        sock.sendall(
            f"PUT /v1/environments/env/resources/huge HTTP/1.1\r\nHost: x\r\n{extra}"
            f"Content-Length: {length}\r\n\r\nabc".encode()
        )
        status, body = answer(sock)
    # h11 refuses lengths it cannot hold itself (a 400 of its own, no JSON).
    assert status in (400, 413), (status, body)
    if body.startswith(b"{"):
        assert error_code(body) in ("too_large", "bad_request")


def test_short_json_body_times_out(server: Server) -> None:
    with connect(server.port) as sock:
        sock.sendall(
            b"POST /v1/environments/env/put-requests HTTP/1.1\r\nHost: x\r\n"
            b'Content-Length: 100\r\n\r\n{"path":'
        )
        start = time.monotonic()
        status, body = answer(sock)
        took = time.monotonic() - start
    assert status == 408 and error_code(body) == "request_timeout", (status, body)
    assert took < 10


def test_slow_header_sockets_are_closed(server: Server) -> None:
    socks = [connect(server.port) for _ in range(200)]
    try:
        start = time.monotonic()
        for i, sock in enumerate(socks):  # one byte each, then nothing more
            sock.sendall(b"G" if i % 2 else b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        # keep feeding a few of them slowly: feeding does not extend the deadline
        for _ in range(4):
            time.sleep(0.5)
            for sock in socks[:20]:
                with contextlib.suppress(OSError):
                    sock.sendall(b"a")
        closed = sum(closed_within(sock, max(0.1, start + 6 - time.monotonic())) for sock in socks)
        assert closed == 200
        assert time.monotonic() - start < 8
    finally:
        for sock in socks:
            sock.close()
    assert httpx.get(f"{server.url}/v1/environments/env/resources/a").content == b"0123456789"


def test_huge_headers_are_refused_before_they_fill_memory(server: Server) -> None:
    """Headers had no size limit, only a deadline: four connections sending 250 MiB of
    header lines each took the server from 55 MiB to 1 GiB in 2.4 s, with no token."""
    import psutil

    rss = psutil.Process().memory_info().rss  # the server runs in this process
    sock = connect(server.port)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        line = b"X-Pad: " + b"a" * 65536 + b"\r\n"
        with contextlib.suppress(OSError):  # the server closes while we send
            for _ in range(512):  # 32 MiB, were it all taken
                sock.sendall(line)
        status, body = answer(sock)
        assert status == 431 and "larger than" in json.loads(body)["error"]["message"]
    finally:
        sock.close()
    assert psutil.Process().memory_info().rss - rss < 16 * 1024 * 1024
    # ...nor as trailer fields after a chunked body (they were neither counted nor dropped)
    sock = connect(server.port)
    try:
        sock.sendall(
            b"PUT /v1/environments/env/resources/t HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
        )
        with contextlib.suppress(OSError):
            for _ in range(512):
                sock.sendall(b"X-T: " + b"t" * 65536 + b"\r\n")
        status, _ = answer(sock)
        assert status == 431
    finally:
        sock.close()
    assert psutil.Process().memory_info().rss - rss < 24 * 1024 * 1024
    # Chunked bodies of many small chunks and a few trailer fields pass.
    sock = connect(server.port)
    try:
        chunks = b"".join(b"1\r\nx\r\n" for _ in range(20_000))
        sock.sendall(
            b"PUT /v1/environments/env/resources/tiny HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nX-Note: fine\r\n\r\n"
        )
        status, _ = answer(sock)
        assert status == 201
    finally:
        sock.close()
    # Big headers below the limit, and a large body right behind its headers, still pass.
    big = {"x-big": "b" * 40_000}
    assert httpx.get(f"{server.url}/v1/environments/env/resources/a", headers=big).content == (
        b"0123456789"
    )
    sock = connect(server.port)
    try:  # one connection, each request in one write: a read can hold a whole request
        for size in (3 * 1024 * 1024, 100_000, 200_000, 70_000, 250_000):
            body = os.urandom(size)
            head = (
                b"PUT /v1/environments/env/resources/big HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            sock.sendall(head + body)
            status, _ = answer(sock)
            assert status == 201, size
    finally:
        sock.close()


def test_a_trickled_patch_is_held_to_the_minimum_rate(server: Server) -> None:
    """A PUT trickled a byte at a time gets 408 (--min-rate); a resumable upload's PATCH
    was exempt: a byte every read_timeout kept it, and a worker thread, for ever."""
    created = httpx.post(f"{server.url}/v1/environments/env/uploads", json={"path": "slow"})
    uid = created.json()["upload_id"]
    sock = connect(server.port)
    try:
        sock.sendall(
            f"PATCH /v1/environments/env/uploads/{uid} HTTP/1.1\r\nHost: x\r\n"
            "Upload-Offset: 0\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {1 << 20}\r\n\r\n".encode()
        )
        start = time.monotonic()
        sock.settimeout(1.0)
        status = 0
        while time.monotonic() - start < 12 and not status:
            with contextlib.suppress(OSError):
                sock.sendall(b"x")  # within read_timeout (3 s), far below min_rate (64 B/s)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else -1
        assert status == 408, status
        assert time.monotonic() - start < 10
    finally:
        sock.close()


def test_connections_per_client_are_capped(managed: ManagedStorage) -> None:
    app = create_app(managed, auth=False)
    with Server(app, Limits(header_timeout=10.0, max_conns_per_client=5)) as srv:
        socks = [connect(srv.port) for _ in range(5)]
        try:
            time.sleep(0.2)
            with connect(srv.port) as extra:
                status, body = answer(extra)
            assert status == 429 and error_code(body) == "too_many_requests"
            assert error_code(body) in STATUS_BY_CODE
        finally:
            for sock in socks:
                sock.close()
        time.sleep(0.2)  # the slots come back when the connections close
        r = httpx.get(f"{srv.url}/healthz")
        assert r.status_code == 200


def test_trickling_uploads_do_not_delay_a_normal_put(server: Server) -> None:
    """200 clients trickle bodies (8 upload slots); a 2 MiB PUT still answers in < 1 s."""
    stop = threading.Event()
    socks: list[socket.socket] = []
    for i in range(200):
        sock = connect(server.port)
        head = f"PUT /v1/environments/env/resources/slow/{i} HTTP/1.1\r\nHost: x\r\n"
        if i % 2:  # a large declared body, or chunked
            sock.sendall((head + f"Content-Length: {8 << 20}\r\n\r\n").encode() + b"x")
        else:
            sock.sendall((head + "Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n").encode())
        socks.append(sock)

    def trickle() -> None:
        while not stop.wait(0.5):
            for n, sock in enumerate(socks):
                with contextlib.suppress(OSError):
                    sock.sendall(b"x" if n % 2 else b"1\r\nx\r\n")

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        time.sleep(1.0)
        payload = os.urandom(2 << 20)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i in range(3):
                start = time.monotonic()
                r = client.put(f"/v1/environments/env/resources/normal/{i}", content=payload)
                took = time.monotonic() - start
                assert r.status_code == 201, r.text
                assert took < 1.0, f"a normal PUT took {took:.2f} s"
    finally:
        stop.set()
        feeder.join(5)
    # The tricklers are dropped by the minimum rate (64 B/s after 3 s) with 408.
    statuses = []
    for sock in socks:
        status, _ = answer(sock)
        statuses.append(status)
        sock.close()
    assert set(statuses) <= {408, 0}, statuses
    assert statuses.count(408) > 150


def test_token_cache_still_honours_revocation(managed: ManagedStorage) -> None:
    """With --token-cache, a known token skips its lookup; a revoked one fails within the TTL."""
    from catalog.tokens import TokenStore

    store = TokenStore(managed.db)
    token, info = store.create(env="env")
    app = create_app(managed, token_cache_seconds=0.5)
    with Server(app, Limits()) as srv, httpx.Client(base_url=srv.url) as client:
        auth = {"authorization": f"Bearer {token}"}
        assert client.get("/v1/environments/env/resources", headers=auth).status_code == 200
        unknown = {"authorization": "Bearer rescat_nope"}
        assert client.get("/v1/environments/env/resources", headers=unknown).status_code == 401
        store.revoke(info.id)
        deadline = time.monotonic() + 0.5 + 1.0
        while client.get("/v1/environments/env/resources", headers=auth).status_code == 200:
            assert time.monotonic() < deadline, "a revoked token still works after the TTL"
            time.sleep(0.05)
        new, _ = store.create(env="env")  # a new token works at once (misses are not cached)
        fresh = {"authorization": f"Bearer {new}"}
        assert client.get("/v1/environments/env/resources", headers=fresh).status_code == 200


def test_h11_fallback_has_the_same_deadlines(managed: ManagedStorage) -> None:
    """Without httptools the protocol subclasses uvicorn's h11 one, with the same limits."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    managed.put_for_environment("env", "a", io.BytesIO(b"0123456789"))
    app = create_app(managed, auth=False)
    limits = Limits(header_timeout=1.0, max_conns_per_client=3)
    with Server(app, limits, base=H11Protocol) as srv:
        with connect(srv.port) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            assert closed_within(slow, 4.0)
        with httpx.Client(base_url=srv.url) as client:
            for _ in range(3):  # keep-alive: the deadline restarts after each response
                r = client.get("/v1/environments/env/resources/a")
                assert r.content == b"0123456789"
                time.sleep(0.4)
        socks = [connect(srv.port) for _ in range(3)]
        try:
            time.sleep(0.2)
            with connect(srv.port) as extra:
                assert answer(extra)[0] == 429
        finally:
            for sock in socks:
                sock.close()
    # The head limit is httptools' (h11 keeps its own): h11 never says where a head ends,
    # and counting there refused a 100 KiB body and the 270th request of a connection.
    again = create_app(managed, auth=False)  # an app's lifespan runs once
    with Server(again, Limits(), base=H11Protocol) as srv, httpx.Client(base_url=srv.url) as c:
        for _ in range(300):
            assert c.get("/v1/environments/env/resources/a").status_code == 200
        body = os.urandom(100_000)
        assert c.put("/v1/environments/env/resources/b", content=body).status_code == 201


def test_a_catalog_error_without_a_code_is_400(managed: ManagedStorage) -> None:
    """No answer carries an error code outside the service's table (e.g. `catalog_error`)."""
    from catalog.errors import CatalogError

    app = create_app(managed, auth=False)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise CatalogError("the input ended early")

    app.managed.put_path = broken  # type: ignore[method-assign]
    with Server(app, Limits()) as srv:
        r = httpx.put(f"{srv.url}/v1/environments/env/resources/x", content=b"abc")
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"


@pytest.mark.parametrize("coding", ["gzip", "identity", "xyz", "gzip, chunked"])
def test_a_transfer_coding_other_than_chunked_writes_nothing(
    server: Server, managed: ManagedStorage, coding: str
) -> None:
    """RFC 9112 §6: only a final `chunked` frames a body we can read; anything else is
    refused, and nothing is written (it once became a zero-byte replace after a 400)."""
    for path in ("/v1/environments/env/resources/a", "/store/a"):
        with connect(server.port) as sock:
            sock.sendall(
                f"PUT {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {coding}\r\n\r\n".encode()
                + b"3\r\nnew\r\n0\r\n\r\n"
            )
            sock.settimeout(10)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    answer += chunk
                    if b"\r\n\r\n" in answer:
                        break
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 404, 501), answer[:300]
    time.sleep(1.0)  # a write after the answer would land by now
    reader, length = managed.get_for_environment("env", "a")
    with contextlib.closing(reader):
        assert (reader.read(), length) == (b"0123456789", 10)
    assert [e["event"] for e in managed.history_for_environment("env", "a")] == ["create"]


def test_trailer_fields_are_not_request_headers(server: Server, managed: ManagedStorage) -> None:
    """RFC 9110 §6.5.1: a chunked body's trailer is not merged into the headers (a trailer
    `X-Content-Hash` once made a valid PUT fail, a trailer `Authorization` let one in)."""
    for n in range(5):
        with connect(server.port) as sock:
            sock.sendall(
                f"PUT /v1/environments/env/resources/t{n} HTTP/1.1\r\nHost: x\r\n".encode()
                + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                + b"3\r\nabc\r\n0\r\nX-Content-Hash: "
                + HASH.encode()
                + b"\r\n\r\n"
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
        reader, _ = managed.get_for_environment("env", f"t{n}")
        with contextlib.closing(reader):
            assert reader.read() == b"abc"


def test_requests_the_parser_refuses_answer_json(server: Server) -> None:
    port = server.port
    for head in (
        b"PUT /v1/environments/e/resources/p HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"PUT /v1/environments/e/resources/p HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        status, _, rest = answer.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 400"), answer[:200]
        body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "bad_request"


def test_last_modified_is_never_later_than_the_date_of_its_answer(
    server: Server, managed: ManagedStorage
) -> None:
    """uvicorn renews its Date once a second, so it lagged a change just made; and the
    database's clock may run ahead of the service's (RFC 9110 §8.8.2.1: must not)."""

    def dates(r: httpx.Response) -> tuple[float, float]:
        sent = email.utils.parsedate_to_datetime(r.headers["date"]).timestamp()
        return sent, email.utils.parsedate_to_datetime(r.headers["last-modified"]).timestamp()

    with httpx.Client(base_url=f"{server.url}/v1/environments/env/resources") as client:
        for i in range(30):
            assert client.put(f"/d{i}", content=b"x").status_code == 201
            sent, modified = dates(client.get(f"/d{i}"))
            assert modified <= sent <= time.time()
            assert sent > time.time() - 2  # the Date is now, not a while ago
            time.sleep(0.05)
        ahead = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
        managed.paths.update_one({"env": "env", "path": "d0"}, {"$set": {"updated_at": ahead}})
        r = client.get("/d0")
        sent, modified = dates(r)
        assert modified == sent
        since = {"if-modified-since": r.headers["date"]}
        assert client.get("/d0", headers=since).status_code == 304
