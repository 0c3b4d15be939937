"""The HTTP API, route by route and status by status, over real HTTP on loopback."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import blake3
import httpx
import pytest

from catalog import ManagedStorage
from catalog.proof import ranges_checksum
from catalog.tokens import TokenStore
from service.app import create_app
from tests.test_service_support import ServerThread, wait_until

OBJ = "/v1/environments/{env}/resources/{path}"


def h(data: bytes) -> str:
    return str(blake3.blake3(data).hexdigest())


@pytest.fixture
def server(managed: ManagedStorage) -> Iterator[ServerThread]:
    with ServerThread(create_app(managed, auth=False, max_size=8 * 1024 * 1024)) as srv:
        yield srv


@pytest.fixture
def http(server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def url(env: str, path: str) -> str:
    return OBJ.format(env=env, path=path)


def put(http: httpx.Client, env: str, path: str, data: bytes, **headers: str) -> httpx.Response:
    return http.put(url(env, path), content=data, headers=headers)


def error_code(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return str(response.json()["error"]["code"])


def gridfs_files(managed: ManagedStorage) -> int:
    """Physical copies: GridFS files plus small contents kept inline in their entry."""
    inline = managed.db["catalog"].count_documents({"path": "inline:"})
    return int(managed.db["resources.files"].count_documents({})) + inline


def gridfs_chunks(managed: ManagedStorage) -> int:
    return int(managed.db["resources.chunks"].count_documents({}))


# -- service routes -----------------------------------------------------------------
def test_healthz_metrics_openapi(http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200
    assert http.head("/healthz").status_code == 200
    spec = http.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    for route in (
        "/v1/environments/{env}/resources/{path}",
        "/v1/environments/{env}/resources",
        "/v1/environments/{env}/put-requests",
        "/v1/environments/{env}/put-requests/{request_id}/response",
    ):
        assert route in spec["paths"]
    put(http, "e", "m", b"abc")
    text = http.get("/metrics").text
    assert "rescat_http_requests_total" in text
    assert 'route="/v1/environments/{env}/resources/{path}"' in text
    assert "rescat_http_received_bytes_total" in text
    assert "rescat_dedup_hits_total" in text
    assert "rescat_proof_failures_total" in text


def test_unknown_routes_and_methods(http: httpx.Client) -> None:
    for path in ("/", "/nope", "/v1", "/v1/environments", "/v1/other/e", "/v2/environments/e"):
        r = http.get(path)
        assert r.status_code == 404 and error_code(r) == "not_found", path
    r = http.get("/v1/environments/e/unknown")
    assert r.status_code == 404 and error_code(r) == "not_found"
    r = http.post(url("e", "a"), content=b"x")
    assert r.status_code == 405 and "PUT" in r.headers["allow"]
    assert http.get("/v1/environments/e/put-requests").status_code == 405


# -- PUT / GET / HEAD / DELETE -------------------------------------------------------
def test_put_get_head_delete(http: httpx.Client, managed: ManagedStorage) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    r = put(http, "env-1", "dir/file.bin", data)
    assert r.status_code == 201
    assert r.json() == {"path": "dir/file.bin", "hash": h(data), "length": len(data)}
    assert r.headers["etag"] == f'"blake3:{h(data)}"'

    r = http.get(url("env-1", "dir/file.bin"))
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["etag"] == f'"blake3:{h(data)}"'
    assert r.headers["accept-ranges"] == "bytes"

    r = http.head(url("env-1", "dir/file.bin"))
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["etag"] == f'"blake3:{h(data)}"'

    # Replacing a path is a 201 too and releases the old content.
    r = put(http, "env-1", "dir/file.bin", b"new")
    assert r.status_code == 201 and r.json()["length"] == 3
    assert http.get(url("env-1", "dir/file.bin")).content == b"new"
    assert gridfs_files(managed) == 1

    assert http.delete(url("env-1", "dir/file.bin")).status_code == 204
    r = http.get(url("env-1", "dir/file.bin"))
    assert r.status_code == 404 and error_code(r) == "not_found"
    assert http.head(url("env-1", "dir/file.bin")).status_code == 404
    r = http.delete(url("env-1", "dir/file.bin"))
    assert r.status_code == 404 and error_code(r) == "not_found"
    assert gridfs_files(managed) == 0


def test_put_chunked_and_unicode_path(http: httpx.Client) -> None:
    data = os.urandom(2_500_000)

    def body() -> Iterator[bytes]:
        for i in range(0, len(data), 100_000):
            yield data[i : i + 100_000]

    path = "ünï cödé/with space/%41?#.bin"
    r = http.put(url("e", quote(path, safe="/")), content=body())
    assert r.status_code == 201, r.text
    assert r.json() == {"path": path, "hash": h(data), "length": len(data)}
    r = http.get(url("e", quote(path, safe="/")))
    assert r.content == data
    items = http.get("/v1/environments/e/resources").json()["items"]
    assert items == [{"path": path, "hash": h(data), "length": len(data)}]


def test_ranges(http: httpx.Client) -> None:
    data = os.urandom(2 * 1024 * 1024 + 5)
    size = len(data)
    put(http, "e", "r", data)
    cases = {
        "bytes=0-0": (0, 0),
        "bytes=10-19": (10, 19),
        "bytes=1048570-1048600": (1048570, 1048600),
        f"bytes={size - 7}-": (size - 7, size - 1),
        "bytes=-5": (size - 5, size - 1),
        f"bytes=-{size * 2}": (0, size - 1),
        f"bytes=100-{size * 3}": (100, size - 1),
    }
    for header, (first, last) in cases.items():
        r = http.get(url("e", "r"), headers={"Range": header})
        assert r.status_code == 206, header
        assert r.content == data[first : last + 1], header
        assert r.headers["content-range"] == f"bytes {first}-{last}/{size}"
        assert r.headers["content-length"] == str(last - first + 1)
        assert r.headers["etag"] == f'"blake3:{h(data)}"'
    head = http.head(url("e", "r"), headers={"Range": "bytes=10-19"})
    assert head.status_code == 206 and head.headers["content-length"] == "10"
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        r = http.get(url("e", "r"), headers={"Range": header})
        assert r.status_code == 416, header
        assert r.headers["content-range"] == f"bytes */{size}"
        assert error_code(r) == "range_not_satisfiable"
    # Malformed or multi-range headers are ignored: the whole content.
    huge = "bytes=" + "9" * 30 + "-"
    for header in ("bytes=5-1", "items=0-1", "bytes=0-1,5-6", "garbage", huge):
        r = http.get(url("e", "r"), headers={"Range": header})
        assert r.status_code in (200, 416), header
        if r.status_code == 200:
            assert r.content == data
    # If-Range with the current ETag honours the range; a stale one gets everything.
    etag = f'"blake3:{h(data)}"'
    r = http.get(url("e", "r"), headers={"Range": "bytes=0-3", "If-Range": etag})
    assert r.status_code == 206 and r.content == data[:4]
    stale = f'"blake3:{"0" * 64}"'
    r = http.get(url("e", "r"), headers={"Range": "bytes=0-3", "If-Range": stale})
    assert r.status_code == 200 and r.content == data


def test_conditional_requests(http: httpx.Client) -> None:
    put(http, "e", "c", b"content")
    etag = f'"blake3:{h(b"content")}"'
    other = f'"blake3:{"1" * 64}"'
    r = http.get(url("e", "c"), headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert http.get(url("e", "c"), headers={"If-None-Match": f"{other}, {etag}"}).status_code == 304
    assert http.get(url("e", "c"), headers={"If-None-Match": "*"}).status_code == 304
    assert http.head(url("e", "c"), headers={"If-None-Match": etag}).status_code == 304
    assert http.get(url("e", "c"), headers={"If-None-Match": other}).status_code == 200
    r = http.get(url("e", "c"), headers={"If-Match": other})
    assert r.status_code == 412 and error_code(r) == "precondition_failed"
    assert http.get(url("e", "c"), headers={"If-Match": etag}).status_code == 200
    # Conditional writes.
    r = put(http, "e", "c", b"x", **{"If-None-Match": "*"})
    assert r.status_code == 412 and error_code(r) == "precondition_failed"
    assert put(http, "e", "new", b"x", **{"If-None-Match": "*"}).status_code == 201
    assert put(http, "e", "c", b"y", **{"If-Match": other}).status_code == 412
    assert put(http, "e", "c", b"y", **{"If-Match": etag}).status_code == 201
    assert http.delete(url("e", "c"), headers={"If-Match": etag}).status_code == 412
    assert http.get(url("e", "c")).content == b"y"


def test_a_get_takes_every_tag_a_write_takes_in_if_none_match(http: httpx.Client) -> None:
    """A revision tag or an unquoted `blake3:<hex>` in If-None-Match was ignored by GET
    (200), though If-Match on GET and If-None-Match on PUT take them."""
    r = put(http, "e", "tags", b"tagged")
    rev, digest = r.headers["x-revision"], h(b"tagged")
    for tag in (f'"{rev}"', rev, f"blake3:{digest}", f'W/"{rev}"', f'"blake3:{digest}"'):
        got = http.get(url("e", "tags"), headers={"If-None-Match": tag})
        assert got.status_code == 304, tag
        assert put(http, "e", "tags", b"tagged", **{"If-None-Match": tag}).status_code == 412
        rev = http.head(url("e", "tags")).headers["x-revision"]  # the refused put changed none
    stale = f'"{int(rev) - 1}", "blake3:{"1" * 64}"'
    assert http.get(url("e", "tags"), headers={"If-None-Match": stale}).status_code == 200


def test_empty_content(http: httpx.Client) -> None:
    r = put(http, "e", "empty", b"")
    assert r.status_code == 201 and r.json() == {"path": "empty", "hash": h(b""), "length": 0}
    r = http.get(url("e", "empty"))
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "0"
    assert http.get(url("e", "empty"), headers={"Range": "bytes=0-"}).status_code == 416
    r = http.post("/v1/environments/e/put-requests", json={"path": "e2", "hash": h(b"")})
    assert r.status_code == 201 and r.json()["ranges"] == []
    rid = r.json()["request_id"]
    answer = {"checksum": h(b"")}
    r = http.post(f"/v1/environments/e/put-requests/{rid}/response", json=answer)
    assert r.status_code == 201 and r.json() == {"path": "e2", "hash": h(b""), "length": 0}


def test_list(http: httpx.Client) -> None:
    for path in ("b/2", "a/1", "b/1", "ab", "c"):
        put(http, "e", path, path.encode())
    put(http, "other", "a/9", b"x")
    r = http.get("/v1/environments/e/resources")
    assert r.status_code == 200
    assert [i["path"] for i in r.json()["items"]] == ["a/1", "ab", "b/1", "b/2", "c"]
    assert r.json()["items"][0] == {"path": "a/1", "hash": h(b"a/1"), "length": 3}
    r = http.get("/v1/environments/e/resources", params={"prefix": "a"})
    assert [i["path"] for i in r.json()["items"]] == ["a/1", "ab"]
    r = http.get("/v1/environments/e/resources", params={"prefix": "b/"})
    assert [i["path"] for i in r.json()["items"]] == ["b/1", "b/2"]
    r = http.get("/v1/environments/e/resources", params={"prefix": ".*"})
    assert r.json()["items"] == []
    assert http.get("/v1/environments/nobody/resources").json() == {"items": []}
    assert http.head("/v1/environments/e/resources").status_code == 200


# -- hashes and sizes ------------------------------------------------------------------
def test_put_with_content_hash(http: httpx.Client, managed: ManagedStorage) -> None:
    data = os.urandom(1_500_000)
    r = put(http, "e", "ok", data, **{"X-Content-Hash": f"blake3:{h(data)}"})
    assert r.status_code == 201 and r.json()["hash"] == h(data)
    # Known content with its right hash: stored once, path added.
    r = put(http, "e", "ok2", data, **{"X-Content-Hash": h(data).upper()})
    assert r.status_code == 201
    assert gridfs_files(managed) == 1

    wrong = h(b"something else")
    for body in (data, os.urandom(2_000_000), b"tiny"):
        r = put(http, "e", "bad", body, **{"X-Content-Hash": f"blake3:{wrong}"})
        assert r.status_code == 422 and error_code(r) == "hash_mismatch"
    # Mismatch against known content of another length.
    r = put(http, "e", "bad", b"short", **{"X-Content-Hash": f"blake3:{h(data)}"})
    assert r.status_code == 422 and error_code(r) == "hash_mismatch"
    assert http.get(url("e", "bad")).status_code == 404
    assert gridfs_files(managed) == 1
    assert managed.db["catalog"].count_documents({}) == 1
    assert wait_until(lambda: gridfs_chunks(managed) == 2)

    for header in ("nothex", "blake3:abc", "sha256:" + "0" * 64, ""):
        r = put(http, "e", "bad", b"x", **{"X-Content-Hash": header})
        assert r.status_code == 400 and error_code(r) == "bad_request", header


def test_max_size(http: httpx.Client, managed: ManagedStorage) -> None:
    limit = 8 * 1024 * 1024
    r = put(http, "e", "big", b"\0" * (limit + 1))
    assert r.status_code == 413 and error_code(r) == "too_large"
    assert put(http, "e", "fits", os.urandom(limit)).status_code == 201

    def body() -> Iterator[bytes]:
        chunk = os.urandom(1024 * 1024)
        for _ in range(9):
            yield chunk

    r = http.put(url("e", "big-chunked"), content=body())
    assert r.status_code == 413 and error_code(r) == "too_large"
    assert http.get(url("e", "big-chunked")).status_code == 404
    assert gridfs_files(managed) == 1
    assert wait_until(lambda: gridfs_chunks(managed) == 8)


def raw_status(http: httpx.Client, method: str, target: str) -> int:
    """Send a request line as is, without any client-side URL normalisation."""
    with socket.create_connection(("127.0.0.1", http.base_url.port or 80), timeout=10) as sock:
        sock.sendall(
            f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        head = sock.recv(4096)
    return int(head.split(b" ", 2)[1])


# -- invalid input -------------------------------------------------------------------------
BAD_PATHS = [
    "a/%2e%2e/b",
    "%2E%2E",
    "a/%2e",
    "a%00b",
    "%00",
    "a%0Ab",
    "a%7Fb",
    "a%C2%85b",
    "a//b",
    "a/",
    "",
    "%2Fa",
    "a%2F%2Fb",
    "%ff%fe",
    "%ED%A0%80",
    "x" * 1025,
    "%C3%A9" * 513,
]
BAD_ENVS = ["%2e%2e", "%2E", "a%2Fb", "a%00", "x" * 129, "a%20b", "%C3%A9", "a*b", ""]


def test_invalid_paths_get_400(http: httpx.Client) -> None:
    for bad in BAD_PATHS:
        target = "/v1/environments/e/resources/" + bad
        for method in ("GET", "HEAD", "PUT", "DELETE"):
            r = http.request(method, target, content=b"x" if method == "PUT" else None)
            assert r.status_code == 400, (method, bad, r.status_code)
            assert r.headers["x-rescat-error"] == "invalid_path"
            if method != "HEAD":
                assert error_code(r) == "invalid_path", (method, bad)
    for bad in BAD_ENVS:
        for target in (
            f"/v1/environments/{bad}/resources/a",
            f"/v1/environments/{bad}/resources",
            f"/v1/environments/{bad}/put-requests",
            f"/v1/environments/{bad}/put-requests/x/response",
            f"/v1/environments/{bad}/anything",
        ):
            r = http.get(target)
            assert r.status_code == 400 and error_code(r) == "invalid_path", target
    # Literal dot segments, sent raw (httpx would normalise them away).
    for raw in ("a/../b", "..", ".", "a/./b", "a/.", "../e2/resources/x"):
        target = f"/v1/environments/e/resources/{raw}"
        assert raw_status(http, "GET", target) == 400, raw
        assert raw_status(http, "PUT", target) == 400, raw
    assert raw_status(http, "GET", "/v1/environments/../resources/x") == 400
    assert raw_status(http, "GET", "/v1/environments/./resources") == 400
    r = http.get("/v1/environments/e/resources", params={"prefix": "a\x00"})
    assert r.status_code == 400 and error_code(r) == "invalid_path"
    r = http.get("/v1/environments/e/resources?prefix=%ff")
    assert r.status_code == 400 and error_code(r) == "invalid_path"


def test_bad_json_and_fields(http: httpx.Client) -> None:
    put(http, "e", "src", b"data")
    target = "/v1/environments/e/put-requests"
    cases: list[tuple[Any, str]] = [
        (b"{not json", "bad_request"),
        (b"[1, 2]", "bad_request"),
        (b"\xff\xfe", "bad_request"),
        (b"", "bad_request"),
        (json.dumps({"path": "p"}).encode(), "bad_request"),
        (json.dumps({"path": "p", "hash": 5}).encode(), "bad_request"),
        (json.dumps({"path": "p", "hash": "zz"}).encode(), "bad_request"),
        (json.dumps({"path": 7, "hash": h(b"data")}).encode(), "bad_request"),
        (json.dumps({"path": "../x", "hash": h(b"data")}).encode(), "invalid_path"),
        (json.dumps({"path": "a\u0000", "hash": h(b"data")}).encode(), "invalid_path"),
        (json.dumps({"path": "a\ud800", "hash": h(b"data")}).encode(), "invalid_path"),
    ]
    for body, code in cases:
        r = http.post(target, content=body)
        assert r.status_code == 400 and error_code(r) == code, (body, r.text)
    r = http.post(target, content=b"{" + b" " * 70000 + b"}")
    assert r.status_code == 413
    r = http.post("/v1/environments/e/put-requests/abc/response", content=b"nope")
    assert r.status_code == 400 and error_code(r) == "bad_request"
    r = http.post("/v1/environments/e/put-requests/abc/response", json={"checksum": 1})
    assert r.status_code == 400 and error_code(r) == "bad_request"


def test_never_5xx_for_odd_input(http: httpx.Client) -> None:
    put(http, "e", "x", b"data")
    odd_headers: list[dict[str, Any]] = [
        {"Range": "bytes=" + "9" * 5000 + "-"},
        {"Range": "bytes=-" + "9" * 5000},
        {"If-None-Match": '"' * 300},
        {"If-Match": ","},
        {"If-Range": "Wed, 21 Oct 2015 07:28:00 GMT", "Range": "bytes=0-1"},
        {"Authorization": b"Bearer \xe9\xff"},
        {"X-Content-Hash": b"\xff"},
        {"X-Content-Hash": "blake3:" + "g" * 64},
        {"Content-Type": "text/plain; charset=nonsense"},
    ]
    for headers in odd_headers:
        for method in ("GET", "HEAD", "PUT", "DELETE"):
            r = http.request(method, url("e", "x"), headers=headers)
            assert r.status_code < 500, (method, headers, r.status_code)
            if method in ("PUT", "DELETE") and r.status_code < 300:
                put(http, "e", "x", b"data")
    for target in ("/v1/environments/e/put-requests/%ff/response", "/v1//", "//", "/%00"):
        assert http.post(target, json={"checksum": "0" * 64}).status_code < 500, target


# -- proof of access ---------------------------------------------------------------------
def _request(http: httpx.Client, env: str, path: str, digest: str) -> httpx.Response:
    return http.post(f"/v1/environments/{env}/put-requests", json={"path": path, "hash": digest})


def _answer(http: httpx.Client, env: str, rid: str, checksum: str) -> httpx.Response:
    return http.post(
        f"/v1/environments/{env}/put-requests/{rid}/response", json={"checksum": checksum}
    )


def _checksum(data: bytes, ranges: list[list[int]]) -> str:
    import io

    return ranges_checksum(io.BytesIO(data), [(s, n) for s, n in ranges])


def test_put_request_and_response(http: httpx.Client, managed: ManagedStorage) -> None:
    data = os.urandom(1_000_000)
    put(http, "e", "orig", data)
    r = _request(http, "e", "copy", f"blake3:{h(data)}")
    assert r.status_code == 201
    doc = r.json()
    assert set(doc) == {"request_id", "ranges", "expires_at"}
    assert len(doc["ranges"]) >= 2 and all(len(pair) == 2 for pair in doc["ranges"])
    assert doc["expires_at"].endswith("Z")
    expires = datetime.datetime.fromisoformat(doc["expires_at"].replace("Z", "+00:00"))
    assert expires > datetime.datetime.now(datetime.timezone.utc)
    r = _answer(http, "e", doc["request_id"], _checksum(data, doc["ranges"]))
    assert r.status_code == 201
    assert r.json() == {"path": "copy", "hash": h(data), "length": len(data)}
    assert http.get(url("e", "copy")).content == data
    # Single use.
    r = _answer(http, "e", doc["request_id"], _checksum(data, doc["ranges"]))
    assert r.status_code == 410 and error_code(r) == "request_expired"
    assert gridfs_files(managed) == 1
    res = managed.catalog.get(managed.catalog.find(h(data)))
    assert res.refcount == 2
    text = http.get("/metrics").text
    assert "rescat_dedup_hits_total 1.0" in text


def test_put_request_errors(http: httpx.Client, managed: ManagedStorage) -> None:
    data = os.urandom(100_000)
    r = _request(http, "e", "p", h(data))
    assert r.status_code == 404 and error_code(r) == "not_found"
    put(http, "e", "orig", data)

    # A wrong answer creates nothing and consumes the request.
    doc = _request(http, "e", "p", h(data)).json()
    r = _answer(http, "e", doc["request_id"], "0" * 64)
    assert r.status_code == 403 and error_code(r) == "response_mismatch"
    assert http.get(url("e", "p")).status_code == 404
    r = _answer(http, "e", doc["request_id"], _checksum(data, doc["ranges"]))
    assert r.status_code == 410 and error_code(r) == "request_expired"
    r = _answer(http, "e", doc["request_id"] + "x", "0" * 64)
    assert r.status_code == 410
    for rid in ("%ff%fe", "a%00b", "x" * 300):
        r = _answer(http, "e", rid, "0" * 64)
        assert r.status_code == 410 and error_code(r) == "request_expired", rid
    doc = _request(http, "e", "p", h(data)).json()
    r = _answer(http, "e", doc["request_id"], "not a checksum")  # a malformed hash: 400
    assert r.status_code == 400 and error_code(r) == "bad_request"
    r = _answer(http, "e", doc["request_id"], "0" * 64)  # a wrong one: the request is used up
    assert r.status_code == 403 and error_code(r) == "response_mismatch"

    # Answered through another environment.
    doc = _request(http, "e", "p", h(data)).json()
    r = _answer(http, "other", doc["request_id"], _checksum(data, doc["ranges"]))
    assert r.status_code == 410 and error_code(r) == "request_expired"
    assert http.get(url("other", "p")).status_code == 404
    assert http.get(url("e", "p")).status_code == 404

    # Content deleted since the request.
    doc = _request(http, "e", "p", h(data)).json()
    assert http.delete(url("e", "orig")).status_code == 204
    r = _answer(http, "e", doc["request_id"], _checksum(data, doc["ranges"]))
    assert r.status_code == 410 and error_code(r) == "resource_deleted"
    assert http.get(url("e", "p")).status_code == 404
    assert managed.db["catalog"].count_documents({}) == 0

    # Content being uploaded.
    pending = os.urandom(10_000)
    managed.catalog.put(h(pending), len(pending))
    r = _request(http, "e", "p", h(pending))
    assert r.status_code == 409 and error_code(r) == "upload_pending"
    text = http.get("/metrics").text
    assert 'rescat_proof_failures_total{reason="response_mismatch"} 2.0' in text


def test_put_request_expiry(db: Any, gridfs_storage: Any) -> None:
    managed = ManagedStorage(db, gridfs_storage, request_expiry=0.3)
    with ServerThread(create_app(managed, auth=False)) as srv, httpx.Client(base_url=srv.url) as c:
        put(c, "e", "orig", b"abc")
        doc = _request(c, "e", "p", h(b"abc")).json()
        time.sleep(0.5)
        r = _answer(c, "e", doc["request_id"], _checksum(b"abc", doc["ranges"]))
        assert r.status_code == 410 and error_code(r) == "request_expired"


# -- auth ------------------------------------------------------------------------------------
@pytest.fixture
def auth_server(managed: ManagedStorage) -> Iterator[ServerThread]:
    with ServerThread(create_app(managed, auth=True)) as srv:
        yield srv


def test_auth(auth_server: ServerThread, managed: ManagedStorage) -> None:
    store = TokenStore(managed.db)
    token_a, info_a = store.create(env="team-a")
    token_b, _ = store.create(env="team-b")
    admin, _ = store.create(admin=True)
    assert managed.db["tokens"].count_documents({"digest": {"$exists": True}}) == 3
    assert managed.db["tokens"].find_one({"digest": token_a}) is None  # stored hashed

    def client(token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=auth_server.url, headers=headers)

    with client(None) as anon, client(token_a) as a, client(token_b) as b, client(admin) as adm:
        assert anon.get("/healthz").status_code == 200
        assert anon.get("/metrics").status_code == 200
        assert anon.get("/openapi.json").status_code == 200
        for method, target in (
            ("GET", url("team-a", "x")),
            ("PUT", url("team-a", "x")),
            ("DELETE", url("team-a", "x")),
            ("GET", "/v1/environments/team-a/resources"),
            ("POST", "/v1/environments/team-a/put-requests"),
            ("POST", "/v1/environments/team-a/put-requests/abc/response"),
            ("GET", "/v1/nothing"),
        ):
            r = anon.request(method, target)
            assert r.status_code == 401 and error_code(r) == "unauthorized", target
            assert r.headers["www-authenticate"].startswith("Bearer")
        bad = httpx.Client(base_url=auth_server.url, headers={"Authorization": "Bearer nope"})
        assert bad.get(url("team-a", "x")).status_code == 401
        bad.close()
        basic = httpx.Client(base_url=auth_server.url, headers={"Authorization": "Basic eDp5"})
        assert basic.get(url("team-a", "x")).status_code == 401
        basic.close()

        assert put(a, "team-a", "x", b"a-data").status_code == 201
        assert put(b, "team-b", "x", b"b-data").status_code == 201
        for target in (url("team-b", "x"), "/v1/environments/team-b/resources"):
            r = a.get(target)
            assert r.status_code == 403 and error_code(r) == "forbidden"
        r = put(a, "team-b", "y", b"z")
        assert r.status_code == 403
        r = _request(a, "team-b", "y", h(b"b-data"))
        assert r.status_code == 403 and error_code(r) == "forbidden"
        assert a.get(url("team-a", "x")).content == b"a-data"
        assert adm.get(url("team-b", "x")).content == b"b-data"
        assert put(adm, "team-c", "z", b"c").status_code == 201

        # A request made in team-a cannot be answered by team-b's token for team-b.
        doc = _request(a, "team-a", "copy", h(b"b-data")).json()
        r = _answer(b, "team-b", doc["request_id"], _checksum(b"b-data", doc["ranges"]))
        assert r.status_code == 410
        r = _answer(b, "team-a", "whatever", "0" * 64)
        assert r.status_code == 403

        # Revocation takes effect at once.
        store.revoke(info_a.id)
        r = a.get(url("team-a", "x"))
        assert r.status_code == 401 and error_code(r) == "unauthorized"
        new_a, _ = store.create(env="team-a")
        with client(new_a) as a2:
            assert a2.get(url("team-a", "x")).status_code == 200


# -- disconnects and logs ---------------------------------------------------------------------
@pytest.mark.parametrize("with_hash", [False, True])
def test_client_disconnect_mid_upload_leaves_nothing(
    managed: ManagedStorage, with_hash: bool
) -> None:
    total = 32 * 1024 * 1024
    extra = f"X-Content-Hash: blake3:{h(b'declared')}\r\n" if with_hash else ""
    with ServerThread(create_app(managed, auth=False)) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"PUT /v1/environments/e/resources/partial HTTP/1.1\r\nHost: x\r\n"
                + f"Content-Length: {total}\r\n{extra}\r\n".encode()
            )
            sock.sendall(os.urandom(20 * 1024 * 1024))
            # Let the server write some batches of what it got, then vanish.
            assert wait_until(lambda: gridfs_chunks(managed) > 0, timeout=10)
        assert wait_until(lambda: gridfs_chunks(managed) == 0, timeout=15)
        assert gridfs_files(managed) == 0
        assert managed.db["paths"].count_documents({}) == 0
        assert wait_until(lambda: managed.db["catalog"].count_documents({}) == 0)
        with httpx.Client(base_url=server.url) as c:
            assert c.get(url("e", "partial")).status_code == 404
            assert put(c, "e", "after", b"ok").status_code == 201  # still serving


def test_one_structured_log_line_per_request(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rescat.access")
    put(http, "e", "logged", b"12345")
    http.get(url("e", "logged"), headers={"X-Request-Id": "req-42"})
    http.get(url("e", "missing"))
    assert wait_until(
        lambda: len([r for r in caplog.records if r.name == "rescat.access"]) >= 3, timeout=5
    )
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "rescat.access"]
    assert [line["status"] for line in lines] == [201, 200, 404]
    assert lines[0]["bytes_in"] == 5 and lines[0]["method"] == "PUT"
    assert lines[1]["bytes_out"] == 5 and lines[1]["request_id"] == "req-42"
    assert lines[1]["route"] == "/v1/environments/{env}/resources/{path}"
    assert all("duration_ms" in line for line in lines)


def test_proof_budget_answers_429_with_retry_after(http: httpx.Client) -> None:
    data = os.urandom(50_000)
    assert put(http, "owner", "orig", data).status_code == 201
    body = {"path": "copy", "hash": h(data)}
    for _ in range(10):  # the daily budget; unanswered challenges count
        assert http.post("/v1/environments/thief/put-requests", json=body).status_code == 201
    r = http.post("/v1/environments/thief/put-requests", json=body)
    assert r.status_code == 429 and error_code(r) == "too_many_requests"
    assert int(r.headers["retry-after"]) > 0


def test_malformed_entity_tags_are_400(http: httpx.Client, managed: ManagedStorage) -> None:
    """RFC 9110 §8.8.3: an entity tag is quoted; a typo must not become a condition
    that never matches (an unconditional write) or always fails."""
    assert put(http, "e", "t", b"v").status_code == 201
    for method, header in [
        ("PUT", "If-None-Match"),
        ("PUT", "If-Match"),
        ("GET", "If-None-Match"),
        ("GET", "If-Match"),
        ("DELETE", "If-Match"),
    ]:
        for value in ("garbage", "W/garbage", '"a', 'x"y"'):
            r = http.request(method, url("e", "t"), content=b"w", headers={header: value})
            assert r.status_code == 400 and error_code(r) == "bad_request", (method, header, value)
    reader, _ = managed.get_for_environment("e", "t")
    with reader:
        assert reader.read() == b"v"  # nothing was written or deleted
    # well-formed tags that name nothing are fine: they just do not match
    assert put(http, "e", "t", b"w", **{"If-None-Match": '"other"'}).status_code == 201
    assert http.get(url("e", "t"), headers={"If-None-Match": 'W/"other"'}).status_code == 200


def test_a_path_written_with_no_type_is_served_by_its_name(
    http: httpx.Client, managed: ManagedStorage
) -> None:
    """Only an HTTP PUT guessed a type from the name: the same file written by the CLI,
    the KV store or a deduplicated upload was served as application/octet-stream."""
    for path, expected in (("ct/db.txt", "text/plain"), ("ct/d.json", "application/json"),
                           ("ct/blob", "application/octet-stream")):  # fmt: skip
        managed.put_for_environment("e", path, io.BytesIO(b"{}"), 2)  # no type stored
        assert http.head(url("e", path)).headers["content-type"] == expected, path
    put(http, "e", "ct/db.txt", b"<p>", **{"content-type": "text/html"})
    assert http.head(url("e", "ct/db.txt")).headers["content-type"] == "text/html"
    managed.put_for_environment("e", "ct/db.txt", io.BytesIO(b"plain"), 5)
    assert http.head(url("e", "ct/db.txt")).headers["content-type"] == "text/plain"


def test_stored_html_never_runs_as_a_page_of_the_service(http: httpx.Client) -> None:
    """Stored bytes are whatever a token holder sent: HTML with scripts, served inline on
    the service's own origin (to anyone, behind a signed URL). A sandbox CSP keeps it
    from running as the service's page."""
    page = b"<script>fetch('/v1/environments')</script>"
    assert put(http, "e", "p.html", page, **{"content-type": "text/html"}).status_code == 201
    for method in ("GET", "HEAD"):
        r = http.request(method, url("e", "p.html"))
        assert r.headers["content-type"] == "text/html"
        assert r.headers["content-security-policy"] == "sandbox"
        assert r.headers["x-content-type-options"] == "nosniff"
    signed = http.post("/v1/environments/e/sign", json={"path": "p.html", "expires_in": 60})
    got = httpx.get(signed.json()["url"])
    assert got.content == page and got.headers["content-security-policy"] == "sandbox"


