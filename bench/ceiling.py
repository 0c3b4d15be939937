"""The ceiling any Python service on this stack can reach: what rescat's HTTP figures are short of.

Serves a minimal ASGI app with exactly the server `rescat serve` runs
(uvicorn, httptools, uvloop, rescat's deadline protocol, see service.server),
so that a benchmark can drive it with the same clients as rescat:

* `--mode null`: PUT reads its body and answers 201 with a small JSON body;
  GET answers 200 with 4 KiB. No database, no thread: the HTTP floor.
* `--mode pymongo`: the same, but a PUT is one `insert_one` and a GET one
  `find_one` (the 4 KiB document), each in a worker thread as rescat's core
  calls are: the floor for a service that does one database call per request.

On a small machine the clients themselves (httpx, about 1 ms of CPU per
request) share the cores with the server and mongod, so these ceilings, not
raw pymongo alone, say how far a server's own cost is from the least possible.

    python -m bench.ceiling --port 8099 --mode null|pymongo [--mongo-uri URI]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from pymongo import MongoClient
from pymongo.collection import Collection

from catalog.mongod import free_port, stop_process
from service.server import Limits, run

BODY = os.urandom(4096)


def make_app(mode: str, uri: str | None) -> Any:
    pool = ThreadPoolExecutor(64)
    docs: Collection[Any] | None = (
        MongoClient(uri)["bench_ceiling"]["docs"] if mode == "pymongo" else None
    )
    answer = json.dumps({"path": "x", "hash": "0" * 64, "length": len(BODY)}).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        loop = asyncio.get_running_loop()
        key = scope["path"]
        if scope["method"] == "PUT":
            if docs is not None:
                await loop.run_in_executor(pool, docs.insert_one, {"key": key, "data": body})
            status, out, kind = 201, answer, b"application/json"
        else:
            if docs is not None:
                await loop.run_in_executor(pool, docs.find_one, {"key": key})
            status, out, kind = 200, BODY, b"application/octet-stream"
        headers = [(b"content-type", kind), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    if docs is not None:
        docs.create_index("key")
    return app


@contextmanager
def ceiling_server(mode: str, uri: str | None = None) -> Iterator[str]:
    """This app in a subprocess on a free loopback port; its URL."""
    port = free_port()
    command = [sys.executable, "-m", "bench.ceiling", "--port", str(port), "--mode", mode]
    if uri is not None:
        command += ["--mongo-uri", uri]
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen(command, cwd=root, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/up", timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the ceiling server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        stop_process(proc, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("null", "pymongo"), default="null")
    parser.add_argument("--mongo-uri", default=None)
    args = parser.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    run(make_app(args.mode, args.mongo_uri), sock, Limits(), log_level="warning")


if __name__ == "__main__":
    main()
