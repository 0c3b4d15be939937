"""Helpers for the service tests: a real uvicorn on loopback, in a thread or a subprocess.

(No tests here; the service and client test modules import it.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from catalog.mongod import free_port, stop_process

REPO = Path(__file__).resolve().parent.parent


class ServerThread:
    """uvicorn serving `app` on a free loopback port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            log_config=None,
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def rescat_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cli.main import main; main()", *args]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RESCAT_MONGO_URI", None)
    env.pop("RESCAT_TOKEN", None)
    env.pop("RESCAT_SERVER", None)
    env.update(extra)
    return env


def serve_popen(
    mongo_uri: str, database: str, port: int, *extra: str, stderr: Any = None, **env: str
) -> subprocess.Popen[bytes]:
    """`rescat serve --port PORT EXTRA...` started (not waited for); stderr discarded
    unless given."""
    return subprocess.Popen(
        rescat_command(
            "--mongo-uri", mongo_uri, "--database", database, "serve", "--port", str(port), *extra
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if stderr is None else stderr,
        env=cli_env(**env),
        cwd=REPO,
    )


@contextmanager
def server_process(mongo_uri: str, database: str, *extra: str) -> Iterator[str]:
    """`rescat serve` as a subprocess; yields its URL once /healthz answers."""
    port = free_port()
    proc = serve_popen(mongo_uri, database, port, *extra, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"rescat serve exited: {err}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("rescat serve did not start")
            time.sleep(0.1)
        yield url
    finally:
        stop_process(proc, 15)
        if proc.stderr:
            proc.stderr.close()


def wait_until(predicate: Any, timeout: float = 15.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