def test_last_modified_and_date_conditions(http: httpx.Client) -> None:
    assert put(http, "e", "d", b"dated").status_code == 201
    r = http.get(url("e", "d"))
    assert r.headers["x-content-type-options"] == "nosniff"
    stamp = r.headers["last-modified"]
    assert stamp.endswith(" GMT")
    when = datetime.datetime.strptime(stamp, "%a, %d %b %Y %H:%M:%S GMT")
    later = (when + datetime.timedelta(hours=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    earlier = (when - datetime.timedelta(hours=1)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert http.get(url("e", "d"), headers={"If-Modified-Since": stamp}).status_code == 304
    assert http.head(url("e", "d"), headers={"If-Modified-Since": later}).status_code == 304
    assert http.get(url("e", "d"), headers={"If-Modified-Since": earlier}).content == b"dated"
    assert http.get(url("e", "d"), headers={"If-Modified-Since": "yesterday"}).status_code == 200
    # If-None-Match wins over If-Modified-Since (§13.2.2)
    r = http.get(url("e", "d"), headers={"If-Modified-Since": later, "If-None-Match": '"x"'})
    assert r.status_code == 200
    r = http.get(url("e", "d"), headers={"If-Unmodified-Since": earlier, "Range": "bytes=0-1"})
    assert r.status_code == 412
    r = http.get(url("e", "d"), headers={"If-Unmodified-Since": stamp, "Range": "bytes=0-1"})
    assert r.status_code == 206 and r.content == b"da"
    etag = r.headers["etag"]
    r = http.get(url("e", "d"), headers={"If-Unmodified-Since": earlier, "If-Match": etag})
    assert r.status_code == 200  # If-Match decides; the date is not looked at
