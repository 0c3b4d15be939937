"""kill -9 of `rescat serve` while it receives a new upload and a replace.

After a restart: the new path does not exist, the replaced one still holds its
old bytes, each path's history shows the upload `failed` once gc has run (here
the restarted service's own online gc), and fsck is clean.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterator

import httpx
import pytest

from catalog import connect
from catalog.fsck import fsck
from catalog.mongod import free_port, stop_process
from tests.helpers import rand
from tests.test_service_support import REPO, cli_env, rescat_command, wait_until

MiB = 1024 * 1024
LEASE = 2.0
V1 = "/v1/environments/e"
DB = ("--mongo-uri",)
SERVE = ("serve", "--no-auth", "--port")


def start_server(mongo_uri: str, database: str, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        rescat_command(*DB, mongo_uri, "--database", database, *SERVE, str(port), *extra),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cli_env(RESCAT_UPLOAD_LEASE=str(LEASE)),
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, "rescat serve exited"
        try:
            return httpx.get(url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    assert wait_until(healthy, 30, 0.1), "rescat serve did not start"
    return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, 15)


def stalled_upload(url: str, path: str, release: threading.Event) -> threading.Thread:
    """A chunked PUT that sends 24 MiB and then waits (until the server dies)."""

    def body() -> Iterator[bytes]:
        block = os.urandom(MiB)
        for _ in range(24):
            yield block
        release.wait(60)

    def put() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
            httpx.put(f"{url}{V1}/resources/{path}", content=body(), timeout=60)

    thread = threading.Thread(target=put, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_kill_9_during_a_new_upload_and_a_replace(mongo_uri: str, database: str) -> None:
    managed = connect(mongo_uri, database)
    old = rand(MiB)
    proc, url = start_server(mongo_uri, database)
    release = threading.Event()
    try:
        assert httpx.put(f"{url}{V1}/resources/old", content=old, timeout=60).status_code == 201
        uploads = [stalled_upload(url, name, release) for name in ("new", "old")]

        def both_pending() -> bool:
            states = [
                [e["state"] for e in managed.history_for_environment("e", name)]
                for name in ("new", "old")
            ]
            chunks = managed.db["resources.chunks"].count_documents({})
            return all("pending" in s for s in states) and chunks > 4

        assert wait_until(both_pending, 60, 0.05)
        # While the first upload runs, the new path does not exist for readers.
        assert httpx.get(f"{url}{V1}/resources/new").status_code == 404
        pending = httpx.get(f"{url}{V1}/history/new").json()["items"]
        assert [(i["event"], i["state"]) for i in pending] == [("upload", "pending")]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(15)
    finally:
        release.set()
        stop(proc)
    for thread in uploads:
        thread.join(60)

    proc, url = start_server(mongo_uri, database, "--gc-interval", "0.5", "--gc-grace", "0")
    try:
        assert httpx.get(f"{url}{V1}/resources/new").status_code == 404
        got = httpx.get(f"{url}{V1}/resources/old")
        assert got.status_code == 200 and got.content == old

        def failed(name: str) -> list[tuple[str, str]]:
            items = httpx.get(f"{url}{V1}/history/{name}").json()["items"]
            return [(i["event"], i["state"]) for i in items]

        # The dead uploader's lease runs out; the service's online gc marks it failed.
        assert wait_until(lambda: failed("new") == [("upload", "failed")], 30, 0.2), failed("new")
        assert failed("old") == [("create", "ok"), ("upload", "failed")]
        # ... and reclaims the chunks it had written.
        assert wait_until(lambda: fsck(managed, grace=0).clean, 30, 0.5)
        (kept,) = managed.db["resources.files"].find({})  # old's bytes, and nothing else
        others = {"files_id": {"$ne": kept["_id"]}}
        assert managed.db["resources.chunks"].count_documents(others) == 0
        assert managed.list_for_environment("e") == ["old"]
    finally:
        stop(proc)
