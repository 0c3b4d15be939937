"""KV benchmark: catalog.kv against raw pymongo single-document operations, in one run.

    python -m bench.kv [--threads 16] [--seconds 2] [--rounds 3] [--etcd-url URL] [--http]
                       [--put-rate 100]

Six workloads, the first five run by --threads client threads in this process,
every thread on keys of its own (no contention: this measures cost, not
conflicts):

* put: `KVStore.put` of a 128-byte value vs `update_one(upsert)` at w=majority
  (the durability a KV put has);
* get: `KVStore.get` vs `find_one` by _id;
* cas: `get` + `atomic_put(previous)` vs `find_one` + `update_one({_id, rev})`
  at w=majority;
* hot: `put`, but each thread on one key already written HOT_HISTORY times (a
  leader key, a counter: a key with a long history), vs the same raw upsert;
* watch: one `KVStore.watch` per thread on its key; each thread writes its key
  and waits for its own event; the latency from the start of the write to the
  event vs the same over a raw change stream on the raw collection. Also
  printed: the latency from the write's return to the event (how long a
  writer waits for its own event once its write is acknowledged), which
  leaves out the write's own latency under 16 writers. With 16 writers
  saturating the store, a write waits in line: its latency is about 16 over
  the put rate (Little's law), whatever delivering the event costs;
* paced: etcd's own `benchmark watch-latency` (tools/benchmark/cmd/
  watch_latency.go): one writer puts one key at --put-rate puts/s (etcd's
  default, 100) while --threads watches watch it; each event's latency from
  the start of its put (p50/p99) and from the put's return (etcd's tool times
  only this one). The latency a watcher sees under a steady load, not the
  queueing of a saturated one.

Rounds alternate baseline and rescat; the medians of the rounds are printed,
ratios last (throughput ratio: higher is better; latency ratio: lower is
better). With --etcd-url the same workloads also run against etcd's HTTP/JSON
gateway (`/v3/kv/put`, `/v3/kv/range`, `/v3/kv/txn`, `/v3/watch`) with httpx,
and rescat/etcd ratios are printed too.

With --http the same workloads also run over HTTP against a `rescat serve`
subprocess on loopback (the `http` rows), one httpx client per thread: PUT and
GET of the key's path; CAS as GET (its `X-Revision`) then PUT with
`If-Match: "<revision>"` (skipped, and said so, when the service sends no
`X-Revision`: revision CAS is not in that build); watch as one SSE stream
(`GET .../watch?key=K`) per thread, the latency from the start of the PUT to
its event. http/pymongo and http/etcd ratios are printed too, and each http
row the CPU the `rescat serve` process spent per operation (so the watch row
less the put row is what delivering one event costs the service).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import blake3
import httpx
import psutil
from pymongo import MongoClient, WriteConcern

from bench.mongo import throwaway_mongod
from catalog import ManagedStorage
from catalog.kv import KVStore
from catalog.mongod import free_port
from storage import GridFSStorage

VALUE_BYTES = 128
# The watches last: their streams stay open until the system is closed.
WORKLOADS = ("put", "get", "cas", "hot", "watch", "paced")
LATENCY_WORKLOADS = ("watch", "paced")
HOT_HISTORY = 300  # writes of a hot key before it is measured


# -- the harness ------------------------------------------------------------------------
Lag = tuple[float, float]  # a watch op: from the start of its write, and from its return


def run_threads(
    threads: int, seconds: float, make: Callable[[int], Callable[[int], Lag | None]]
) -> dict[str, float]:
    """Each thread calls its op in a loop for `seconds`; ops/s and latency quantiles.

    An op may return its own latencies (watch: from the start of the write to
    the event, and from the write's return to the event, `ack_p50_ms`);
    otherwise its wall time counts.
    """
    ops = [make(n) for n in range(threads)]
    latencies: list[list[float]] = [[] for _ in range(threads)]
    after_ack: list[list[float]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def worker(n: int) -> None:
        op, lat, acks = ops[n], latencies[n], after_ack[n]
        barrier.wait()
        i = 0
        while time.perf_counter() < stop_at[0]:
            start = time.perf_counter()
            own = op(i)
            if own is None:
                lat.append(time.perf_counter() - start)
            else:
                lat.append(own[0])
                acks.append(own[1])
            i += 1

    pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in pool:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    barrier.wait()
    for t in pool:
        t.join(timeout=seconds + 60)
    elapsed = time.perf_counter() - started
    every = sorted(x for lat in latencies for x in lat)
    if not every:
        return {"ops_s": 0.0, "p50_ms": float("nan"), "p99_ms": float("nan")}
    out = {
        "ops_s": len(every) / elapsed,
        "p50_ms": every[len(every) // 2] * 1000,
        "p99_ms": every[min(len(every) - 1, int(len(every) * 0.99))] * 1000,
    }
    acked = sorted(x for a in after_ack for x in a)
    if acked:
        out["ack_p50_ms"] = acked[len(acked) // 2] * 1000
    return out


def _lags(start: float, acked: float) -> Lag:
    """A watch op's latencies, now that its event came: from its write's start and return.

    The second is how long a writer waits for its own event once its write is
    acknowledged (an event already there by then counts as about 0): the
    delivery, without the write's own latency under 16 writers.
    """
    now = time.perf_counter()
    return now - start, now - acked


def value(n: int, i: int) -> bytes:
    head = f"{n}:{i}:".encode()
    return head + os.urandom(VALUE_BYTES - len(head))


def digest(data: bytes) -> str:
    """How a watch event is matched to its write (the HTTP watch sends the BLAKE3 hash)."""
    return blake3.blake3(data).hexdigest()


# -- rescat ---------------------------------------------------------------------------------
class Rescat:
    name = "rescat"

    def __init__(self, uri: str, threads: int) -> None:
        self.client: MongoClient[Any] = MongoClient(uri, tz_aware=True, maxPoolSize=threads * 3)
        db = self.client["bench_kv"]
        self.kv = KVStore(ManagedStorage(db, GridFSStorage(db)), "bench")

    def put(self, n: int) -> Callable[[int], None]:
        return lambda i: self._put(f"put/{n}/{i % 16}", value(n, i))

    def _put(self, key: str, data: bytes) -> None:
        self.kv.put(key, data)

    def get(self, n: int) -> Callable[[int], None]:
        for j in range(16):
            self.kv.put(f"get/{n}/{j}", value(n, j))
        return lambda i: self._get(f"get/{n}/{i % 16}")

    def _get(self, key: str) -> None:
        self.kv.get(key)

    def cas(self, n: int) -> Callable[[int], None]:
        key = f"cas/{n}"
        self.kv.put(key, value(n, 0))

        def op(i: int) -> None:
            pair = self.kv.get(key)
            self.kv.atomic_put(key, value(n, i), pair)

        return op

    def digests(self, key: str) -> Iterator[str]:
        items = self.kv.watch(key)
        next(items)  # the current pair: the watch is open

        def changes() -> Iterator[str]:
            for item in items:
                if item is not None:
                    yield digest(item.value)

        return changes()

    def close(self) -> None:
        self.kv.close()
        self.client.drop_database("bench_kv")
        self.client.close()


class RawMongo:
    name = "pymongo"

    def __init__(self, uri: str, threads: int) -> None:
        self.client: MongoClient[Any] = MongoClient(uri, tz_aware=True, maxPoolSize=threads * 3)
        self.coll = self.client["bench_raw"]["kv"].with_options(
            write_concern=WriteConcern("majority")
        )

    def put(self, n: int) -> Callable[[int], None]:
        return lambda i: self._put(f"put/{n}/{i % 16}", value(n, i))

    def _put(self, key: str, data: bytes) -> None:
        self.coll.update_one({"_id": key}, {"$set": {"v": data}}, upsert=True)

    def get(self, n: int) -> Callable[[int], None]:
        for j in range(16):
            self._put(f"get/{n}/{j}", value(n, j))
        return lambda i: self._get(f"get/{n}/{i % 16}")

    def _get(self, key: str) -> None:
        self.coll.find_one({"_id": key})

    def cas(self, n: int) -> Callable[[int], None]:
        key = f"cas/{n}"
        self.coll.update_one({"_id": key}, {"$set": {"v": b"", "rev": 0}}, upsert=True)

        def op(i: int) -> None:
            doc = self.coll.find_one({"_id": key})
            assert doc is not None
            done = self.coll.update_one(
                {"_id": key, "rev": doc["rev"]},
                {"$set": {"v": value(n, i), "rev": doc["rev"] + 1}},
            )
            assert done.modified_count == 1

        return op

    def digests(self, key: str) -> Iterator[str]:
        stream = self.coll.watch([{"$match": {"documentKey._id": key}}])

        def changes() -> Iterator[str]:
            # The value each change wrote (not updateLookup: that reads the key as it is
            # by then, which skips values overwritten meanwhile).
            for change in stream:
                written = change.get("updateDescription", {}).get("updatedFields")
                yield digest((written or change.get("fullDocument") or {}).get("v", b""))

        return changes()

    def close(self) -> None:
        self.client.drop_database("bench_raw")
        self.client.close()


class Etcd:
    """etcd v3 through its HTTP/JSON gateway, one httpx client per thread."""

    name = "etcd"

    def __init__(self, url: str, threads: int) -> None:
        self.url = url.rstrip("/")
        self.local = threading.local()
        self.watchers: list[Any] = []

    def _http(self) -> httpx.Client:
        client = getattr(self.local, "client", None)
        if client is None:
            client = httpx.Client(base_url=self.url, timeout=30)
            self.local.client = client
        return client

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = self._http().post(path, json=body)
        answer.raise_for_status()
        return dict(answer.json())

    def _put(self, key: str, data: bytes) -> dict[str, Any]:
        return self._post("/v3/kv/put", {"key": _b64(key.encode()), "value": _b64(data)})

    def _range(self, key: str) -> dict[str, Any]:
        return self._post("/v3/kv/range", {"key": _b64(key.encode())})

    def put(self, n: int) -> Callable[[int], None]:
        def op(i: int) -> None:
            self._put(f"put/{n}/{i % 16}", value(n, i))

        return op

    def get(self, n: int) -> Callable[[int], None]:
        for j in range(16):
            self._put(f"get/{n}/{j}", value(n, j))

        def op(i: int) -> None:
            self._range(f"get/{n}/{i % 16}")

        return op

    def cas(self, n: int) -> Callable[[int], None]:
        key = f"cas/{n}"
        self._put(key, value(n, 0))

        def op(i: int) -> None:
            kvs = self._range(key)["kvs"]
            txn = {
                "compare": [
                    {
                        "key": _b64(key.encode()),
                        "target": "MOD",
                        "result": "EQUAL",
                        "mod_revision": kvs[0]["mod_revision"],
                    }
                ],
                "success": [
                    {"request_put": {"key": _b64(key.encode()), "value": _b64(value(n, i))}}
                ],
            }
            assert self._post("/v3/kv/txn", txn).get("succeeded") is True

        return op

    def digests(self, key: str) -> Iterator[str]:
        client = httpx.Client(base_url=self.url, timeout=None)
        body = {"create_request": {"key": _b64(key.encode())}}
        response = client.send(client.build_request("POST", "/v3/watch", json=body), stream=True)
        self.watchers.append((client, response))
        lines = response.iter_lines()
        next(lines)  # the "created" answer

        def changes() -> Iterator[str]:
            for line in lines:
                if not line.strip():
                    continue
                for event in json.loads(line).get("result", {}).get("events", []) or []:
                    yield digest(base64.b64decode(event["kv"].get("value", "")))

        return changes()

    def close(self) -> None:
        for client, response in self.watchers:
            response.close()
            client.close()


class RescatHttp:
    """rescat over HTTP: a `rescat serve` subprocess, one httpx client per thread."""

    name = "http"

    def __init__(self, url: str, env: str, pid: int) -> None:
        self.url = url
        self.env = env
        self.service = psutil.Process(pid)  # its CPU per operation is printed
        self.local = threading.local()
        self.clients: list[httpx.Client] = []
        self.watchers: list[Any] = []
        self.cas_supported: bool | None = None
        self.lock = threading.Lock()

    def _http(self) -> httpx.Client:
        client = getattr(self.local, "client", None)
        if client is None:
            client = httpx.Client(base_url=self.url, timeout=30)
            self.local.client = client
            with self.lock:
                self.clients.append(client)
        return client

    def _path(self, key: str) -> str:
        return f"/v1/environments/{self.env}/resources/{key}"

    def _put(self, key: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        answer = self._http().put(self._path(key), content=data, headers=headers)
        if answer.status_code != 201:
            raise RuntimeError(f"PUT {key}: {answer.status_code} {answer.text}")

    def _get(self, key: str) -> httpx.Response:
        answer = self._http().get(self._path(key))
        if answer.status_code != 200:
            raise RuntimeError(f"GET {key}: {answer.status_code}")
        return answer

    def put(self, n: int) -> Callable[[int], None]:
        return lambda i: self._put(f"put/{n}/{i % 16}", value(n, i))

    def get(self, n: int) -> Callable[[int], None]:
        for j in range(16):
            self._put(f"get/{n}/{j}", value(n, j))

        def op(i: int) -> None:
            self._get(f"get/{n}/{i % 16}")

        return op

    def cas(self, n: int) -> Callable[[int], None] | None:
        key = f"cas/{n}"
        self._put(key, value(n, 0))
        if self._get(key).headers.get("x-revision") is None:
            self.cas_supported = False
            return None  # no revision CAS in this build of the service
        self.cas_supported = True

        def op(i: int) -> None:
            revision = self._get(key).headers["x-revision"]
            self._put(key, value(n, i), {"if-match": f'"{revision}"'})

        return op

    def digests(self, key: str) -> Iterator[str]:
        client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(60.0, connect=10.0))
        request = client.build_request(
            "GET", f"/v1/environments/{self.env}/watch", params={"key": key}
        )
        response = client.send(request, stream=True)
        self.watchers.append((client, response))
        lines = response.iter_lines()
        if next(lines) != ": open":  # the watch has read its key: changes from now on come
            raise RuntimeError("the watch did not open")

        def changes() -> Iterator[str]:
            for line in lines:
                if line.startswith("data:"):
                    yield str(json.loads(line[5:])["hash"])

        return changes()

    def end_workload(self) -> None:
        """Close the connections of a workload's threads (the next workload has new threads).

        Left open, each workload's 16 idle keep-alive connections would add up
        to more than the service's per-client cap (64) before they time out.
        """
        with self.lock:
            clients, self.clients = self.clients, []
        for client in clients:
            client.close()
        self.local = threading.local()

    def close(self) -> None:
        for client, response in self.watchers:
            response.close()
            client.close()
        self.end_workload()


@contextlib.contextmanager
def rescat_serve(uri: str, database: str) -> Iterator[tuple[str, int]]:
    """`rescat serve --no-auth` on a free loopback port: its URL and PID (stopped afterwards)."""
    port = free_port()
    command = [
        sys.executable, "-c", "from cli.main import main; main()",
        "--mongo-uri", uri, "--database", database,
        "serve", "--no-auth", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("rescat serve did not start")
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- main -----------------------------------------------------------------------------------
def hot(system: Any, n: int) -> Callable[[int], None]:
    """Thread n's put on its one key, after HOT_HISTORY writes of it (not measured)."""
    key = f"hot/{n}"
    for i in range(HOT_HISTORY):
        system._put(key, value(n, -1 - i))

    def op(i: int) -> None:
        system._put(key, value(n, i))

    return op


def watch(system: Any, n: int) -> Callable[[int], Lag]:
    """Thread n's write of its key and the wait for that write's event on its own watch."""
    key = f"watch/{n}"
    system._put(key, value(n, -1))
    stream = system.digests(key)

    def op(i: int) -> Lag:
        data = value(n, i)
        expected = digest(data)
        start = time.perf_counter()
        system._put(key, data)
        acked = time.perf_counter()
        for seen in stream:
            if seen == expected:
                return _lags(start, acked)
        raise RuntimeError(f"{system.name}: the watch ended")

    return op


def paced(system: Any, watchers: int, seconds: float, rate: float) -> dict[str, float]:
    """etcd's own `benchmark watch-latency`: one writer at `rate` puts/s, `watchers` watches.

    etcd's tool (tools/benchmark/cmd/watch_latency.go) puts one key at a fixed
    rate (default 100/s) while every watcher watches it, and times each event
    from the put's return. Both are printed here: from the put's start (p50_ms)
    and from its return (ack_p50_ms, 0 when the event came first). Unlike the
    watch workload, the writes are not queued behind 16 saturating writers, so
    this is what a watcher waits for a change, not the write's own latency
    under full load.
    """
    key = "paced"
    system._put(key, value(-1, -1))
    with ThreadPoolExecutor(watchers) as pool:
        streams = list(pool.map(lambda _: system.digests(key), range(watchers)))
    data = [value(-1, i) for i in range(max(1, int(seconds * rate)))]
    wanted = [digest(d) for d in data]
    arrivals: list[dict[str, float]] = [{} for _ in streams]

    def read(stream: Iterator[str], seen: dict[str, float]) -> None:
        for got in stream:
            seen.setdefault(got, time.perf_counter())
            if got == wanted[-1]:
                return

    readers = [
        threading.Thread(target=read, args=(stream, seen), daemon=True)
        for stream, seen in zip(streams, arrivals, strict=True)
    ]
    for t in readers:
        t.start()
    writes: list[tuple[float, float]] = []
    began = time.perf_counter()
    for i, d in enumerate(data):
        time.sleep(max(0.0, began + i / rate - time.perf_counter()))
        start = time.perf_counter()
        system._put(key, d)
        writes.append((start, time.perf_counter()))
    elapsed = time.perf_counter() - began
    for t in readers:
        t.join(timeout=30)
    from_start: list[float] = []
    from_ack: list[float] = []
    for seen in arrivals:
        for (start, acked), want in zip(writes, wanted, strict=True):
            if want not in seen:
                raise RuntimeError(f"{system.name}: a paced watcher missed an event")
            from_start.append(seen[want] - start)
            from_ack.append(max(0.0, seen[want] - acked))
    from_start.sort()
    from_ack.sort()
    return {
        "ops_s": len(writes) / elapsed,
        "p50_ms": from_start[len(from_start) // 2] * 1000,
        "p99_ms": from_start[min(len(from_start) - 1, int(len(from_start) * 0.99))] * 1000,
        "ack_p50_ms": from_ack[len(from_ack) // 2] * 1000,
    }


def measure(
    system: Any, workload: str, threads: int, seconds: float, rate: float
) -> dict[str, float] | None:
    """The workload's figures, or None when the system cannot run it (see RescatHttp.cas).

    Each thread's setup (keys written first, streams opened) runs in parallel.
    """
    ops: list[Callable[[int], Lag | None]] = []
    if workload != "paced":
        own: dict[str, Callable[[Any, int], Callable[[int], Any]]] = {"hot": hot, "watch": watch}
        make: Callable[[int], Callable[[int], Lag | None] | None] = (
            functools.partial(own[workload], system)
            if workload in own
            else getattr(system, workload)
        )
        with ThreadPoolExecutor(threads) as pool:
            made = list(pool.map(make, range(threads)))
        if any(op is None for op in made):
            return None
        ops = [op for op in made if op is not None]
    service: psutil.Process | None = getattr(system, "service", None)
    try:
        before = sum(service.cpu_times()[:2]) if service is not None else 0.0
        if workload == "paced":
            result = paced(system, threads, seconds, rate)
        else:
            result = run_threads(threads, seconds, lambda n: ops[n])
        if service is not None:
            used = sum(service.cpu_times()[:2]) - before
            result["service_ms"] = 1000 * used / max(result["ops_s"] * seconds, 1)
        return result
    finally:
        end = getattr(system, "end_workload", None)
        if end is not None:
            end()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--etcd-url", default=None, help="e.g. http://127.0.0.1:2379")
    parser.add_argument("--http", action="store_true", help="also over HTTP (rescat serve)")
    parser.add_argument(
        "--put-rate", type=float, default=100.0, help="the paced watch's puts/s (etcd's default)"
    )
    args = parser.parse_args()

    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    skipped: set[tuple[str, str]] = set()
    with throwaway_mongod() as uri, contextlib.ExitStack() as stack:
        url, pid = stack.enter_context(rescat_serve(uri, "bench_kv_http")) if args.http else ("", 0)
        for round_no in range(args.rounds):
            makers: list[Callable[[], Any]] = [
                lambda: RawMongo(uri, args.threads),
                lambda: Rescat(uri, args.threads),
            ]
            if url:
                makers.append(functools.partial(RescatHttp, url, f"bench{round_no}", pid))
            if args.etcd_url:
                makers.append(lambda: Etcd(args.etcd_url, args.threads))
            for make in makers:
                system = make()
                try:
                    for workload in WORKLOADS:
                        result = measure(
                            system, workload, args.threads, args.seconds, args.put_rate
                        )
                        if result is None:
                            skipped.add((system.name, workload))
                            continue
                        results.setdefault(system.name, {}).setdefault(workload, []).append(result)
                finally:
                    system.close()
        if url:
            with contextlib.suppress(Exception):
                MongoClient(uri).drop_database("bench_kv_http")

    def med(name: str, workload: str, field: str) -> float:
        return statistics.median(r[field] for r in results[name][workload])

    print(
        f"== rescat kv: {args.threads} threads, {args.seconds:.0f}s per workload, "
        f"median of {args.rounds} rounds"
    )
    for name in results:
        for workload in WORKLOADS:
            if workload not in results[name]:
                print(f"   {name:<8} {workload:<6} skipped (revision CAS not in this service)")
                continue
            service = ""
            if "ack_p50_ms" in results[name][workload][0]:
                service = (
                    f"   after the write returned p50 {med(name, workload, 'ack_p50_ms'):6.2f} ms"
                )
            if "service_ms" in results[name][workload][0]:
                service += f"   service CPU {med(name, workload, 'service_ms'):5.2f} ms/op"
            print(
                f"   {name:<8} {workload:<6} {med(name, workload, 'ops_s'):9.0f} ops/s"
                f"   p50 {med(name, workload, 'p50_ms'):7.2f} ms"
                f"   p99 {med(name, workload, 'p99_ms'):7.2f} ms{service}"
            )
    ratios: dict[str, float] = {}
    subjects = [n for n in ("rescat", "http") if n in results]
    for subject in subjects:
        for other in [n for n in results if n not in subjects]:
            for workload in WORKLOADS:
                if workload not in results[subject] or workload not in results[other]:
                    continue
                if workload in LATENCY_WORKLOADS:
                    ratio = med(subject, workload, "p50_ms") / med(other, workload, "p50_ms")
                    label = f"{subject}/{other} {workload} p50 latency (lower is better)"
                else:
                    ratio = med(subject, workload, "ops_s") / med(other, workload, "ops_s")
                    label = f"{subject}/{other} {workload} ops/s (higher is better)"
                ratios[f"{subject}_{other}_{workload}"] = ratio
                print(f"{label:<54} {ratio:7.3f}x")
                if workload == "watch":  # paced: both about 0 (events come before the ack)
                    ratio = med(subject, "watch", "ack_p50_ms") / med(other, "watch", "ack_p50_ms")
                    label = f"{subject}/{other} {workload} p50 after the write returned"
                    ratios[f"{subject}_{other}_{workload}_after_ack"] = ratio
                    print(f"{label:<54} {ratio:7.3f}x")
    print(json.dumps({"results": results, "ratios": ratios, "skipped": sorted(skipped)}))


if __name__ == "__main__":
    main()
