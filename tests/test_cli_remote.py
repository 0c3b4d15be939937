"""Issue 14: every data command over HTTP (--server, a token) against a real `rescat serve`.

Each command's output over HTTP equals its output on the database; a token for
another environment is one line saying what to do; the embedded MongoDB is
never started (RESCAT_MONGOD points nowhere, RESCAT_DATA_DIR stays absent).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import httpx
import pytest
from pymongo.database import Database

from catalog import ManagedStorage
from catalog.tokens import TokenStore
from tests.helpers import gridfs_files
from tests.test_service_support import server_process

RESCAT = str(Path(sys.executable).with_name("rescat"))


def b3(data: bytes) -> str:
    return str(blake3.blake3(data).hexdigest())


def run(
    env: dict[str, str], *args: str, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([RESCAT, *args], input=input, capture_output=True, env=env, timeout=120)


def ok(done: subprocess.CompletedProcess[bytes]) -> bytes:
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[bytes]) -> str:
    assert done.returncode != 0, done
    err = done.stderr.decode()
    assert err.startswith("rescat: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def url(mongo_uri: str, db: Database[Any]) -> Iterator[str]:
    with server_process(mongo_uri, db.name, "--log-level", "warning") as served:
        yield served


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RESCAT_")}
    return {**clean, "RESCAT_CONFIG": str(tmp_path / "no-config.toml")}


@pytest.fixture
def db_env(base: dict[str, str], mongo_uri: str, db: Database[Any]) -> dict[str, str]:
    return {**base, "RESCAT_MONGO_URI": mongo_uri, "RESCAT_DATABASE": db.name}


def http_env(base: dict[str, str], url: str, token: str, tmp_path: Path) -> dict[str, str]:
    return {
        **base,
        "RESCAT_SERVER": url,
        "RESCAT_TOKEN": token,
        # The data commands never touch a database then: a broken one proves it.
        "RESCAT_MONGOD": "/nonexistent/mongod",
        "RESCAT_DATA_DIR": str(tmp_path / "no-data"),
    }


def received_bytes(url: str) -> float:
    """Body bytes the service received for resource PUTs, from its metrics."""
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("rescat_http_received_bytes_total{") and "resources/{path}" in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_each_command_over_http_equals_the_database(
    url: str,
    base: dict[str, str],
    db_env: dict[str, str],
    managed: ManagedStorage,
    tmp_path: Path,
) -> None:
    token = TokenStore(managed.db).create(env="team-a")[0]
    web = http_env(base, url, token, tmp_path)
    data = os.urandom(300_000)
    src = tmp_path / "app.tar"
    src.write_bytes(data)

    assert (
        ok(run(web, "put", "team-a", "charms/app.tar", str(src))) == f"blake3:{b3(data)}\n".encode()
    )
    piped = ok(run(web, "put", "team-a", "notes/readme", "-", "--json", input=b"hello"))
    assert json.loads(piped) == {"path": "notes/readme", "hash": b3(b"hello"), "length": 5}
    ok(run(web, "put", "team-a", "charms/lib/x", "-", input=b"x"))

    # Known content: proved, not sent (0 body bytes).
    before = received_bytes(url)
    ok(run(web, "put", "team-a", "charms/again.tar", str(src)))
    assert received_bytes(url) == before
    files = gridfs_files(managed)
    ok(run(web, "mv", "team-a", "charms/again.tar", "charms/moved.tar"))
    ok(run(web, "cp", "team-a", "charms/moved.tar", "charms/copied.tar"))
    assert gridfs_files(managed) == files
    assert managed.catalog.find(b3(data))
    res = managed.catalog.get(managed.catalog.find(b3(data)))
    assert res.refcount == 3  # app.tar, moved.tar, copied.tar

    reads = [
        ["ls", "team-a"],
        ["ls", "team-a", "charms/"],
        ["ls", "team-a", "--json"],
        ["ls", "team-a", "-l"],
        ["ls", "team-a", "-l", "--bytes"],
        ["ls", "team-a", "--delimiter", "/"],
        ["ls", "team-a", "charms/", "-l", "--delimiter", "/"],
        ["ls", "team-a", "--delimiter", "/", "--json"],
        ["stat", "team-a", "charms/moved.tar"],
        ["stat", "team-a", "charms/moved.tar", "--json"],
        ["get", "team-a", "charms/copied.tar"],
        ["history", "team-a", "charms/moved.tar"],
        ["history", "team-a", "charms/again.tar", "--json"],  # moved away: still kept
    ]
    for args in reads:
        assert ok(run(web, *args)) == ok(run(db_env, *args)), args
    # mv and cp print the destination's stat, as stat does.
    for args in (["mv", "notes/readme", "notes/readme2"], ["cp", "notes/readme2", "n/r"]):
        printed = ok(run(web, args[0], "team-a", *args[1:], "--json"))
        assert printed == ok(run(db_env, "stat", "team-a", args[2], "--json")), args
    assert ok(run(web, "get", "team-a", "charms/copied.tar")) == data
    out = tmp_path / "out.tar"
    ok(run(web, "get", "team-a", "charms/moved.tar", "-o", str(out)))
    assert out.read_bytes() == data
    ok(run(web, "rm", "team-a", "charms/copied.tar"))
    assert ok(run(db_env, "ls", "team-a", "charms/c")) == b""
    assert not (tmp_path / "no-data").exists()


def test_directories_over_http(
    url: str,
    base: dict[str, str],
    db_env: dict[str, str],
    managed: ManagedStorage,
    tmp_path: Path,
) -> None:
    token = TokenStore(managed.db).create(env="e")[0]
    web = http_env(base, url, token, tmp_path)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    files = {"a.bin": os.urandom(100_000), "sub/b.txt": b"bee", "sub/c": b""}
    for rel, content in files.items():
        (tree / rel).write_bytes(content)

    ok(run(web, "put", "-r", "e", "dir/", str(tree)))
    assert ok(run(db_env, "ls", "e")).decode().split() == [f"dir/{r}" for r in sorted(files)]
    # A second sync moves nothing: equal by hash, from the listing.
    before = received_bytes(url)
    done = run(web, "sync", str(tree), "e:dir/")
    assert done.returncode == 0 and "0 copied (0 bytes), 3 unchanged" in done.stderr.decode()
    # New paths to content the service has: proved, no body bytes.
    ok(run(web, "sync", str(tree), "e:copy/"))
    assert received_bytes(url) == before
    assert len(managed.list_for_environment("e", "copy/")) == 3

    fetched = tmp_path / "fetched"
    ok(run(web, "get", "-r", "e", "dir/", str(fetched)))
    assert {
        p.relative_to(fetched).as_posix(): p.read_bytes() for p in fetched.rglob("*") if p.is_file()
    } == files
    (fetched / "sub" / "b.txt").write_bytes(b"changed")
    (fetched / "extra").write_bytes(b"extra")
    done = run(web, "sync", "e:dir/", str(fetched), "--delete")
    assert done.returncode == 0, done.stderr
    assert (fetched / "sub" / "b.txt").read_bytes() == b"bee" and not (fetched / "extra").exists()

    assert ok(run(web, "rm", "-r", "e", "dir/")).decode().count("delete: e:dir/") == 3
    assert managed.list_for_environment("e", "dir/") == []
    assert not (tmp_path / "no-data").exists()


def test_tokens_and_bad_input_are_one_line(
    url: str,
    base: dict[str, str],
    db_env: dict[str, str],
    managed: ManagedStorage,
    tmp_path: Path,
) -> None:
    tokens = TokenStore(managed.db)
    team_a = tokens.create(env="team-a")[0]
    admin = tokens.create(admin=True)[0]
    web = http_env(base, url, team_a, tmp_path)
    ok(run(web, "put", "team-a", "p", "-", input=b"data"))

    for args in (
        ["ls", "team-b"],
        ["stat", "team-b", "p"],
        ["get", "team-b", "p"],
        ["put", "team-b", "p", "-"],
        ["rm", "team-b", "p"],
        ["mv", "team-b", "p", "q"],
        ["cp", "team-a:p", "team-b:p"],
        ["sync", str(tmp_path), "team-b:x/"],
        ["ls", "team-b", "--json"],
    ):
        done = run(web, *args, input=b"x")
        err = one_line_error(done)
        assert "team-b" in err and "token create --env" in err, (args, err)
        assert done.stdout == b"", args
    err = one_line_error(run({**web, "RESCAT_TOKEN": ""}, "ls", "team-a"))
    assert "--token" in err
    err = one_line_error(run({**web, "RESCAT_SERVER": "http://127.0.0.1:1"}, "ls", "team-a"))
    assert "127.0.0.1:1" in err and "RESCAT_SERVER" in err

    # Across environments with a token for both (and directly on the database).
    admin_web = {**web, "RESCAT_TOKEN": admin}
    ok(run(admin_web, "cp", "team-a:p", "team-b:copied"))
    ok(run(db_env, "cp", "team-b:copied", "team-c:again"))
    assert ok(run(admin_web, "get", "team-c", "again")) == b"data"
    ok(run(admin_web, "mv", "team-c:again", "team-b:moved"))
    ok(run(db_env, "mv", "team-b:moved", "team-c:back"))
    assert ok(run(admin_web, "get", "team-c", "back")) == b"data"
    assert managed.list_for_environment("team-b") == ["copied"]

    # Bad input: one line naming it, and nothing written.
    before = {e: managed.list_for_environment(e) for e in ("team-a", "team-b")}
    for args in (
        ["mv", "team-a", "p", "../q"],
        ["cp", "team-a", "p", "a//b"],
        ["cp", "team-a:p", "bad env:q"],
        ["cp", "p", "q"],
        ["mv", "team-a", "missing", "q"],
        ["cp", "team-a", "missing", "q"],
        ["stat", "team-a", "missing"],
        ["ls", "team-a", "--delimiter", "ab"],
    ):
        for env in (web, db_env):
            one_line_error(run(env, *args))
    assert {e: managed.list_for_environment(e) for e in ("team-a", "team-b")} == before
    err = one_line_error(
        run({**web, "RESCAT_TOKEN": admin}, "--mongo-uri", "x", "ls", "e", "--server", url)
    )
    assert "not both" in err
    assert not (tmp_path / "no-data").exists()


def test_profile_server_and_precedence(
    url: str,
    base: dict[str, str],
    mongo_uri: str,
    db: Database[Any],
    managed: ManagedStorage,
    tmp_path: Path,
) -> None:
    token = TokenStore(managed.db).create(env="e")[0]
    managed.put_for_environment("e", "x", __import__("io").BytesIO(b"1"))
    config = tmp_path / "config.toml"
    config.write_text(f'[ci]\nserver = "{url}"\ntoken = "{token}"\nenv = "e"\n')
    env = {
        **base,
        "RESCAT_CONFIG": str(config),
        "RESCAT_MONGOD": "/nonexistent/mongod",
        "RESCAT_DATA_DIR": str(tmp_path / "no-data"),
    }
    assert ok(run(env, "--profile", "ci", "ls")) == b"x\n"
    assert ok(run(env, "--profile", "ci", "get", "x")) == b"1"
    ok(run(env, "--profile", "ci", "cp", "x", "y"))  # ENV from the profile
    ok(run(env, "--profile", "ci", "cp", "e:y", ":dir/z"))
    assert managed.list_for_environment("e") == ["dir/z", "x", "y"]
    # The command line and the environment beat the profile.
    direct = {**env, "RESCAT_MONGO_URI": mongo_uri, "RESCAT_DATABASE": db.name}
    assert ok(run(direct, "--profile", "ci", "ls")) == b"dir/z\nx\ny\n"
    err = one_line_error(run(env, "--profile", "ci", "ls", "--server", "http://127.0.0.1:1"))
    assert "127.0.0.1:1" in err
    assert not (tmp_path / "no-data").exists()


@pytest.mark.parametrize("over_http", [False, True])
def test_conditional_put(
    over_http: bool,
    url: str,
    base: dict[str, str],
    db_env: dict[str, str],
    managed: ManagedStorage,
    tmp_path: Path,
) -> None:
    """put --if-none-match / --if-match REV|blake3:<hex>: checked with the write, both ways."""
    token = TokenStore(managed.db).create(env="e")[0]
    env = http_env(base, url, token, tmp_path) if over_http else db_env
    put = ("put", "e", "cfg", "-")

    def revision() -> int:
        return int(json.loads(ok(run(env, "stat", "e", "cfg", "--json")))["revision"])

    ok(run(env, *put, "--if-none-match", input=b"1"))
    first = revision()
    err = one_line_error(run(env, "put", "e", "cfg", "-", "--if-none-match", input=b"2"))
    assert "exists" in err
    rev = str(first)
    ok(run(env, *put, "--if-match", rev, input=b"2"))
    assert revision() > first
    one_line_error(run(env, "put", "e", "cfg", "-", "--if-match", rev, input=b"3"))  # stale
    by_content = f"blake3:{b3(b'2')}"
    ok(run(env, "put", "e", "cfg", "-", "--if-match", by_content, input=b"3"))
    one_line_error(run(env, "put", "e", "cfg", "-", "--if-match", by_content, input=b"4"))
    assert managed.get_for_environment("e", "cfg")[0].read() == b"3"
    source = tmp_path / "f.bin"
    source.write_bytes(b"3")  # a regular file, content the service has: still conditional
    one_line_error(run(env, "put", "e", "cfg", str(source), "--if-none-match"))
    bad = run(env, "put", "e", "cfg", "-", "--if-match", "nope", input=b"x")
    assert bad.returncode == 2 and b"--if-match" in bad.stderr
    assert managed.get_for_environment("e", "cfg")[0].read() == b"3"
    one_line_error(run(env, "rm", "e", "cfg", "--if-match", rev))  # stale: kept
    assert managed.get_for_environment("e", "cfg")[0].read() == b"3"
    ok(run(env, "rm", "e", "cfg", "--if-match", f"blake3:{b3(b'3')}"))
    assert managed.list_for_environment("e") == []


def test_empty_sources_files_and_folders_over_http(
    url: str, base: dict[str, str], managed: ManagedStorage, tmp_path: Path
) -> None:
    token = TokenStore(managed.db).create(env="e")[0]
    web = http_env(base, url, token, tmp_path)
    ok(run(web, "put", "e", "dir/a.txt", "-", input=b"a"))
    local = tmp_path / "local"
    local.mkdir()
    (local / "mine").write_bytes(b"mine")

    # A prefix with nothing under it never empties the directory.
    err = one_line_error(run(web, "sync", "e:dri/", str(local), "--delete"))
    assert "nothing at or under 'dri'" in err
    assert (local / "mine").read_bytes() == b"mine"
    # An empty directory never empties the folder.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no files to copy" in one_line_error(run(web, "sync", str(empty), "e:dir/", "--delete"))
    assert managed.list_for_environment("e") == ["dir/a.txt"]

    # A prefix naming a file copies that file; a folder given to rm or get hints at -r.
    ok(run(web, "get", "-r", "e", "dir/a.txt", str(local)))
    assert (local / "a.txt").read_bytes() == b"a" and (local / "mine").exists()
    for args in (["rm", "e", "dir"], ["get", "e", "dir"]):
        assert "'dir' is a folder: use -r" in one_line_error(run(web, *args)), args
    assert managed.list_for_environment("e") == ["dir/a.txt"]
    assert not (tmp_path / "no-data").exists()


@pytest.fixture
def other_http(tmp_path: Path) -> Iterator[str]:
    """A web server that is not rescat (python -m http.server's handler, an empty directory)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    (tmp_path / "www").mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_server_url_that_is_not_the_service_root_says_what_to_give(
    url: str, other_http: str, base: dict[str, str], managed: ManagedStorage, tmp_path: Path
) -> None:
    """`--server` at another web server, or at the service with /v1 added, was a bare
    `HTTP 404` / `HTTP 501` / `no such route`: now one line naming the URL and the fix."""
    source = tmp_path / "a"
    source.write_bytes(b"data")
    for server, status, args in [
        (other_http, "HTTP 404", ["ls", "team-a"]),
        (other_http, "HTTP 501", ["put", "team-a", "a", str(source)]),
        (other_http, "HTTP 404", ["get", "team-a", "a"]),
    ]:
        err = one_line_error(run(http_env(base, server, "x", tmp_path), *args))
        assert err == (
            f"rescat: {server} is not a rescat service ({status}); "
            "check --server: give the service root, without /v1\n"
        ), args
    token = TokenStore(managed.db).create(env="team-a")[0]
    for args in (["ls", "team-a"], ["put", "team-a", "a", str(source)], ["stat", "team-a", "a"]):
        err = one_line_error(run(http_env(base, url + "/v1", token, tmp_path), *args))
        assert err == (
            f"rescat: {url}/v1 is not a rescat service (HTTP 404, no such route); "
            f"check --server: give the service root, {url}\n"
        ), args
    assert not (tmp_path / "no-data").exists()  # and no database was started for it


def test_conditional_puts_from_a_pipe_say_the_same_over_http(
    url: str, base: dict[str, str], db_env: dict[str, str], managed: ManagedStorage, tmp_path: Path
) -> None:
    """A piped put streams in one chunked PUT, refused before its body by the service's
    early check, which printed its own generic text ("If-Match does not match the current
    content"); now what the database prints, word for word."""
    token = TokenStore(managed.db).create(env="team-a")[0]
    web = http_env(base, url, token, tmp_path)
    ok(run(db_env, "put", "team-a", "r4/x", "-", input=b"data"))
    revision = managed.stat_for_environment("team-a", "r4/x").revision
    for args in (
        ["r4/x", "-", "--if-none-match"],
        ["r4/x", "-", "--if-match", str(revision + 1)],
        ["r4/missing", "-", "--if-match", str(revision)],
        ["r4/x", "-", "--if-match", "blake3:" + "0" * 64],
    ):
        on_db = one_line_error(run(db_env, "put", "team-a", *args, input=b"other"))
        assert "team-a: " in on_db, on_db
        assert one_line_error(run(web, "put", "team-a", *args, input=b"other")) == on_db, args
    assert managed.stat_for_environment("team-a", "r4/x").revision == revision
