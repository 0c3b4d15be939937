"""Resumable uploads over HTTP, the client's resume, and signed URLs (service.routes_uploads)."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from pymongo import MongoClient

import service.client as client_module
from catalog import ManagedStorage
from catalog.driver import StorageDriver
from catalog.errors import NotFoundError, OffsetMismatchError, UploadPendingError
from catalog.mongod import free_port, stop_process
from catalog.tokens import TokenStore
from service.app import create_app
from service.client import CatalogClient
from service.signing import URLSigner
from storage import GridFSStorage
from tests.helpers import b3, rand
from tests.test_service_support import (
    REPO,
    ServerThread,
    cli_env,
    rescat_command,
    serve_popen,
    server_process,
    wait_until,
)

MiB = 1024 * 1024
OCTETS = {"content-type": "application/octet-stream"}


@pytest.fixture
def srv(managed: ManagedStorage) -> Iterator[ServerThread]:
    with ServerThread(create_app(managed, auth=False)) as server:
        yield server


@pytest.fixture
def http(srv: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


def up(env: str, upload_id: str = "") -> str:
    return f"/v1/environments/{env}/uploads" + (f"/{upload_id}" if upload_id else "")


def error_code(response: httpx.Response) -> str:
    return str(response.headers.get("x-rescat-error", ""))


def offset_of(http: httpx.Client, env: str, upload_id: str) -> int:
    response = http.head(up(env, upload_id))
    assert response.status_code == 204, response.headers
    return int(response.headers["upload-offset"])


def patch(http: httpx.Client, env: str, upload_id: str, offset: Any, body: Any) -> httpx.Response:
    return http.patch(
        up(env, upload_id), content=body, headers={**OCTETS, "upload-offset": str(offset)}
    )


# -- the HTTP face ----------------------------------------------------------------------
def test_upload_lifecycle(http: httpx.Client, managed: ManagedStorage) -> None:
    data = rand(5 * MiB + 123)
    created = http.post(up("env"), json={"path": "big/file.bin"})
    assert created.status_code == 201, created.text
    doc = created.json()
    assert (doc["path"], doc["offset"]) == ("big/file.bin", 0)
    uid = doc["upload_id"]
    assert offset_of(http, "env", uid) == 0

    first = patch(http, "env", uid, 0, data[: 3 * MiB + 7])
    assert first.status_code == 204, first.text
    assert int(first.headers["upload-offset"]) == 3 * MiB + 7
    assert offset_of(http, "env", uid) == 3 * MiB + 7
    # nothing is visible until commit
    assert http.get("/v1/environments/env/resources/big/file.bin").status_code == 404
    assert http.get("/v1/environments/env/resources").json()["items"] == []

    # a wrong offset: 409, the body discarded, the session unchanged
    for wrong in (0, 3 * MiB, 3 * MiB + 8, 10**12):
        refused = patch(http, "env", uid, wrong, b"x" * 1000)
        assert refused.status_code == 409 and error_code(refused) == "offset_mismatch"
        assert int(refused.headers["upload-offset"]) == 3 * MiB + 7
        assert offset_of(http, "env", uid) == 3 * MiB + 7

    def chunks() -> Iterator[bytes]:  # chunked transfer encoding
        rest = data[3 * MiB + 7 :]
        for i in range(0, len(rest), 300_000):
            yield rest[i : i + 300_000]

    second = patch(http, "env", uid, 3 * MiB + 7, chunks())
    assert second.status_code == 204, second.text
    assert int(second.headers["upload-offset"]) == len(data)

    # a hash mismatch keeps the session
    wrong_hash = http.post(up("env", uid) + "/commit", headers={"x-content-hash": "0" * 64})
    assert wrong_hash.status_code == 422 and wrong_hash.json()["error"]["code"] == "hash_mismatch"
    assert offset_of(http, "env", uid) == len(data)
    assert http.get("/v1/environments/env/resources/big/file.bin").status_code == 404
    bad_hash = http.post(up("env", uid) + "/commit", headers={"x-content-hash": "md5:1"})
    assert bad_hash.status_code == 400 and error_code(bad_hash) == "bad_request"

    done = http.post(up("env", uid) + "/commit", headers={"x-content-hash": f"blake3:{b3(data)}"})
    assert done.status_code == 201, done.text
    assert done.json() == {"path": "big/file.bin", "hash": b3(data), "length": len(data)}
    assert done.headers["etag"] == f'"blake3:{b3(data)}"'
    got = http.get("/v1/environments/env/resources/big/file.bin")
    assert got.status_code == 200 and got.content == data
    assert managed.stat_for_environment("env", "big/file.bin").hash == b3(data)

    # the session is gone once committed
    assert patch(http, "env", uid, len(data), b"more").status_code == 404
    assert http.head(up("env", uid)).status_code == 404
    assert http.post(up("env", uid) + "/commit").status_code == 404
    assert http.delete(up("env", uid)).status_code == 404


def test_known_content_and_small_content_commit(http: httpx.Client) -> None:
    data = rand(2 * MiB)
    assert http.put("/v1/environments/env/resources/first", content=data).status_code == 201
    uid = http.post(up("env"), json={"path": "second"}).json()["upload_id"]
    assert patch(http, "env", uid, 0, data).status_code == 204
    assert http.post(up("env", uid) + "/commit").json()["hash"] == b3(data)
    assert http.get("/v1/environments/env/resources/second").content == data
    # empty and tiny uploads
    for body in (b"", b"tiny"):
        uid = http.post(up("env"), json={"path": f"small/{len(body)}"}).json()["upload_id"]
        if body:
            assert patch(http, "env", uid, 0, body).status_code == 204
        done = http.post(up("env", uid) + "/commit")
        assert done.status_code == 201 and done.json()["length"] == len(body)
        assert http.get(f"/v1/environments/env/resources/small/{len(body)}").content == body


def test_a_commit_whose_bytes_were_lost_is_503_and_keeps_what_survived(
    http: httpx.Client, managed: ManagedStorage
) -> None:
    """Bytes a failover rolled back were answered 400 bad_request (an unmapped storage
    error): the client blamed, no retry. They are the server's trouble: 503 not_durable,
    and the session keeps what a majority still has, to resume from."""
    chunk = managed.resource_storage.chunk_size
    data = rand(3 * chunk)
    uid = http.post(up("env"), json={"path": "lost"}).json()["upload_id"]
    assert patch(http, "env", uid, 0, data).status_code == 204
    session = managed.db["upload_sessions"].find_one({"_id": uid})
    assert session is not None
    managed.db["resources.chunks"].delete_many({"files_id": session["file_id"], "n": {"$gte": 1}})
    refused = http.post(up("env", uid) + "/commit")
    assert refused.status_code == 503, refused.text
    assert error_code(refused) == "not_durable"
    assert f"resume from offset {chunk}" in refused.json()["error"]["message"]
    assert http.get("/v1/environments/env/resources/lost").status_code == 404
    assert offset_of(http, "env", uid) == chunk
    assert patch(http, "env", uid, chunk, data[chunk:]).status_code == 204
    assert http.post(up("env", uid) + "/commit").status_code == 201
    assert http.get("/v1/environments/env/resources/lost").content == data


def test_bad_input(http: httpx.Client) -> None:
    uid = http.post(up("env"), json={"path": "p"}).json()["upload_id"]
    assert patch(http, "env", uid, 0, b"abc").status_code == 204
    for value in ("-1", "abc", "", "1e3", "0x10", "+3", "3.0", "9" * 30, "3 4"):
        response = http.patch(
            up("env", uid), content=b"zzz", headers={**OCTETS, "upload-offset": value}
        )
        assert response.status_code == 400 and error_code(response) == "bad_request", value
    missing = http.patch(up("env", uid), content=b"zzz", headers=OCTETS)
    assert missing.status_code == 400 and error_code(missing) == "bad_request"
    assert offset_of(http, "env", uid) == 3
    for unknown in ("nope", "x" * 200, "%ff", uid + "x"):
        assert http.head(up("env", unknown)).status_code == 404
        assert patch(http, "env", unknown, 0, b"x").status_code == 404
        assert http.post(up("env", unknown) + "/commit").status_code == 404
        assert http.delete(up("env", unknown)).status_code == 404
    # another environment's upload is not found there
    assert http.head(up("other", uid)).status_code == 404
    assert patch(http, "other", uid, 3, b"x").status_code == 404
    assert http.post(up("other", uid) + "/commit").status_code == 404
    assert http.delete(up("other", uid)).status_code == 404
    assert offset_of(http, "env", uid) == 3
    for body in ({"path": "a/../b"}, {"path": "/abs"}, {"path": ""}):
        response = http.post(up("env"), json=body)
        assert response.status_code == 400 and error_code(response) == "invalid_path"
    for raw in (b"{}", b"[]", b'{"path": 5}', b"nope"):
        response = http.post(up("env"), content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 400 and error_code(response) == "bad_request"
    assert http.post(up("bad%2Fenv"), json={"path": "p"}).status_code == 400
    # cancel: the bytes go, the id is unknown from then on, the path never appeared
    assert http.delete(up("env", uid)).status_code == 204
    assert http.head(up("env", uid)).status_code == 404
    assert http.get("/v1/environments/env/resources/p").status_code == 404


def test_size_limit_counts_the_whole_upload(managed: ManagedStorage) -> None:
    with (
        ServerThread(create_app(managed, auth=False, max_size=MiB)) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        uid = http.post(up("env"), json={"path": "p"}).json()["upload_id"]
        assert patch(http, "env", uid, 0, b"a" * (MiB - 10)).status_code == 204
        too_much = patch(http, "env", uid, MiB - 10, b"b" * 11)
        assert too_much.status_code == 413 and error_code(too_much) == "too_large"
        assert patch(http, "env", uid, MiB - 10, b"b" * 10).status_code == 204


def test_tokens_and_environments(managed: ManagedStorage) -> None:
    secret, _ = TokenStore(managed.db).create(env="mine")
    with (
        ServerThread(create_app(managed, auth=True)) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        assert http.post(up("mine"), json={"path": "p"}).status_code == 401
        auth = {"authorization": f"Bearer {secret}"}
        uid = http.post(up("mine"), json={"path": "p"}, headers=auth).json()["upload_id"]
        assert http.head(up("mine", uid), headers=auth).status_code == 204
        assert http.head(up("mine", uid)).status_code == 401
        assert http.head(up("theirs", uid), headers=auth).status_code == 403


@pytest.mark.parametrize("cut", [3_000_777, 7 * MiB])
def test_a_dropped_patch_keeps_what_arrived(
    srv: ServerThread, http: httpx.Client, cut: int
) -> None:
    """Every byte that arrived, also less than one 4 MiB fill of the body reader (a
    link that drops before 4 MiB got through once never made progress)."""
    data = rand(12 * MiB + 17)
    uid = http.post(up("env"), json={"path": "dropped"}).json()["upload_id"]
    head = (
        f"PATCH {up('env', uid)} HTTP/1.1\r\nHost: x\r\nUpload-Offset: 0\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(head + data[:cut])
        time.sleep(0.5)
    # the service keeps (checkpoints) what it received before the connection dropped
    assert wait_until(lambda: offset_of(http, "env", uid) == cut, timeout=20)
    kept = offset_of(http, "env", uid)
    assert kept == cut
    assert http.get("/v1/environments/env/resources/dropped").status_code == 404
    assert patch(http, "env", uid, kept, data[kept:]).status_code == 204
    assert http.post(up("env", uid) + "/commit").json()["hash"] == b3(data)
    assert http.get("/v1/environments/env/resources/dropped").content == data


# -- the client -----------------------------------------------------------------------------
class CuttingProxy:
    """A loopback TCP proxy that drops its connection once `cut_after` bytes went upstream.

    Only the first time: connections made after the cut are forwarded in full.
    """

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.sent_up = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            pair = (down, upstream)
            threading.Thread(
                target=self._pump, args=(down, upstream, pair, True), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(upstream, down, pair, False), daemon=True
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: Any, up: bool) -> None:
        try:
            while True:
                data = src.recv(256 * 1024)
                if not data:
                    break
                if up:
                    with self._lock:
                        if self.cuts == 0 and self.sent_up + len(data) >= self.cut_after:
                            self.cuts += 1
                            for s in pair:
                                _kill(s)
                            return
                        self.sent_up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in pair:
                _kill(s)


def _kill(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def test_client_resumes_after_a_cut_connection(
    srv: ServerThread, http: httpx.Client, managed: ManagedStorage
) -> None:
    data = rand(24 * MiB + 5)
    proxy = CuttingProxy(srv.port, cut_after=9 * MiB)
    events: list[tuple[str, int, Any]] = []
    try:
        with CatalogClient(proxy.url) as client:
            result = client.upload(
                "env",
                "resumed.bin",
                io.BytesIO(data),
                resumable=True,
                progress=lambda phase, done, total: events.append((phase, done, total)),
            )
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert (result.hash, result.length, result.deduplicated) == (b3(data), len(data), False)
    resumes = [done for phase, done, _ in events if phase == "resume"]
    assert resumes and 0 < resumes[0] < 9 * MiB
    # What the client had handed out when the cut came: at least the 9 MiB the
    # proxy forwarded, and more by what the sockets between them held then.
    first = next(i for i, (phase, _, _) in enumerate(events) if phase == "resume")
    handed = max(done for phase, done, _ in events[:first] if phase == "upload")
    assert handed >= 9 * MiB
    # Over the wire: all of it once, plus what the service had not kept at the cut
    # (from where it resumed up to `handed`); a restart would re-send all of `handed`.
    assert len(data) < result.bytes_sent < len(data) + handed
    assert http.get("/v1/environments/env/resources/resumed.bin").content == data
    # no session is left behind
    assert managed.db["upload_sessions"].count_documents({}) == 0
    # the dedup workflow still comes first: known content is never sent
    with CatalogClient(srv_url(http)) as client:
        again = client.upload("env", "copy.bin", io.BytesIO(data), resumable=True)
    assert again.deduplicated and again.bytes_sent == 0


HOLDER = r"""
import sys
from pymongo import MongoClient
from catalog import ManagedStorage
from catalog.sessions import SessionStore
from storage import GridFSStorage
uri, name, env, uid = sys.argv[1:5]
db = MongoClient(uri, tz_aware=True)[name]
writer = SessionStore(ManagedStorage(db, GridFSStorage(db), lease=6.0)).open(env, uid)
print("held", flush=True)
sys.stdin.readline()
"""


def test_client_waits_out_a_session_held_by_a_killed_instance(
    mongo_uri: str, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance killed mid-PATCH holds the session until its lease runs out (60 s by
    default); the client gave up after three quick retries (3.5 s) and its upload failed.
    The service says when the lease runs out (Retry-After), and the client waits that long."""
    managed = ManagedStorage(db, GridFSStorage(db), lease=6.0)
    held: list[float] = []
    original = CatalogClient.append_upload

    def killed_first(self: CatalogClient, env: str, uid: str, *args: Any, **kw: Any) -> int:
        if not held:  # an instance claims the session, then dies with it (kill -9)
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLDER, mongo_uri, db.name, env, uid],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
            assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
            holder.kill()
            holder.wait()
            held.append(time.monotonic())
        return original(self, env, uid, *args, **kw)

    monkeypatch.setattr(CatalogClient, "append_upload", killed_first)
    data = rand(3 * MiB)
    with ServerThread(create_app(managed, auth=False)) as server:
        impatient = CatalogClient(server.url, held_wait=0)  # waiting not allowed
        with impatient, pytest.raises(UploadPendingError):
            impatient.upload("env", "impatient", io.BytesIO(data), resumable=True)
        held.clear()
        with CatalogClient(server.url) as client:
            result = client.upload("env", "waited", io.BytesIO(data), resumable=True)
        assert time.monotonic() - held[0] >= 4.0  # it waited for the lease, not 3 retries
        assert result.hash == b3(data)
        assert client_module.CatalogClient(server.url).read("env", "waited") == data


