"""Review of the blob-server face: what a demanding client of `rescat serve` runs into.

Each test runs a real `rescat serve` (or the app in a uvicorn thread) on a real mongod.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from catalog.mongod import free_port
from tests.test_service_support import REPO, cli_env, rescat_command, server_process, wait_until

MiB = 1024 * 1024


@pytest.fixture
def database(mongo_client: MongoClient[Any]) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    mongo_client.drop_database(name)


def _serve(mongo_uri: str, database: str, port: int, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        rescat_command(
            "--mongo-uri",
            mongo_uri,
            "--database",
            database,
            "serve",
            "--port",
            str(port),
            "--no-auth",
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=cli_env(**env),
        cwd=REPO,
    )


def test_upload_whose_server_died_is_failed_once_its_lease_ran_out(
    mongo_uri: str, database: str, mongo_client: MongoClient[Any]
) -> None:
    """The contract: an upload whose uploader died becomes `failed` once its lease runs
    out *or* gc runs; without gc, its history said `pending` forever."""
    port = free_port()
    proc = _serve(mongo_uri, database, port, RESCAT_UPLOAD_LEASE="1")
    url = f"http://127.0.0.1:{port}"
    released = threading.Event()
    try:
        assert wait_until(lambda: _healthy(url), 30)

        def body() -> Iterator[bytes]:
            yield b"x" * (6 * MiB)  # past the first fill: a streamed upload, shown as pending
            released.wait(60)

        def upload() -> None:
            try:
                with httpx.Client(timeout=60) as c:
                    c.put(f"{url}/v1/environments/e/resources/big", content=body())
            except httpx.HTTPError:
                pass  # the server is killed under it

        uploader = threading.Thread(target=upload)
        uploader.start()
        history = mongo_client[database]["path_history"]
        assert wait_until(
            lambda: history.find_one({"env": "e", "path": "big", "events.state": "pending"}), 30
        )
        proc.kill()  # the uploader dies: nobody renews the lease, nobody marks it failed
        proc.wait()
        released.set()
        uploader.join(60)
        time.sleep(1.5)  # the 1 s lease has run out (no gc runs in this test)
    finally:
        released.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with server_process(mongo_uri, database, "--no-auth") as url2:
        got = httpx.get(f"{url2}/v1/environments/e/history/big")
        assert got.status_code == 200
        assert [(i["event"], i["state"]) for i in got.json()["items"]] == [("upload", "failed")]
        assert httpx.get(f"{url2}/v1/environments/e/resources/big").status_code == 404
    run = subprocess.run(
        rescat_command("--mongo-uri", mongo_uri, "--database", database, "history", "e", "big"),
        capture_output=True,
        env=cli_env(),
        cwd=REPO,
        check=True,
    )
    assert b"failed" in run.stdout and b"pending" not in run.stdout


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
