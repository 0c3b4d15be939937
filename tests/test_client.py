"""service.client.CatalogClient against a real service on loopback: the dedup workflow."""

from __future__ import annotations

import io
import os
import random
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import blake3
import httpx
import pytest

from catalog import ManagedStorage
from catalog.errors import (
    BadRequestError,
    ForbiddenError,
    HashMismatchError,
    InvalidPathError,
    NotFoundError,
    PreconditionFailedError,
    RequestExpiredError,
    ResponseMismatchError,
    UnauthorizedError,
)
from catalog.tokens import TokenStore
from service.app import create_app
from service.client import CatalogClient, ServiceUnavailableError, UploadResult
from service.errors import ServiceError
from tests.test_core_catalog_races import race
from tests.test_service_support import ServerThread


def h(data: bytes) -> str:
    return str(blake3.blake3(data).hexdigest())


@pytest.fixture
def server(managed: ManagedStorage) -> Iterator[ServerThread]:
    with ServerThread(create_app(managed, auth=False)) as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[CatalogClient]:
    with CatalogClient(server.url) as c:
        yield c


def received_bytes(server: ServerThread) -> float:
    """Body bytes the service received for resource PUTs, from its metrics."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("rescat_http_received_bytes_total{") and "resources/{path}" in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_upload_dedups(
    client: CatalogClient, server: ServerThread, managed: ManagedStorage, tmp_path: Path
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 11)
    source = tmp_path / "src.bin"
    source.write_bytes(data)

    first = client.upload("env", "one", source)
    assert first == UploadResult("one", h(data), len(data), False, len(data))
    assert received_bytes(server) == len(data)

    second = client.upload("env", "two", str(source))
    assert second == UploadResult("two", h(data), len(data), True, 0)
    third = client.upload("other-env", "three", io.BytesIO(data))
    assert third.deduplicated and third.bytes_sent == 0
    # The service received no more body bytes: nothing went over the wire.
    assert received_bytes(server) == len(data)

    assert client.read("env", "two") == data
    assert client.read("other-env", "three") == data
    res = managed.catalog.get(managed.catalog.find(h(data)))
    assert res.refcount == 3
    assert managed.db["resources.files"].count_documents({}) == 1


def test_upload_from_pipe_and_offsets(client: CatalogClient, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as out:
            out.write(data)

    t = threading.Thread(target=feed)
    t.start()
    with os.fdopen(r, "rb") as pipe:
        result = client.upload("e", "piped", pipe)
    t.join(10)
    assert result.hash == h(data) and not result.deduplicated
    again = io.BytesIO(b"HEADER" + data)
    again.seek(6)  # a file object's content starts at its current position
    result = client.upload("e", "piped-2", again)
    assert result.deduplicated and result.hash == h(data)


def test_wrong_proof_creates_nothing(client: CatalogClient, managed: ManagedStorage) -> None:
    data = os.urandom(500_000)
    client.upload("e", "orig", io.BytesIO(data))
    challenge = client.request_put("e", "copy", h(data))
    with pytest.raises(ResponseMismatchError):
        client.answer("e", challenge["request_id"], "0" * 64)
    with pytest.raises(NotFoundError):
        client.stat("e", "copy")
    assert [item["path"] for item in client.list("e")] == ["orig"]
    assert managed.catalog.get(managed.catalog.find(h(data))).refcount == 1
    with pytest.raises(RequestExpiredError):
        client.answer("e", challenge["request_id"], "0" * 64)

    # A client that holds only part of the content cannot answer.
    partial = data[: len(data) // 2] + bytes(len(data) - len(data) // 2)
    from catalog.proof import ranges_checksum

    challenge = client.request_put("e", "copy", h(data))
    ranges = [(s, n) for s, n in challenge["ranges"]]
    with pytest.raises(ResponseMismatchError):
        client.answer("e", challenge["request_id"], ranges_checksum(io.BytesIO(partial), ranges))
    with pytest.raises(NotFoundError):
        client.stat("e", "copy")


def test_client_calls_and_errors(client: CatalogClient, server: ServerThread) -> None:
    assert client.health() == {"status": "ok"}
    result = client.put("e", "a/b", b"hello", hash=h(b"hello"))
    assert result == UploadResult("a/b", h(b"hello"), 5, False, 5)
    client.put("e", "a/c", b"world")
    assert client.stat("e", "a/b")["hash"] == h(b"hello")
    assert client.stat("e", "a/b")["length"] == 5
    assert client.list("e", "a/") == [
        {"path": "a/b", "hash": h(b"hello"), "length": 5},
        {"path": "a/c", "hash": h(b"world"), "length": 5},
    ]
    client.remove("e", "a/b")
    with pytest.raises(NotFoundError):
        client.remove("e", "a/b")
    with pytest.raises(NotFoundError):
        client.read("e", "a/b")
    with pytest.raises(NotFoundError) as info:
        client.stat("e", "a/b")
    assert isinstance(info.value, KeyError)
    with pytest.raises(HashMismatchError):
        client.put("e", "x", b"data", hash=h(b"other"))
    with pytest.raises(InvalidPathError):
        client.upload("e", "../x", io.BytesIO(b"x"))
    with pytest.raises(InvalidPathError):
        client.list("bad env")
    with pytest.raises(NotFoundError):
        client.request_put("e", "x", h(b"never stored"))
    with (
        CatalogClient("http://127.0.0.1:1", timeout=2, retries=0) as dead,
        pytest.raises(ServiceUnavailableError),
    ):
        dead.list("e")


def test_download_verifies_and_resumes(
    client: CatalogClient, server: ServerThread, tmp_path: Path
) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    client.put("e", "big", data)
    target = tmp_path / "out.bin"
    seen: list[tuple[str, int, int | None]] = []
    result = client.download("e", "big", target, progress=lambda *a: seen.append(a))
    assert target.read_bytes() == data
    assert result.bytes_received == len(data) and not result.resumed
    assert seen[-1] == ("download", len(data), len(data))

    # An interrupted download keeps its own partial file (named after the content,
    # never the target itself) and the next one resumes it with Range.
    fresh = tmp_path / "fresh.bin"

    def interrupt(phase: str, done: int, total: int | None) -> None:
        if phase == "download" and done >= 2_000_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.download("e", "big", fresh, progress=interrupt)
    assert not fresh.exists()
    (part,) = tmp_path.glob(".fresh.bin.*.rescat-part")
    kept = part.stat().st_size
    assert 0 < kept < len(data) and part.read_bytes() == data[:kept]
    result = client.download("e", "big", fresh)
    assert fresh.read_bytes() == data and not part.exists()
    assert result.resumed and result.bytes_received == len(data) - kept

    # A shorter file at the target is not taken for a partial one: replaced whole.
    target.write_bytes(data[:2_000_000])
    result = client.download("e", "big", target)
    assert target.read_bytes() == data
    assert not result.resumed and result.bytes_received == len(data)

    # A complete file costs nothing.
    result = client.download("e", "big", target)
    assert result.bytes_received == 0 and target.read_bytes() == data

    # A stale partial file (other content) is detected and replaced.
    target.write_bytes(os.urandom(1_000_000))
    result = client.download("e", "big", target)
    assert target.read_bytes() == data and not result.resumed

    # Longer than the content: replaced too.
    target.write_bytes(data + b"extra")
    client.download("e", "big", target)
    assert target.read_bytes() == data

    # resume=False overwrites.
    target.write_bytes(data[:10])
    result = client.download("e", "big", target, resume=False)
    assert result.bytes_received == len(data) and target.read_bytes() == data

    # To a file object, from its position.
    buffer = io.BytesIO(b"prefix")
    buffer.seek(6)
    client.download("e", "big", buffer)
    assert buffer.getvalue() == b"prefix" + data

    # A failed download leaves no empty file behind.
    missing = tmp_path / "missing.bin"
    with pytest.raises(NotFoundError):
        client.download("e", "nope", missing)
    assert not missing.exists()


def test_download_detects_corrupt_content(
    client: CatalogClient, managed: ManagedStorage, tmp_path: Path
) -> None:
    data = os.urandom(100_000)
    client.put("e", "c", data)
    # Flip a byte in the stored chunk behind the service's back.
    chunk = managed.db["resources.chunks"].find_one({})
    assert chunk is not None
    corrupted = bytearray(chunk["data"])
    corrupted[5] ^= 0xFF
    managed.db["resources.chunks"].update_one(
        {"_id": chunk["_id"]}, {"$set": {"data": bytes(corrupted)}}
    )
    with pytest.raises(HashMismatchError):
        client.download("e", "c", tmp_path / "c.bin", resume=False)


def test_upload_progress(client: CatalogClient, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    source = tmp_path / "p.bin"
    source.write_bytes(data)
    events: list[tuple[str, int, int | None]] = []
    client.upload("e", "p", source, progress=lambda *a: events.append(a))
    phases = [e[0] for e in events]
    assert "hash" in phases and "upload" in phases
    assert events[-1] == ("upload", len(data), len(data))


def test_token_isolation(managed: ManagedStorage) -> None:
    store = TokenStore(managed.db)
    token_a, _ = store.create(env="a")
    token_b, _ = store.create(env="b")
    data = os.urandom(300_000)
    with (
        ServerThread(create_app(managed, auth=True)) as srv,
        CatalogClient(srv.url, token_a) as a,
        CatalogClient(srv.url, token_b) as b,
        CatalogClient(srv.url) as anonymous,
    ):
        assert not a.upload("a", "x", io.BytesIO(data)).deduplicated
        # b proves it holds the bytes: dedup works across environments...
        assert b.upload("b", "y", io.BytesIO(data)).deduplicated
        # ...but nothing of one environment is reachable with the other's token.
        with pytest.raises(ForbiddenError):
            a.list("b")
        with pytest.raises(ForbiddenError):
            a.read("b", "y")
        with pytest.raises(ForbiddenError):
            b.upload("a", "z", io.BytesIO(data))
        with pytest.raises(ForbiddenError):
            b.remove("a", "x")
        assert [i["path"] for i in a.list("a")] == ["x"]
        assert [i["path"] for i in b.list("b")] == ["y"]
        with pytest.raises(UnauthorizedError):
            anonymous.list("a")
        # A HEAD answer has no body; stat's refusals still say what was refused.
        with pytest.raises(ForbiddenError, match="not valid for environment 'b'"):
            a.stat("b", "y")
        with pytest.raises(UnauthorizedError, match="bearer token is required"):
            anonymous.stat("a", "x")
        with pytest.raises(NotFoundError, match="a: no such path 'nothing'"):
            a.stat("a", "nothing")


def test_sixteen_concurrent_clients_exact_refcounts(
    server: ServerThread, managed: ManagedStorage
) -> None:
    contents = [os.urandom(random.choice([0, 100, 70_000, 1_200_000])) for _ in range(5)]
    contents[0] = os.urandom(2_500_000)
    plan: list[list[tuple[str, int]]] = []
    rng = random.Random(7)
    for worker in range(16):
        plan.append([(f"w{worker}/f{i}", rng.randrange(len(contents))) for i in range(6)])
    errors: list[BaseException] = []
    results: list[UploadResult] = []
    lock = threading.Lock()
    barrier = threading.Barrier(16)

    def run(worker: int) -> None:
        try:
            with CatalogClient(server.url) as c:
                barrier.wait(10)
                for path, which in plan[worker]:
                    env = f"env{worker % 3}"
                    result = c.upload(env, path, io.BytesIO(contents[which]))
                    with lock:
                        results.append(result)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 16 * 6

    expected = Counter(h(contents[which]) for steps in plan for _, which in steps)
    entries = list(managed.db["catalog"].find({}))
    assert {e["hash"]: e["refcount"] for e in entries} == dict(expected)
    copies = managed.db["resources.files"].count_documents({})
    copies += managed.db["catalog"].count_documents({"path": "inline:"})
    assert copies == len(expected)
    assert managed.db["paths"].count_documents({}) == 16 * 6
    assert any(r.deduplicated for r in results)
    with CatalogClient(server.url) as c:
        for worker in (0, 7, 15):
            for path, which in plan[worker]:
                assert c.read(f"env{worker % 3}", path) == contents[which]


def test_conditional_put(client: CatalogClient, server: ServerThread) -> None:
    """If-None-Match / If-Match from the client: checked with the write, revisions back."""
    first = client.put("env", "cfg", b"one", if_none_match=True)
    assert first.revision is not None and first.revision > 0
    assert client.stat("env", "cfg")["revision"] == first.revision
    with pytest.raises(PreconditionFailedError):
        client.put("env", "cfg", b"two", if_none_match=True)
    second = client.put("env", "cfg", b"two", if_match=first.revision)
    assert second.revision is not None and second.revision > first.revision
    with pytest.raises(PreconditionFailedError):  # stale: nothing changes
        client.put("env", "cfg", b"three", if_match=first.revision)
    with pytest.raises(PreconditionFailedError):  # a path that does not exist matches nothing
        client.put("env", "absent", b"x", if_match=first.revision)
    assert client.read("env", "cfg") == b"two"
    third = client.put("env", "cfg", b"three", if_match=f"blake3:{h(b'two')}")  # by content
    assert third.revision is not None and third.revision > second.revision
    read, write = os.pipe()  # a pipe: a chunked PUT, the same conditions
    with os.fdopen(write, "wb") as w:
        w.write(b"four")
    with os.fdopen(read, "rb") as r, pytest.raises(PreconditionFailedError):
        client.put("env", "cfg", r, if_match=second.revision)
    assert client.read("env", "cfg") == b"three"
    with pytest.raises(BadRequestError):
        client.put("env", "cfg", b"x", if_match=True)  # type: ignore[arg-type]
    with pytest.raises(PreconditionFailedError):  # a conditional delete, stale
        client.remove("env", "cfg", if_match=second.revision)
    client.remove("env", "cfg", if_match=third.revision)
    with pytest.raises(NotFoundError):
        client.stat("env", "cfg")

    # Racing creators of one path: exactly one wins.
    def create(i: int) -> UploadResult:
        with CatalogClient(server.url) as c:
            return c.put("env", "race", f"v{i}".encode(), if_none_match=True)

    outcomes = race(8, create)
    assert all(isinstance(o, (UploadResult, PreconditionFailedError)) for o in outcomes)
    won = [o for o in outcomes if isinstance(o, UploadResult)]
    assert len(outcomes) == 8 and len(won) == 1
    assert h(client.read("env", "race")) == won[0].hash  # the winner's bytes, and only theirs


def test_a_download_the_service_keeps_breaking_off_says_so(
    client: CatalogClient, managed: ManagedStorage, tmp_path: Path
) -> None:
    """A stored chunk gone: the service answers 200 and stops at it, every time. That
    is no unreachable service (what the error said, with a hint to check --server)."""
    data = os.urandom(3 * 1024 * 1024)  # three 1 MiB chunks
    client.put("e", "big", data)
    (files,) = managed.db["resources.files"].find({"length": len(data)})
    managed.db["resources.chunks"].delete_one({"files_id": files["_id"], "n": 1})
    with pytest.raises(ServiceError, match=r"broke off big at byte \d+ of 3145728") as caught:
        client.download("e", "big", tmp_path / "out")
    assert caught.value.code == "broken_off"
    assert not (tmp_path / "out").exists()