def srv_url(http: httpx.Client) -> str:
    return str(http.base_url).rstrip("/")


def test_client_uses_a_session_above_the_threshold(
    srv: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "RESUMABLE_THRESHOLD", MiB)
    monkeypatch.setattr(client_module, "UPLOAD_PART", 700_000)
    calls: list[str] = []
    original = CatalogClient.create_upload

    def spy(self: CatalogClient, env: str, path: str) -> dict[str, Any]:
        calls.append(path)
        return original(self, env, path)

    monkeypatch.setattr(CatalogClient, "create_upload", spy)
    small, big = rand(MiB), rand(MiB + 1)
    with CatalogClient(srv.url) as client:
        assert client.upload("env", "small", io.BytesIO(small)).bytes_sent == len(small)
        result = client.upload("env", "big", io.BytesIO(big))
        assert result.bytes_sent == len(big) and result.hash == b3(big)
        assert client.read("env", "big") == big
        forced = client.upload("env", "forced", io.BytesIO(rand(10)), resumable=True)
        assert forced.length == 10
    assert calls == ["big", "forced"]


def test_client_session_calls(srv: ServerThread) -> None:
    with CatalogClient(srv.url) as client:
        uid = client.create_upload("env", "p")["upload_id"]
        assert client.append_upload("env", uid, 0, b"hello ", 6) == 6
        with pytest.raises(OffsetMismatchError):
            client.append_upload("env", uid, 0, b"again", 5)
        assert client.upload_offset("env", uid) == 6
        assert client.append_upload("env", uid, 6, b"world", 5) == 11
        assert client.commit_upload("env", uid)["hash"] == b3(b"hello world")
        with pytest.raises(NotFoundError):
            client.upload_offset("env", uid)
        other = client.create_upload("env", "q")["upload_id"]
        client.cancel_upload("env", other)
        with pytest.raises(NotFoundError):
            client.cancel_upload("env", other)


