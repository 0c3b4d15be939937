"""One catalog, every face: a value written through any face is read the same through all.

The second wave's promise (CONTRACT.md, "Something written through one face is
visible through the others"), end to end against one real `rescat serve`
process: the KV store, the registry driver (put and a writer session), the
/v1 HTTP API, the seed's /store API, the fsspec filesystem and the CLI each
write the same key in turn. After every write, every face reads those bytes,
the revision has grown, and both watchers (the KV watch in this process, the
SSE watch of the service) have seen each write exactly once, in order.
"""

from __future__ import annotations

import queue
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import httpx
import pytest

from catalog import ManagedStorage, connect
from catalog.driver import StorageDriver
from catalog.kv import KVStore
from service.client import CatalogClient
from tests.helpers import pump
from tests.test_service_support import REPO, cli_env, rescat_command, server_process

ENV = "shared"
KEY = "greeting"


@pytest.fixture
def url(mongo_uri: str, database: str) -> Iterator[str]:
    with server_process(mongo_uri, database, "--no-auth", "--compat-store", ENV) as base:
        yield base


def _cli(mongo_uri: str, database: str, *args: str, stdin: bytes = b"") -> bytes:
    done = subprocess.run(
        rescat_command("--mongo-uri", mongo_uri, "--database", database, *args),
        input=stdin,
        capture_output=True,
        env=cli_env(),
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def test_a_value_written_through_any_face_reads_the_same_through_all(
    url: str, mongo_uri: str, database: str
) -> None:
    managed: ManagedStorage = connect(mongo_uri, database)
    kv = KVStore(managed, ENV)
    driver = StorageDriver(managed, ENV)
    fs = fsspec.filesystem("rescat", server=url, skip_instance_cache=True)
    client = CatalogClient(url)
    stop = threading.Event()
    kv_seen: queue.Queue[Any] = queue.Queue()
    sse_seen: queue.Queue[Any] = queue.Queue()
    kv_watch = kv.watch(KEY, stop=stop)
    assert next(kv_watch) is None  # the key does not exist yet
    # The SSE stream opens in its thread whenever it does: `since` a revision
    # taken now makes it replay whatever it would otherwise have missed.
    start = kv.put("before", b"").last_index
    watchers = [
        pump(kv_watch, kv_seen),
        pump(client.watch(ENV, key=KEY, since=start, stop=stop), sse_seen),
    ]

    def http_put(data: bytes) -> None:
        r = httpx.put(f"{url}/v1/environments/{ENV}/resources/{KEY}", content=data)
        assert r.status_code in (200, 201), r.text

    def store_put(data: bytes) -> None:
        # The seed's API: create once, replace after.
        method = httpx.put if kv.exists(KEY) else httpx.post
        assert method(f"{url}/store/{KEY}", content=data).status_code in (200, 201)

    def writer_put(data: bytes) -> None:
        writer = driver.writer(f"/{KEY}")
        writer.write(data[:5])
        writer.write(data[5:])
        writer.commit()
        writer.close()

    writes: list[tuple[str, Callable[[bytes], object]]] = [
        ("kv", lambda data: kv.put(KEY, data)),
        ("driver", lambda data: driver.put_content(f"/{KEY}", data)),
        ("driver writer", writer_put),
        ("http", http_put),
        ("seed store", store_put),
        ("fsspec", lambda data: fs.pipe_file(f"rescat://{ENV}/{KEY}", data)),
        ("cli", lambda data: _cli(mongo_uri, database, "put", ENV, KEY, "-", stdin=data)),
        ("cli kv", lambda data: _cli(mongo_uri, database, "kv", "put", ENV, KEY, "-", stdin=data)),
    ]
    revisions: list[int] = []
    try:
        for face, write in writes:
            data = f"written through {face}".encode()
            write(data)
            pair = kv.get(KEY)
            assert pair.value == data, face
            got = httpx.get(f"{url}/v1/environments/{ENV}/resources/{KEY}")
            assert (got.status_code, got.content) == (200, data), face
            assert int(got.headers["x-revision"]) == pair.last_index, face
            assert httpx.get(f"{url}/store/{KEY}").content == data, face
            assert driver.get_content(f"/{KEY}") == data, face
            assert driver.stat(f"/{KEY}").size == len(data), face
            assert fs.cat_file(f"rescat://{ENV}/{KEY}") == data, face
            assert client.read(ENV, KEY) == data, face
            assert not revisions or pair.last_index > revisions[-1], face
            revisions.append(pair.last_index)
            # Each watcher sees this write, once, with the bytes it wrote.
            seen = kv_seen.get(timeout=30)
            assert (seen.value, seen.last_index) == (data, pair.last_index), face
            event = sse_seen.get(timeout=30)
            assert (event["type"], event["path"], event["revision"]) == (
                "put",
                KEY,
                pair.last_index,
            ), face
        assert _cli(mongo_uri, database, "get", ENV, KEY) == data
        assert _cli(mongo_uri, database, "kv", "get", ENV, KEY) == data
        # A delete through one face is a delete everywhere.
        driver.delete(f"/{KEY}")
        assert not kv.exists(KEY)
        assert httpx.get(f"{url}/v1/environments/{ENV}/resources/{KEY}").status_code == 404
        assert httpx.get(f"{url}/store/{KEY}").status_code == 404
        assert not fs.exists(f"rescat://{ENV}/{KEY}")
        assert kv_seen.get(timeout=30) is None
        assert sse_seen.get(timeout=30)["type"] == "delete"
        # Nothing more than one event per change reached either watcher.
        assert kv_seen.empty() and sse_seen.empty()
        # And the path's history has one item per write, whatever face made it.
        items = client.history(ENV, KEY)
        assert [i["revision"] for i in items if i["event"] != "delete"] == revisions
    finally:
        stop.set()
        kv.close()
        client.close()
        for thread in watchers:
            thread.join(10)


def test_a_replace_through_any_face_never_keeps_the_old_content_type(
    url: str, mongo_uri: str, database: str
) -> None:
    """Only an HTTP PUT stored a type on every write; a replace through the KV store, the
    driver, a move or a copy kept the type of the bytes it replaced (a PNG served as
    text/html). A copy or a move carries its source's type, or none."""
    import io

    managed: ManagedStorage = connect(mongo_uri, database)
    kv = KVStore(managed, ENV)
    driver = StorageDriver(managed, ENV)
    page = f"{url}/v1/environments/{ENV}/resources/page"

    def typed_as_html() -> None:
        put = httpx.put(page, content=b"<p>", headers={"content-type": "text/html"})
        assert put.status_code == 201
        assert httpx.get(page).headers["content-type"].startswith("text/html")

    def served_type() -> str:
        got = httpx.get(page)
        assert got.status_code == 200
        return str(got.headers["content-type"])

    replaces: list[Callable[[], None]] = [
        lambda: kv.put("page", b"\x89PNG"),
        lambda: driver.put_content("/page", b"\x89PNG"),
        lambda: managed.put_path(ENV, "page", io.BytesIO(b"\x89PNG"), 4) and None,
        lambda: _cli(mongo_uri, database, "put", ENV, "page", "-", stdin=b"\x89PNG") and None,
    ]
    managed.put_path(ENV, "untyped", io.BytesIO(b"\x89PNG"), 4)
    replaces.append(lambda: managed.move_for_environment(ENV, "untyped", "page") and None)
    for replace in replaces:
        typed_as_html()
        replace()
        assert served_type() == "application/octet-stream", replace
    httpx.put(f"{url}/v1/environments/{ENV}/resources/pic", content=b"<svg/>",
              headers={"content-type": "image/svg+xml"})  # fmt: skip
    typed_as_html()
    managed.copy_path(ENV, "pic", ENV, "page")  # over a typed path: the source's type
    assert served_type() == "image/svg+xml"
    managed.copy_path(ENV, "pic", ENV, "fresh-copy")  # to a new path: the source's type too
    fresh = httpx.get(f"{url}/v1/environments/{ENV}/resources/fresh-copy")
    assert fresh.headers["content-type"] == "image/svg+xml"
    kv.close()
