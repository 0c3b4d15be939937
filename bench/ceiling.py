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

    python -m bench.ceiling --port 8099 --mode null|pymongo|async|asyncput [--mongo-uri URI]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import blake3
import httpx
from bson import Binary, ObjectId, Timestamp
from pymongo import AsyncMongoClient, MongoClient, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.collection import Collection
from pymongo.database import Database

from catalog.mongod import free_port, stop_process
from service.server import Limits, run

BODY = os.urandom(4096)


MODES = ("null", "pymongo", "async", "asyncput")


def make_app(mode: str, uri: str | None) -> Any:
    pool = ThreadPoolExecutor(64)
    docs: Collection[Any] | None = None
    adocs: Any = None
    put_hook: Callable[[str, bytes], Awaitable[Any]] | None = None
    if mode == "pymongo":
        docs = MongoClient(uri)["bench_ceiling"]["docs"]
        docs.create_index("key")
    elif mode == "async":
        MongoClient(uri)["bench_ceiling"]["docs"].create_index("key")
        adocs = AsyncMongoClient(uri)["bench_ceiling"]["docs"]
    elif mode == "asyncput":
        put_hook = _asyncio_small_put(uri)
        MongoClient(uri)["bench_ceiling"]["docs"].create_index("key")
        adocs = AsyncMongoClient(uri)["bench_ceiling"]["docs"]
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
            elif put_hook is not None:
                await put_hook(key, body)
            elif adocs is not None:
                await adocs.insert_one({"key": key, "data": body})
            status, out, kind = 201, answer, b"application/json"
        else:
            if docs is not None:
                await loop.run_in_executor(pool, docs.find_one, {"key": key})
            elif adocs is not None:
                await adocs.find_one({"key": key})
            status, out, kind = 200, BODY, b"application/octet-stream"
        headers = [(b"content-type", kind), (b"content-length", str(len(out)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": out})

    return app


class _LoopBatcher:
    """Group commit on the event loop: what catalog.groupcommit does, with no thread handoff."""

    def __init__(self, run_batch: Callable[[list[Any]], Awaitable[list[Any]]]) -> None:
        self._run_batch = run_batch
        self._queue: list[tuple[Any, asyncio.Future[Any]]] = []
        self._inflight = 0
        self._leaders: set[asyncio.Task[None]] = set()

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((item, future))
        if self._inflight < 2:
            leader = loop.create_task(self._lead())
            self._leaders.add(leader)
            leader.add_done_callback(self._leaders.discard)
        return await future

    async def _lead(self) -> None:
        while self._queue and self._inflight < 2:
            batch, self._queue = self._queue[:64], self._queue[64:]
            self._inflight += 1
            try:
                results = await self._run_batch([item for item, _ in batch])
                for (_, future), result in zip(batch, results, strict=True):
                    future.set_result(result)
            except Exception as exc:
                for _, future in batch:
                    future.set_exception(exc)
            finally:
                self._inflight -= 1


def _asyncio_small_put(uri: str | None) -> Callable[[str, bytes], Awaitable[Any]]:
    """The database work of rescat's small PUT and nothing else, batched on asyncio.

    A reference taken on the content (an upsert, as rescat's batched refs), the
    path inserted with a server-filled revision and read back, in group
    commits on the loop with AsyncMongoClient: the least a service must pay
    for what rescat's PUT answers, with none of its checks, history or routing.
    """
    sync: Database[Any] = MongoClient(uri)["bench_ceiling_put"]
    sync["entries"].create_index("hash", unique=True)
    sync["paths"].create_index([("env", 1), ("path", 1)], unique=True)
    sync["paths"].create_index([("env", 1), ("rev", 1)])
    sync["paths"].create_index("hash")
    db: AsyncDatabase[Any] = AsyncMongoClient(uri)["bench_ceiling_put"]

    async def take_refs(docs: list[dict[str, Any]]) -> list[None]:
        ops = [
            UpdateOne(
                {"hash": d["hash"]},
                {"$inc": {"refs": 1}, "$setOnInsert": {"length": d["length"], "data": d["data"]}},
                upsert=True,
            )
            for d in docs
        ]
        await db["entries"].bulk_write(ops, ordered=False)
        return [None] * len(docs)

    async def insert_paths(docs: list[dict[str, Any]]) -> list[Any]:
        await db["paths"].insert_many(docs, ordered=False)
        ids = [d["_id"] for d in docs]
        found = {d["_id"]: d async for d in db["paths"].find({"_id": {"$in": ids}}, {"rev": 1})}
        return [found[i]["rev"] for i in ids]

    refs, paths = _LoopBatcher(take_refs), _LoopBatcher(insert_paths)

    async def put(key: str, body: bytes) -> Any:
        digest = blake3.blake3(body).hexdigest()
        now = datetime.datetime.now(datetime.timezone.utc)
        await refs.submit({"hash": digest, "length": len(body), "data": Binary(body)})
        event = {"event": "create", "at": now, "hash": digest}
        path = {"_id": ObjectId(), "env": "e", "path": key, "hash": digest}
        return await paths.submit({**path, "rev": Timestamp(0, 0), "events": [event]})

    return put


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
    parser.add_argument("--mode", choices=MODES, default="null")
    parser.add_argument("--mongo-uri", default=None)
    args = parser.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    run(make_app(args.mode, args.mongo_uri), sock, Limits(), log_level="warning")


if __name__ == "__main__":
    main()