# -- signed URLs ------------------------------------------------------------------------------
def test_signed_urls(managed: ManagedStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RESCAT_SIGNING_SECRET", raising=False)
    data = rand(300_000)
    managed.put_for_environment("env", "dir/a b.bin", io.BytesIO(data))
    secret, _ = TokenStore(managed.db).create(env="env")
    with (
        ServerThread(create_app(managed, auth=True)) as server,
        CatalogClient(server.url, secret) as client,
        httpx.Client() as anon,
    ):
        url = client.sign("env", "dir/a b.bin", expires_in=60)
        assert url.startswith(server.url + "/v1/signed/environments/env/resources/dir/a%20b.bin?")
        got = anon.get(url)
        assert got.status_code == 200 and got.content == data
        etag = got.headers["etag"]
        assert etag == f'"blake3:{b3(data)}"'
        ranged = anon.get(url, headers={"range": "bytes=10-19"})
        assert ranged.status_code == 206 and ranged.content == data[10:20]
        assert ranged.headers["content-range"] == f"bytes 10-19/{len(data)}"
        assert anon.get(url, headers={"if-none-match": etag}).status_code == 304
        head = anon.head(url)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(data))
        assert anon.get(url, headers={"range": f"bytes={len(data)}-"}).status_code == 416
        # tampered: signature, expiry, path, environment, or no signature at all
        parts = urlsplit(url)
        query = dict(p.split("=", 1) for p in parts.query.split("&"))
        base = f"{parts.scheme}://{parts.netloc}"
        flipped = query["signature"][:-1] + ("0" if query["signature"][-1] != "0" else "1")
        for bad in (
            f"{base}{parts.path}?expires={query['expires']}&signature={flipped}",
            f"{base}{parts.path}?expires={int(query['expires']) + 1}"
            f"&signature={query['signature']}",
            f"{base}{parts.path}x?{parts.query}",
            f"{base}{parts.path.replace('/env/', '/env2/')}?{parts.query}",
            f"{base}{parts.path}",
            f"{base}{parts.path}?expires=soon&signature={query['signature']}",
        ):
            refused = anon.get(bad)
            assert refused.status_code == 403, bad
            assert refused.json()["error"]["code"] == "forbidden"
        # a signed URL reads the path's *current* content, and 404 once it is gone
        managed.put_for_environment("env", "dir/a b.bin", io.BytesIO(b"new"))
        assert anon.get(url).content == b"new"
        managed.remove_for_environment("env", "dir/a b.bin")
        assert anon.get(url).status_code == 404
        # expiry
        managed.put_for_environment("env", "short", io.BytesIO(b"short-lived"))
        short = client.sign("env", "short", expires_in=1)
        assert anon.get(short).content == b"short-lived"
        time.sleep(2.1)
        expired = anon.get(short)
        assert expired.status_code == 403 and "expired" in expired.json()["error"]["message"]
        # the driver's redirect (the database's secret) is served as well
        managed.put_for_environment("env", "reg/blob", io.BytesIO(b"layer"))
        driver = StorageDriver(managed, "env", redirect=URLSigner.for_database(managed, server.url))
        assert anon.get(driver.redirect_url("GET", "/reg/blob")).content == b"layer"
        assert anon.head(driver.redirect_url("HEAD", "/reg/blob")).status_code == 200
        # signing needs a token of that environment; bad bodies are 400
        assert (
            anon.post(f"{server.url}/v1/environments/env/sign", json={"path": "a"}).status_code
            == 401
        )
        other = client._http.post("/v1/environments/other/sign", json={"path": "a"})
        assert other.status_code == 403
        for body in (
            {"path": "a/../b"},
            {"path": "a", "method": "PUT"},
            {"path": "a", "expires_in": 0},
            {"path": "a", "expires_in": 10**9},
            {"path": "a", "expires_in": "60"},
        ):
            assert client._http.post("/v1/environments/env/sign", json=body).status_code == 400


