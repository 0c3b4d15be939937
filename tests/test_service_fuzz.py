"""Seeded random requests over raw sockets: the service never answers 5xx to a client.

Raw sockets, so no client library normalizes the request line first (`..`,
`%2e`, `%00`, bad UTF-8 and odd headers all reach the server as sent).
"""

from __future__ import annotations

import io
import random
import socket
from collections.abc import Iterator

import pytest

from catalog import ManagedStorage
from service.app import create_app
from tests.test_service_support import ServerThread

PIECES = [
    "a", "b/c", "..", ".", "%2e%2e", "%2E.", "%00", "%0a", "%ff", "%c3%28", "%2f", "//", "~",
    "%25", "é", "%e2%80%8b", "x" * 300, "%7f", "?", "#", ";", "%20", "+", "*", "%5c", "\\",
]  # fmt: skip
METHODS = ["GET", "HEAD", "PUT", "DELETE", "POST", "PATCH", "OPTIONS", "BREW"]
HEADERS = [
    ("Range", ["bytes=0-1", "bytes=-5", "bytes=5-", "bytes=9-1", "bytes=x", "items=0-1",
               "bytes=0-1,3-4", "bytes=99999999999999999999-", ""]),
    ("If-None-Match", ['"blake3:00"', "*", "W/x", ""]),
    ("If-Match", ['"nope"', "*"]),
    ("X-Content-Hash", ["blake3:" + "0" * 64, "md5:1", "", "blake3:" + "g" * 64]),
    ("Authorization", ["Bearer x", "Basic abc", "Bearer"]),
]  # fmt: skip
BODIES = [b"", b"{}", b'{"path": "p", "hash": 5}', b"[1,2]", b"\xff\xfe", b'{"checksum": "x"}',
          b'{"path": "a/../b", "hash": "blake3:' + b"0" * 64 + b'"}']  # fmt: skip


@pytest.fixture
def server(managed: ManagedStorage) -> Iterator[ServerThread]:
    managed.put_for_environment("env", "a", io.BytesIO(b"0123456789"))
    with ServerThread(create_app(managed, auth=False, max_size=1 << 20)) as srv:
        yield srv


def status_of(port: int, raw: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        head = b""
        while b"\r\n" not in head:
            more = sock.recv(4096)
            if not more:
                return 0  # closed without an answer (rejected at the protocol level)
            head += more
    return int(head.split(b" ", 2)[1])


def test_random_requests_never_get_5xx(server: ServerThread) -> None:
    rng = random.Random(20261122)
    seen: dict[int, int] = {}
    for _ in range(400):
        env = rng.choice(["env", "other", *rng.sample(PIECES, 1)])
        tail = "/".join(rng.choice(PIECES) for _ in range(rng.randint(0, 3)))
        route = rng.choice(
            [
                f"/v1/environments/{env}/resources/{tail}",
                f"/v1/environments/{env}/resources?prefix={tail}",
                f"/v1/environments/{env}/put-requests",
                f"/v1/environments/{env}/put-requests/{tail}/response",
                f"/v1/{tail}",
                f"/{tail}",
            ]
        )
        method = rng.choice(METHODS)
        body = rng.choice(BODIES)
        lines = [f"{method} {route} HTTP/1.1", "Host: x", "Connection: close"]
        for name, values in rng.sample(HEADERS, rng.randint(0, 3)):
            lines.append(f"{name}: {rng.choice(values)}")
        lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
        status = status_of(server.port, raw)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, f"{status} for {raw!r}"
    assert seen.get(400, 0) > 50 and seen.get(200, 0) + seen.get(201, 0) + seen.get(206, 0) > 5
