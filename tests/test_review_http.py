"""HTTP semantics found wanting by review, against a real service (uvicorn, real mongod).

* A PUT with Content-Range stored the fragment as the whole object (RFC 9110
  14.5 requires 400): `bytes 2-4/10` of a 10-byte object left 3 bytes.
* If-Unmodified-Since was honoured by GET alone; a PUT or DELETE carrying an
  old date overwrote or deleted (RFC 9110 13.1.4: evaluated before the method).
* A proof checksum that is no hash was a wrong answer (403, request consumed);
  it is a malformed body, 400 like a missing one, and the request stays open.
"""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Iterator
from email.utils import formatdate

import httpx
import pytest

from catalog import ManagedStorage
from service.app import create_app
from tests.test_service_support import ServerThread

ENV = "team"


@pytest.fixture
def http(managed: ManagedStorage) -> Iterator[httpx.Client]:
    with (
        ServerThread(create_app(managed, auth=False)) as server,
        httpx.Client(base_url=f"{server.url}/v1/environments/{ENV}", timeout=30) as client,
    ):
        yield client


def test_a_put_with_content_range_is_refused_and_changes_nothing(http: httpx.Client) -> None:
    assert http.put("/resources/obj", content=b"0123456789").status_code == 201
    r = http.put("/resources/obj", content=b"XYZ", headers={"content-range": "bytes 2-4/10"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request"
    assert http.get("/resources/obj").content == b"0123456789"
    # A new path either: nothing is created from a fragment.
    r = http.put("/resources/new", content=b"XYZ", headers={"content-range": "bytes 0-2/10"})
    assert r.status_code == 400
    assert http.get("/resources/new").status_code == 404


def test_if_unmodified_since_guards_put_and_delete(http: httpx.Client) -> None:
    assert http.put("/resources/obj", content=b"first").status_code == 201
    old = {"if-unmodified-since": formatdate(time.time() - 3600, usegmt=True)}
    later = {"if-unmodified-since": formatdate(time.time() + 3600, usegmt=True)}
    r = http.put("/resources/obj", content=b"second", headers=old)
    assert r.status_code == 412, r.text
    assert r.json()["error"]["code"] == "precondition_failed"
    assert http.delete("/resources/obj", headers=old).status_code == 412
    assert http.get("/resources/obj").content == b"first"
    assert http.put("/resources/obj", content=b"second", headers=later).status_code == 201
    assert http.get("/resources/obj").content == b"second"
    # No date on a path that does not exist: the header is ignored (RFC 9110 13.1.4).
    assert http.put("/resources/absent", content=b"x", headers=old).status_code == 201
    # With If-Match the date is not looked at (13.2.2).
    tag = http.head("/resources/obj").headers["etag"]
    both = {**old, "if-match": tag}
    assert http.put("/resources/obj", content=b"third", headers=both).status_code == 201
    assert http.delete("/resources/obj", headers=later).status_code == 204


def test_a_malformed_proof_checksum_is_400_and_keeps_the_request(
    http: httpx.Client, managed: ManagedStorage
) -> None:
    created = http.put("/resources/original", content=b"known content " * 100)
    digest = created.json()["hash"]
    asked = http.post("/put-requests", json={"path": "copy", "hash": digest})
    assert asked.status_code == 201, asked.text
    request_id = asked.json()["request_id"]
    for bad in ("xyz", None):
        r = http.post(f"/put-requests/{request_id}/response", json={"checksum": bad})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text
    wrong = "0" * 64
    r = http.post(f"/put-requests/{request_id}/response", json={"checksum": wrong})
    assert r.status_code == 403 and r.json()["error"]["code"] == "response_mismatch"


def _start_put(url: str, path: str, total: int, first: bytes) -> socket.socket:
    """A PUT of `total` bytes whose client has sent only `first` of them so far."""
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"PUT /v1/environments/{ENV}/resources/{path} HTTP/1.1\r\nHost: x\r\n"
    sock.sendall(f"{head}Content-Length: {total}\r\n\r\n".encode() + first)
    return sock


def test_a_small_upload_still_arriving_is_pending_and_blocks_create_only(
    managed: ManagedStorage,
) -> None:
    """Was: a body of up to 4 MiB was received before the core saw it, so while a slow
    client sent it the path had no history and a create-only PUT got 201 beside it."""
    with (
        ServerThread(create_app(managed, auth=False)) as server,
        httpx.Client(base_url=f"{server.url}/v1/environments/{ENV}", timeout=30) as http,
    ):
        total = 300_000
        slow = _start_put(server.url, "slow", total, b"A" * 100_000)
        try:
            time.sleep(0.5)  # the client is still sending
            items = http.get("/history/slow").json()["items"]
            assert [i["state"] for i in items] == ["pending"], items
            r = http.put("/resources/slow", content=b"x", headers={"if-none-match": "*"})
            assert r.status_code == 412, r.text
            slow.sendall(b"B" * (total - 100_000))
            answer = slow.recv(65536).decode()
            assert answer.startswith("HTTP/1.1 201"), answer
        finally:
            slow.close()
        assert http.get("/resources/slow").content == b"A" * 100_000 + b"B" * 200_000
        states = [i["state"] for i in http.get("/history/slow").json()["items"]]
        assert "pending" not in states, states
        # A client that gives up halfway leaves a failed upload, not a pending one.
        gone = _start_put(server.url, "gone", total, b"A" * 1000)
        time.sleep(0.5)
        gone.close()
        deadline = time.monotonic() + 10
        while True:
            states = [i["state"] for i in http.get("/history/gone").json()["items"]]
            if states == ["failed"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert states == ["failed"], states
        assert http.get("/resources/gone").status_code == 404


def test_a_put_in_a_content_coding_is_415(http: httpx.Client) -> None:
    """Was: gzip bytes stored as the content and served back without the coding."""
    gz = gzip.compress(b"hello")
    r = http.put("/resources/z", content=gz, headers={"content-encoding": "gzip"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_encoding"
    assert r.headers["accept-encoding"] == "identity"
    assert http.get("/resources/z").status_code == 404
    ok = http.put("/resources/z", content=b"hello", headers={"content-encoding": "identity"})
    assert ok.status_code == 201
