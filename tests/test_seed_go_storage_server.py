"""The seed's test scripts (go-storage-server test/simple-{1,2,3}.sh) as assertions.

Run against a real `rescat serve --compat-store ENV`. The scripts use curl's
`--data` (a form-encoded body) and `--data-binary @file`; httpx sends the same
bytes. Where the scripts only print, the assertions state what a correct
server answers, by the contract: create 201 (409 if it exists), replace 200
(404 if absent), read 200/404, delete 204/404, and never a 5xx.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from catalog import connect
from catalog.tokens import TokenStore
from tests.test_service_support import server_process

FORM = {"Content-Type": "application/x-www-form-urlencoded"}  # what curl --data sends
# A file of the size of the seed's test/data.txt (126 bytes), sent as --data-binary does.
DATA_TXT = b"".join(f"line {i:02d} of the seed's data file\n".encode() for i in range(4))[:126]


@pytest.fixture
def store(mongo_uri: str, database: str) -> Iterator[str]:
    with server_process(mongo_uri, database, "--no-auth", "--compat-store", "seed") as url:
        yield url + "/store"


def test_simple_1(store: str, mongo_uri: str, database: str) -> None:
    with httpx.Client() as c:
        assert c.post(f"{store}/foo", content=b"11111111111111111", headers=FORM).status_code == 201
        assert c.put(f"{store}/foo", content=b"22222222222222222", headers=FORM).status_code == 200
        got = c.get(f"{store}/foo")
        assert (got.status_code, got.content) == (200, b"22222222222222222")
        assert got.headers["x-content-type-options"] == "nosniff"
        assert c.delete(f"{store}/foo").status_code == 204
        # Not in the script, but what its steps imply.
        assert c.get(f"{store}/foo").status_code == 404
        assert c.put(f"{store}/foo", content=b"x").status_code == 404
        assert c.delete(f"{store}/foo").status_code == 404
        assert c.post(f"{store}/bar", content=b"1").status_code == 201
        assert c.post(f"{store}/bar", content=b"2").status_code == 409
        assert c.get(f"{store}/bar").content == b"1"
    # The blobs are paths of the environment: /v1 and the CLI see them.
    managed = connect(mongo_uri, database)
    assert managed.list_for_environment("seed") == ["bar"]


def test_simple_2(store: str) -> None:
    """Two blobs created, replaced and deleted while others read them, all at once per step."""

    def call(method: str, name: str, body: bytes | None = None) -> httpx.Response:
        with httpx.Client(timeout=30) as c:
            return c.request(method, f"{store}/{name}", content=body, headers=FORM)

    def step(*calls: tuple[Any, ...]) -> list[httpx.Response]:
        with ThreadPoolExecutor(len(calls)) as pool:
            return list(pool.map(lambda args: call(*args), calls))

    old = {"foo": b"foooooooooooooooo", "bar": b"barrrrrrrrrrrrrrr"}
    new = {"foo": b"ooooooooooooooooof", "bar": b"bbbbbbbbbbbbbbbbar"}
    created = step(("POST", "foo", old["foo"]), ("POST", "bar", old["bar"]))
    reads = step(("GET", "foo"), ("GET", "bar"))
    assert [r.status_code for r in created] == [201, 201]
    for name, r in zip(("foo", "bar"), reads, strict=True):
        assert (r.status_code, r.content) == (200, old[name])

    answers = step(
        ("PUT", "foo", new["foo"]), ("PUT", "bar", new["bar"]), ("GET", "foo"), ("GET", "bar")
    )
    assert [r.status_code for r in answers[:2]] == [200, 200]
    for name, r in zip(("foo", "bar"), answers[2:], strict=True):
        # A read racing the replace sees the old bytes or the new, never a mix.
        assert r.status_code == 200 and r.content in (old[name], new[name])

    answers = step(("DELETE", "foo"), ("DELETE", "bar"), ("GET", "foo"), ("GET", "bar"))
    assert [r.status_code for r in answers[:2]] == [204, 204]
    for name, r in zip(("foo", "bar"), answers[2:], strict=True):
        assert (r.status_code, r.content) in ((404, r.content), (200, new[name]))
        assert r.status_code < 500
    assert [r.status_code for r in step(("GET", "foo"), ("GET", "bar"))] == [404, 404]


def test_simple_3(store: str) -> None:
    with httpx.Client() as c:
        assert c.post(f"{store}/blah", content=DATA_TXT, headers=FORM).status_code == 201
        got = c.get(f"{store}/blah")
        assert (got.status_code, got.content) == (200, DATA_TXT)
        assert c.delete(f"{store}/blah").status_code == 204


def test_names_and_health_never_500(store: str) -> None:
    base = store.rsplit("/store", 1)[0]
    with httpx.Client() as c:
        assert c.get(f"{base}/healthz").status_code == 200
        for name in ("%2e%2e", "a%2Fb", "%00", "%ff", "."):
            for method in ("GET", "POST", "PUT", "DELETE"):
                status = c.request(method, f"{store}/{name}", content=b"x").status_code
                assert status in (400, 404), (method, name, status)
        assert c.get(f"{store}/a/b").status_code == 404  # not a route: one segment only
        assert c.get(f"{store}/").status_code == 400  # an empty name
        large = c.post(f"{store}/big", content=b"z" * (3 << 20))
        assert large.status_code == 201
        assert c.get(f"{store}/big").headers["content-length"] == str(3 << 20)


def test_store_routes_need_a_token_for_that_environment(mongo_uri: str, database: str) -> None:
    managed = connect(mongo_uri, database)
    tokens = TokenStore(managed.db)
    mine, other = tokens.create(env="seed")[0], tokens.create(env="elsewhere")[0]
    admin = tokens.create(admin=True)[0]
    with (
        server_process(mongo_uri, database, "--compat-store", "seed") as url,
        httpx.Client(base_url=url) as c,
    ):
        assert c.post("/store/k", content=b"v").status_code == 401
        assert c.post("/store/k", content=b"v", headers=_bearer(other)).status_code == 403
        assert c.post("/store/k", content=b"v", headers=_bearer(mine)).status_code == 201
        assert c.get("/store/k", headers=_bearer(admin)).content == b"v"
        assert c.get("/v1/environments/seed/resources/k", headers=_bearer(mine)).content == b"v"
        assert c.get("/healthz").status_code == 200


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_seed_errors_and_416_say_what_a_client_needs(store: str) -> None:
    """/store/%ff said `invalid name '': one path segment` (v1 says it is not UTF-8);
    a 416 carried the ETag but not the X-Revision every other answer about a path has."""
    bad = httpx.get(store + "/%ff")
    assert bad.status_code == 400 and "UTF-8" in bad.json()["error"]["message"], bad.text
    slash = httpx.get(store + "/a%2Fb")
    assert slash.status_code == 400 and "one path segment" in slash.json()["error"]["message"]
    created = httpx.post(store + "/r", content=b"0123")
    assert created.status_code == 201
    beyond = httpx.get(store + "/r", headers={"range": "bytes=10-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == "bytes */4"
    assert beyond.headers["x-revision"] == httpx.head(store + "/r").headers["x-revision"]