# -- real `rescat serve` processes ------------------------------------------------------------
@contextmanager
def serve_logged(mongo_uri: str, database: str, log: Path, **env: str) -> Iterator[str]:
    """`rescat serve --no-auth` with its stderr (the request log) in `log`."""
    port = free_port()
    with open(log, "wb") as err:
        proc = serve_popen(mongo_uri, database, port, "--no-auth", stderr=err, **env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "rescat serve did not start"
            time.sleep(0.1)
        yield url
    finally:
        stop_process(proc, 15)


def test_resume_across_instances(mongo_uri: str, database: str) -> None:
    data = rand(6 * MiB + 3)
    with (
        server_process(mongo_uri, database, "--no-auth") as one,
        server_process(mongo_uri, database, "--no-auth") as two,
        httpx.Client(base_url=one, timeout=60) as a,
        httpx.Client(base_url=two, timeout=60) as b,
    ):
        uid = a.post(up("env"), json={"path": "x/y"}).json()["upload_id"]
        assert patch(b, "env", uid, 0, data[: 4 * MiB + 1]).status_code == 204
        assert offset_of(a, "env", uid) == 4 * MiB + 1
        refused = patch(a, "env", uid, 0, b"zz")
        assert refused.status_code == 409 and error_code(refused) == "offset_mismatch"
        assert patch(b, "env", uid, 4 * MiB + 1, data[4 * MiB + 1 :]).status_code == 204
        assert a.get("/v1/environments/env/resources/x/y").status_code == 404
        done = a.post(up("env", uid) + "/commit", headers={"x-content-hash": b3(data)})
        assert done.status_code == 201, done.text
        assert b.get("/v1/environments/env/resources/x/y").content == data
        assert b.head(up("env", uid)).status_code == 404


def test_signed_urls_across_instances_and_logs(
    mongo_uri: str, database: str, tmp_path: Path
) -> None:
    data = b"signed content " * 1000
    logs = (tmp_path / "one.log", tmp_path / "two.log")
    with (
        serve_logged(mongo_uri, database, logs[0]) as one,
        serve_logged(mongo_uri, database, logs[1]) as two,
    ):
        assert httpx.put(f"{one}/v1/environments/env/resources/s", content=data).status_code == 201
        with CatalogClient(one) as client:
            url = client.sign("env", "s", expires_in=300)
        # the database's secret is shared: the other instance verifies it
        elsewhere = url.replace(one, two)
        assert httpx.get(elsewhere).content == data
        assert httpx.get(url).content == data
        signature = url.rsplit("signature=", 1)[1]
        assert httpx.get(url.replace(signature, "0" * 64)).status_code == 403
    with MongoClient(mongo_uri) as mc:
        secret = str(mc[database]["settings"].find_one({"_id": "signing_secret"})["value"])
    for log in logs:
        text = log.read_text()
        lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
        assert any(x.get("route", "").startswith("/v1/signed/") for x in lines), text
        assert signature not in text and secret not in text

    # RESCAT_SIGNING_SECRET: both instances sign and verify with it, never showing it
    env_secret = "s3cret-" + uuid.uuid4().hex
    with (
        serve_logged(mongo_uri, database, logs[0], RESCAT_SIGNING_SECRET=env_secret) as one,
        serve_logged(mongo_uri, database, logs[1], RESCAT_SIGNING_SECRET=env_secret) as two,
    ):
        with CatalogClient(one) as client:
            url = client.sign("env", "s", expires_in=300)
        assert httpx.get(url.replace(one, two)).content == data
        mine = URLSigner(two, env_secret).sign("GET", "env", "s")
        assert httpx.get(mine).content == data
        theirs = URLSigner(two, secret).sign("GET", "env", "s")
        assert httpx.get(theirs).status_code == 403
        metrics = httpx.get(f"{one}/metrics").text
    for log in logs:
        assert env_secret not in log.read_text()
    assert env_secret not in metrics and secret not in metrics


def test_cli_upload_resumes_through_a_cut(mongo_uri: str, database: str, tmp_path: Path) -> None:
    data = rand(12 * MiB + 1)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    with server_process(mongo_uri, database, "--no-auth") as url:
        proxy = CuttingProxy(int(url.rsplit(":", 1)[1]), cut_after=5 * MiB)
        try:
            run = subprocess.run(
                rescat_command(
                    "upload",
                    "--server",
                    proxy.url,
                    "--resumable",
                    "--json",
                    "env",
                    "b",
                    str(source),
                ),
                capture_output=True,
                text=True,
                env=cli_env(),
                cwd=REPO,
                timeout=120,
            )
        finally:
            proxy.close()
        assert run.returncode == 0, run.stderr
        assert "resuming at " in run.stderr
        result = json.loads(run.stdout)
        assert result["hash"] == b3(data) and not result["deduplicated"]
        assert result["bytes_sent"] > len(data)
        assert httpx.get(f"{url}/v1/environments/env/resources/b").content == data
    assert os.path.exists(source)


def test_random_upload_and_signed_requests_never_get_5xx(
    srv: ServerThread, http: httpx.Client
) -> None:
    """Raw requests (nothing normalized by a client library) at the new routes."""
    import random

    from tests.test_service_fuzz import status_of

    uid = http.post(up("env"), json={"path": "fuzzed"}).json()["upload_id"]
    assert http.put("/v1/environments/env/resources/a", content=b"0123456789").status_code == 201
    rng = random.Random(20261130)
    pieces = [
        uid,
        "x",
        "%00",
        "%ff",
        "..",
        "%2e%2e",
        "a/b",
        "",
        "é",
        "%2f",
        "commit",
        uid + "/commit",
    ]
    headers = [
        ("Upload-Offset", ["0", "-1", "1e9", "", "99999999999999999999", "0, 0", "abc"]),
        ("X-Content-Hash", ["blake3:" + "0" * 64, "md5:1", ""]),
        ("Range", ["bytes=0-1", "bytes=9-1", "bytes=x"]),
        ("Transfer-Encoding", ["chunked"]),
    ]
    bodies = [
        b"",
        b"{}",
        b'{"path": "p"}',
        b'{"path": 5}',
        b"\xff" * 10,
        b'{"path":"a","expires_in":-1}',
    ]
    seen: dict[int, int] = {}
    for _ in range(300):
        env = rng.choice(["env", "other", "%2e", "bad%2Fenv"])
        route = rng.choice(
            [
                f"/v1/environments/{env}/uploads",
                f"/v1/environments/{env}/uploads/{rng.choice(pieces)}",
                f"/v1/environments/{env}/uploads/{rng.choice(pieces)}/commit",
                f"/v1/environments/{env}/sign",
                f"/v1/signed/environments/{env}/resources/a?expires=1&signature={rng.choice(pieces)}",
                f"/v1/signed/environments/{env}/resources/{rng.choice(pieces)}",
            ]
        )
        method = rng.choice(["GET", "HEAD", "POST", "PATCH", "DELETE", "PUT"])
        body = rng.choice(bodies)
        lines = [f"{method} {route} HTTP/1.1", "Host: x", "Connection: close"]
        chosen = rng.sample(headers, rng.randint(0, 3))
        for name, values in chosen:
            if name != "Transfer-Encoding":
                lines.append(f"{name}: {rng.choice(values)}")
        lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
        status = status_of(srv.port, raw)
        seen[status] = seen.get(status, 0) + 1
        assert status < 500, f"{status} for {raw!r}"
    assert seen.get(400, 0) > 20 and seen.get(404, 0) > 5 and seen.get(403, 0) > 5


def test_every_way_of_upload_gives_the_paths_revision(srv: ServerThread) -> None:
    """UploadResult.revision was None whatever the service answered: after a PUT (which
    sent X-Revision), a proof of access and a resumable upload (which sent none)."""
    with CatalogClient(srv.url) as client:
        data = rand(2 * MiB)
        results = [
            client.upload("env", "put", io.BytesIO(data)),
            client.upload("env", "proved", io.BytesIO(data)),
            client.upload("env", "resumed", io.BytesIO(rand(MiB)), resumable=True),
        ]
        assert [r.deduplicated for r in results] == [False, True, False]
        for result in results:
            assert result.revision is not None
            assert result.revision == client.stat("env", result.path)["revision"]


def test_an_abandoned_upload_session_shows_in_the_paths_history(
    http: httpx.Client, managed: ManagedStorage
) -> None:
    """A streamed PUT that breaks off shows as `upload failed`; an upload session cancelled
    (HTTP DELETE, a driver writer's cancel) or reclaimed by gc left no trace at all."""
    from catalog.sessions import reclaim_sessions

    def failed(path: str) -> int:
        got = http.get(f"/v1/environments/env/history/{path}")
        if got.status_code == 404:
            return 0
        return sum(i["event"] == "upload" and i["state"] == "failed" for i in got.json()["items"])

    uid = http.post(up("env"), json={"path": "cancelled"}).json()["upload_id"]
    assert patch(http, "env", uid, 0, b"some bytes").status_code == 204
    assert failed("cancelled") == 0
    assert http.delete(up("env", uid)).status_code == 204
    assert failed("cancelled") == 1
    writer = StorageDriver(managed, "env").writer("/dropped")
    writer.write(b"x")
    writer.cancel()
    assert failed("dropped") == 1
    uid = http.post(up("env"), json={"path": "forgotten"}).json()["upload_id"]
    assert patch(http, "env", uid, 0, b"left behind").status_code == 204
    assert reclaim_sessions(managed, max_age=0) == 1
    assert failed("forgotten") == 1


def test_a_signed_url_ends_with_the_revocation_of_its_token(managed: ManagedStorage) -> None:
    """A contractor's token signed a 7-day URL, was revoked (401), and the URL still read
    what the team wrote to that path afterwards. The URL is bound to the token now."""
    tokens = TokenStore(managed.db)
    contractor, info = tokens.create(env="team")
    team, _ = tokens.create(env="team")
    with ServerThread(create_app(managed, auth=True)) as server:
        auth = {"authorization": f"Bearer {contractor}"}
        signed = httpx.post(
            f"{server.url}/v1/environments/team/sign",
            json={"path": "config/db-password", "expires_in": 7 * 86400},
            headers=auth,
        )
        url = signed.json()["url"]
        assert f"by={info.id}" in url
        put = httpx.put(
            f"{server.url}/v1/environments/team/resources/config/db-password",
            content=b"old",
            headers={"authorization": f"Bearer {team}"},
        )
        assert put.status_code == 201
        assert httpx.get(url).content == b"old"
        tampered = url.replace(f"by={info.id}", "by=someone-else")
        assert httpx.get(tampered).status_code == 403  # the token id is signed too
        tokens.revoke(info.id)
        refused = httpx.get(url)
        assert refused.status_code == 403 and "revoked" in refused.json()["error"]["message"]
        assert httpx.head(url).status_code == 403
        # A URL signed where no token is asked for (--no-auth, the database's signer) is
        # bound to none.
        plain = URLSigner.for_database(managed, server.url).sign(
            "GET", "team", "config/db-password"
        )
        assert "by=" not in plain and httpx.get(plain).status_code == 200
