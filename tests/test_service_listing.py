"""Issue 14: the HTTP list in pages, stat, and server-side move and copy (no bytes move)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from catalog import ManagedStorage
from catalog.errors import ForbiddenError, InvalidPathError, NotFoundError
from catalog.listing import list_page
from catalog.tokens import TokenStore
from service.app import create_app
from service.client import CatalogClient
from tests.helpers import b3, gridfs_files
from tests.test_service_support import ServerThread


@pytest.fixture
def server(managed: ManagedStorage) -> Iterator[ServerThread]:
    with ServerThread(create_app(managed, auth=True)) as srv:
        yield srv


@pytest.fixture
def admin(managed: ManagedStorage) -> str:
    return TokenStore(managed.db).create(admin=True)[0]


def many(managed: ManagedStorage, env: str, paths: list[str]) -> None:
    """Many paths to one content, quickly (one transaction per 500)."""
    managed.put_for_environment(env, paths[0], io.BytesIO(b"x"))
    for start in range(1, len(paths), 500):
        with managed.transaction() as tx:
            for path in paths[start : start + 500]:
                tx.put(env, path, io.BytesIO(b"x"))


def test_pages_list_every_path_once_in_order(
    managed: ManagedStorage, server: ServerThread, admin: str
) -> None:
    paths = sorted(f"d{i % 7}/f{i:05d}" for i in range(2500))
    many(managed, "e", paths)
    managed.put_for_environment("other", "d0/f00000", io.BytesIO(b"y"))
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {admin}"}) as http:
        seen: list[str] = []
        after, pages = "", 0
        while True:
            params = {"limit": "1000", **({"after": after} if after else {})}
            page = http.get("/v1/environments/e/resources", params=params).json()
            pages += 1
            assert len(page["items"]) <= 1000
            seen += [item["path"] for item in page["items"]]
            assert set(page["items"][0]) == {"path", "hash", "length"}
            if "next" not in page:
                break
            assert page["next"] == page["items"][-1]["path"]
            after = page["next"]
        assert pages == 3 and seen == paths
        detailed = http.get("/v1/environments/e/resources", params={"limit": 1, "detail": "true"})
        assert detailed.json()["items"][0]["updated_at"].endswith("Z")
        # Exactly a page's worth: no empty last page is promised, but no next on the last.
        page = http.get("/v1/environments/e/resources", params={"limit": 2500}).json()
        assert len(page["items"]) == 2500 and "next" not in page
        # No limit: everything, as before.
        assert len(http.get("/v1/environments/e/resources").json()["items"]) == 2500
        # Folders, in pages of 3 keys.
        keys: list[str] = []
        after = ""
        while True:
            params = {"limit": 3, "delimiter": "/", **({"after": after} if after else {})}
            page = http.get("/v1/environments/e/resources", params=params).json()
            assert page["items"] == []
            keys += page["prefixes"]
            after = page.get("next", "")
            if not after:
                break
        assert keys == [f"d{i}/" for i in range(7)]
        page = http.get(
            "/v1/environments/e/resources", params={"prefix": "d3/f0001", "delimiter": "/"}
        ).json()
        assert page["prefixes"] == [] and len(page["items"]) == len(
            [p for p in paths if p.startswith("d3/f0001")]
        )
        for bad in (
            {"limit": "0"},
            {"limit": "10001"},
            {"limit": "x"},
            {"delimiter": "//"},
            {"detail": "1"},
        ):
            r = http.get("/v1/environments/e/resources", params=bad)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_argument", bad
    with CatalogClient(server.url, admin) as client:
        assert [item["path"] for item in client.list("e")] == paths
        assert [item["path"] for item in client.list("e", "d6/")] == [
            p for p in paths if p.startswith("d6/")
        ]
        assert [item.get("prefix") for item in client.iter_list("e", delimiter="/")] == [
            f"d{i}/" for i in range(7)
        ]


def test_listing_folds_folders_between_paths(managed: ManagedStorage) -> None:
    for path in ["a", "a-b", "a/x", "a/y/z", "ab", "b/c", "c"]:
        managed.put_for_environment("e", path, io.BytesIO(path.encode()))

    def keys(**kw: Any) -> list[str]:
        out: list[str] = []
        after = ""
        while True:
            page = list_page(managed, "e", after=after, limit=2, **kw)
            merged = [str(d["path"]) for d in page.items] + page.prefixes
            out += sorted(merged)
            if page.next is None:
                return out
            after = page.next

    assert keys(delimiter="/") == ["a", "a-b", "a/", "ab", "b/", "c"]
    assert keys(delimiter="/", prefix="a/") == ["a/x", "a/y/"]
    assert keys() == ["a", "a-b", "a/x", "a/y/z", "ab", "b/c", "c"]
    # A folder with more paths than the in-process skip is sought past.
    many(managed, "big", [f"f/{i:04d}" for i in range(300)] + ["g"])
    page = list_page(managed, "big", delimiter="/")
    assert page.prefixes == ["f/"] and [d["path"] for d in page.items] == ["g"]


def test_stat_move_copy_move_no_bytes(
    managed: ManagedStorage, server: ServerThread, admin: str
) -> None:
    data = b"content" * 1000
    managed.put_for_environment("e", "a/src", io.BytesIO(data))
    files = gridfs_files(managed)
    team_e = TokenStore(managed.db).create(env="e")[0]
    with CatalogClient(server.url, team_e) as client:
        info = client.path_info("e", "a/src")
        expected = managed.stat_for_environment("e", "a/src")
        assert info["hash"] == b3(data) and info["revision"] == expected.revision
        assert info["created_at"] == expected.created_at.isoformat().replace("+00:00", "Z")
        moved = client.move("e", "a/src", "b/dst")
        assert moved["path"] == "b/dst" and moved["hash"] == b3(data)
        with pytest.raises(NotFoundError):
            client.path_info("e", "a/src")
        copied = client.copy("e", "b/dst", "e", "c/copy")
        assert copied["hash"] == b3(data)
        res = managed.catalog.get(managed.stat_for_environment("e", "c/copy").resource_id)
        assert res.refcount == 2
        # Another environment: the token must allow both.
        with pytest.raises(ForbiddenError):
            client.copy("e", "b/dst", "f", "x")
        with pytest.raises(ForbiddenError):
            client.copy("f", "nothing", "e", "x")
        with pytest.raises(NotFoundError):
            client.move("e", "missing", "x")
        with pytest.raises(InvalidPathError):
            client.move("e", "b/dst", "../x")
    with CatalogClient(server.url, admin) as client:
        client.copy("e", "b/dst", "f", "x")
        assert client.read("f", "x") == data
        with pytest.raises(NotFoundError):
            client.path_info("f", "nothing")
    assert gridfs_files(managed) == files
    res = managed.catalog.get(managed.stat_for_environment("f", "x").resource_id)
    assert res.refcount == 3
    # A bad body: one 400 naming the field, nothing written.
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {admin}"}) as http:
        r = http.post("/v1/environments/e/move", json={"from": "b/dst"})
        assert r.status_code == 400 and "'to'" in r.json()["error"]["message"]
        r = http.post("/v1/environments/e/copy", json={"from": "b/dst", "to": "a//b"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_path"
        r = http.post("/v1/environments/e/copy", json={"from": "b", "to": "c", "from_env": "."})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_path"
    assert sorted(managed.list_for_environment("e")) == ["b/dst", "c/copy"]


def test_move_across_environments(
    managed: ManagedStorage, server: ServerThread, admin: str
) -> None:
    """Like `aws s3 mv` across buckets: atomic, no bytes, the reference carried over."""
    data = b"moving" * 20_000  # GridFS-sized
    managed.put_for_environment("e", "a/src", io.BytesIO(data))
    managed.put_for_environment("f", "dst", io.BytesIO(b"replaced"))
    files = gridfs_files(managed)
    tokens = TokenStore(managed.db)
    for only in ("e", "f"):  # a token must allow both environments
        token = tokens.create(env=only)[0]
        with CatalogClient(server.url, token) as client, pytest.raises(ForbiddenError):
            client.move("e", "a/src", "dst", dst_env="f")
    with CatalogClient(server.url, admin) as client:
        moved = client.move("e", "a/src", "dst", dst_env="f")
        assert moved["path"] == "dst" and moved["hash"] == b3(data)
        assert client.read("f", "dst") == data
        with pytest.raises(NotFoundError):
            client.path_info("e", "a/src")
        with pytest.raises(NotFoundError):
            client.move("e", "a/src", "again", dst_env="f")
    assert gridfs_files(managed) == files  # no bytes moved
    res = managed.catalog.get(managed.stat_for_environment("f", "dst").resource_id)
    assert res.refcount == 1
    assert managed.catalog.lookup(b3(b"replaced")) is None  # the replaced content went
    went = managed.history_for_environment("e", "a/src")[-1]
    came = managed.history_for_environment("f", "dst")[-1]
    assert (went["event"], went["to"]) == ("move", "f:dst")
    assert (came["event"], came["from"]) == ("move", "e:a/src")
    assert came["hash"] == b3(data)
    # And back, through the library.
    info = managed.move_path("f", "dst", "e", "back")
    assert info.hash == b3(data) and managed.list_for_environment("f") == []


def test_bulk_delete_is_one_transaction_and_lists_what_was_missing(
    managed: ManagedStorage, server: ServerThread, admin: str
) -> None:
    many(managed, "e", [f"d/{i:04d}" for i in range(1200)])
    managed.put_for_environment("e", "keep", io.BytesIO(b"x"))  # the same content
    with CatalogClient(server.url, admin) as client:
        batch = [f"d/{i:04d}" for i in range(999)]
        out = client.remove_many("e", [*batch[:-1], "d/nope", batch[-1]])  # 1,000 paths
        assert out == {"deleted": batch, "missing": ["d/nope"]}
        rest = client.remove_many("e", [f"d/{i:04d}" for i in range(999, 1200)])
        assert len(rest["deleted"]) == 201
        res = managed.catalog.get(managed.stat_for_environment("e", "keep").resource_id)
        assert res.refcount == 1  # every deleted path gave its reference back
        with pytest.raises(ForbiddenError):
            CatalogClient(server.url, TokenStore(managed.db).create(env="f")[0]).remove_many(
                "e", ["keep"]
            )
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {admin}"}) as http:
        for body, code in (
            ({"paths": []}, "invalid_argument"),
            ({"paths": [f"p{i}" for i in range(1001)]}, "invalid_argument"),
            ({"paths": ["ok", "a//b"]}, "invalid_path"),
            ({"paths": "keep"}, "invalid_argument"),
        ):
            r = http.post("/v1/environments/e/delete", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] in (code, "bad_request"), (
                body,
                r.text,
            )
    assert managed.list_for_environment("e") == ["keep"]  # bad requests deleted nothing


def test_a_listing_without_limit_streams_and_holds_no_environment_in_memory(
    managed: ManagedStorage, mongo_uri: str
) -> None:
    """Without `limit` every path comes in one answer (the contract's form): it was built
    as one list in memory, ~320 MiB per request for 200,000 paths, so a few concurrent
    listings of a big tenant could exhaust the service. It streams from the cursor now."""
    import datetime
    import json
    import threading
    import time

    import psutil

    from catalog.mongod import free_port, stop_process
    from tests.test_service_support import serve_popen, wait_until

    now = datetime.datetime.now(datetime.timezone.utc)
    res = managed.catalog.acquire_inline(b3(b"x"), b"x")
    docs = [
        {"env": "big", "path": f"p/{i:07d}", "resource_id": res.id, "hash": res.hash,
         "length": 1, "rev": i + 1, "created_at": now, "updated_at": now}
        for i in range(100_000)
    ]  # fmt: skip
    for start in range(0, len(docs), 10_000):  # path documents only: a listing reads those
        managed.paths.insert_many(docs[start : start + 10_000])
    port = free_port()
    proc = serve_popen(mongo_uri, managed.db.name, port, "--no-auth")
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _answers(url), timeout=30)
        server = psutil.Process(proc.pid)
        base = server.memory_info().rss
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], server.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            body = httpx.get(f"{url}/v1/environments/big/resources?prefix=p/", timeout=120)
        finally:
            done.set()
            sampler.join()
        assert body.status_code == 200 and body.headers["content-type"] == "application/json"
        items = json.loads(body.content)["items"]
        assert len(items) == 100_000 and items[0] == {"path": "p/0000000", "hash": res.hash,
                                                      "length": 1}  # fmt: skip
        assert [i["path"] for i in items] == sorted(i["path"] for i in items)
        assert peak[0] - base < 40 * 1024 * 1024, (peak[0] - base) >> 20
        empty = httpx.get(f"{url}/v1/environments/none/resources")
        assert empty.json() == {"items": []}
    finally:
        stop_process(proc, 15)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
