"""The admin CLI on a real mongod: output formats, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import pytest
from click.testing import CliRunner
from pymongo.database import Database

import cli.main  # noqa: F401  (registers every command)
from catalog.clock import utcnow
from cli.app import cli as rescat
from cli.main import main

RESCAT = str(Path(sys.executable).with_name("rescat"))
ADMIN_COMMANDS = [
    ["put"],
    ["get"],
    ["rm"],
    ["mv"],
    ["cp"],
    ["ls"],
    ["stat"],
    ["stats"],
    ["env"],
    ["env", "ls"],
    ["gc"],
    ["fsck"],
]


@pytest.fixture
def base(mongo_uri: str, db: Database[Any]) -> list[str]:
    return ["--mongo-uri", mongo_uri, "--database", db.name]


def invoke(base: list[str], *args: str, input: bytes | None = None) -> Any:
    result = CliRunner().invoke(rescat, [*base, *args], input=input, catch_exceptions=False)
    return result


def run_main(capsysbinary: pytest.CaptureFixture[bytes], argv: list[str]) -> tuple[int, bytes, str]:
    """The console script's entry point, in process."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsysbinary.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 1), out, err.decode()


def b3(data: bytes) -> str:
    return str(blake3.blake3(data).hexdigest())


def test_put_get_ls_stat_mv_rm(base: list[str], tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 11)
    src = tmp_path / "app.tar"
    src.write_bytes(data)

    result = invoke(base, "put", "team-a", "charms/app.tar", str(src))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"blake3:{b3(data)}\n"
    result = invoke(base, "put", "team-a", "charms/copy.tar", "-", input=data)
    assert result.stdout == f"blake3:{b3(data)}\n"
    result = invoke(base, "put", "team-a", "notes/readme", "-", "--json", input=b"hello")
    assert json.loads(result.stdout) == {"path": "notes/readme", "hash": b3(b"hello"), "length": 5}

    assert invoke(base, "ls", "team-a").stdout.splitlines() == [
        "charms/app.tar",
        "charms/copy.tar",
        "notes/readme",
    ]
    assert invoke(base, "ls", "team-a", "charms/c").stdout == "charms/copy.tar\n"
    assert invoke(base, "ls", "team-b").stdout == ""
    assert json.loads(invoke(base, "ls", "team-b", "--json").stdout) == []
    listing = json.loads(invoke(base, "ls", "team-a", "notes/", "--json").stdout)
    assert listing == [{"path": "notes/readme", "hash": b3(b"hello"), "length": 5}]
    long_listing = invoke(base, "ls", "team-a", "-l").stdout.splitlines()
    day, time, size, unit, digest, name = long_listing[2].split()
    assert (size, unit, digest, name) == ("5", "B", f"blake3:{b3(b'hello')}", "notes/readme")
    assert len(day) == 10 and len(time) == 8  # 2026-11-30 01:38:57 (UTC)
    exact = invoke(base, "ls", "team-a", "-l", "--bytes").stdout.splitlines()
    assert exact[0].split()[2] == str(len(data)) and "MiB" in long_listing[0]

    info = json.loads(invoke(base, "stat", "team-a", "charms/app.tar", "--json").stdout)
    assert {"path", "hash", "length", "revision", "state", "history"} <= set(info)
    assert (info["path"], info["hash"], info["length"]) == ("charms/app.tar", b3(data), len(data))
    assert info["state"] == "ready"
    states = [h["state"] for h in info["history"]]
    assert states[0] == "created" and "ready" in states
    text = invoke(base, "stat", "team-a", "charms/app.tar").stdout
    assert f"hash:          blake3:{b3(data)}" in text
    assert "path created:" in text and "path updated:" in text
    assert "content history (of the stored bytes" in text and "ready" in text

    out = tmp_path / "out.tar"
    result = invoke(base, "get", "team-a", "charms/copy.tar", "-o", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    assert out.read_bytes() == data
    assert invoke(base, "get", "team-a", "charms/app.tar").stdout_bytes == data
    assert {p.name for p in tmp_path.iterdir()} == {"app.tar", "out.tar"}  # no temp file left

    moved = invoke(base, "mv", "team-a", "charms/copy.tar", "charms/v2.tar", "--json")
    assert json.loads(moved.stdout)["path"] == "charms/v2.tar"
    assert invoke(base, "ls", "team-a", "charms/").stdout.splitlines() == [
        "charms/app.tar",
        "charms/v2.tar",
    ]
    assert invoke(base, "rm", "team-a", "charms/app.tar").exit_code == 0
    assert invoke(base, "rm", "team-a", "charms/v2.tar").exit_code == 0
    assert invoke(base, "ls", "team-a").stdout == "notes/readme\n"


def test_stats_env_ls(base: list[str]) -> None:
    shared = os.urandom(100_000)
    for env, path in [("a", "x"), ("a", "y"), ("b", "x")]:
        invoke(base, "put", env, path, "-", input=shared)
    invoke(base, "put", "b", "small", "-", input=b"12345")

    stats = json.loads(invoke(base, "stats", "--json").stdout)
    assert stats["resources"] == 2 and stats["paths"] == 4
    assert stats["logical_bytes"] == 3 * 100_000 + 5
    assert stats["physical_bytes"] == 100_005
    assert stats["dedup_ratio"] == pytest.approx(300_005 / 100_005, rel=1e-3)
    assert {"storage_size", "free_storage_size"} <= set(stats)
    assert "by_env" not in stats

    by_env = json.loads(invoke(base, "stats", "--json", "--by-env").stdout)["by_env"]
    assert [(e["env"], e["paths"], e["logical_bytes"], e["physical_bytes"]) for e in by_env] == [
        ("a", 2, 200_000, 100_000),
        ("b", 2, 100_005, 100_005),
    ]
    text = invoke(base, "stats", "--by-env").stdout
    assert "dedup ratio:" in text and "3.00" in text and "ENV" in text

    envs = json.loads(invoke(base, "env", "ls", "--json").stdout)
    assert envs == [
        {"env": "a", "paths": 2, "bytes": 200_000},
        {"env": "b", "paths": 2, "bytes": 100_005},
    ]
    lines = invoke(base, "env", "ls").stdout.splitlines()
    assert [line.split("\t")[:3] for line in lines] == [["a", "2", "200000"], ["b", "2", "100005"]]


def test_fsck_and_gc(base: list[str], db: Database[Any], tmp_path: Path) -> None:
    invoke(base, "put", "e", "a", "-", input=b"content a")
    invoke(base, "put", "e", "b", "-", input=b"content a")
    result = invoke(base, "fsck", "--grace", "0")
    assert result.exit_code == 0 and "checked 1 resource, 2 paths, 0 files" in result.stdout

    db.catalog.update_one(
        {}, {"$inc": {"refcount": 4}, "$set": {"lease_until": utcnow().replace(year=2000)}}
    )
    db["resources.files"].insert_one(
        {
            "length": 0,
            "chunkSize": 1024,
            "uploadDate": utcnow().replace(year=2000),
            "filename": "stray",
            "metadata": {},
        }
    )
    result = invoke(base, "fsck", "--grace", "0")
    assert result.exit_code == 1
    assert "refcount_mismatch: resource" in result.stdout
    assert "orphan_file: file" in result.stdout and "'stray'" in result.stdout
    assert result.stderr == "rescat: fsck found 2 problems (1 orphan_file, 1 refcount_mismatch)\n"
    report = json.loads(invoke(base, "fsck", "--json", "--grace", "0").stdout)
    assert report["clean"] is False
    assert sorted(p["kind"] for p in report["problems"]) == ["orphan_file", "refcount_mismatch"]

    dry = json.loads(invoke(base, "gc", "--dry-run", "--json", "--grace", "0").stdout)
    assert dry["dry_run"] is True and dry["refcounts_fixed"] == 1 and dry["orphan_files"] == 1
    assert invoke(base, "fsck", "--grace", "0").exit_code == 1  # dry run changed nothing
    text = invoke(base, "gc", "--dry-run", "--grace", "0").stdout
    assert "would reclaim 0 entries" in text and "would: orphan file" in text

    result = invoke(base, "gc", "--grace", "0")
    assert result.exit_code == 0
    assert "refcounts fixed:       1" in result.stdout
    assert "orphan files:          1" in result.stdout
    assert result.stdout.rstrip().endswith("reclaimed 0 entries, 0 bytes (0 B)")
    assert invoke(base, "fsck", "--verify-content").exit_code == 0

    invoke(base, "rm", "e", "a")
    db.paths.delete_many({})  # the last path vanishes without its reference
    db.catalog.update_one({}, {"$set": {"lease_until": utcnow().replace(year=2000)}})
    report = json.loads(invoke(base, "gc", "--json", "--grace", "0").stdout)
    assert (report["entries"], report["bytes"]) == (1, len(b"content a"))


def test_get_detects_corrupt_content(
    base: list[str], db: Database[Any], tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    invoke(base, "put", "e", "a", "-", input=b"precious bytes")
    db["catalog"].update_one({}, {"$set": {"data": b"precious bytez"}})  # small: inline
    out = tmp_path / "out"
    code, stdout, err = run_main(capsysbinary, [*base, "get", "e", "a", "-o", str(out)])
    assert code == 1 and stdout == b""
    assert err.startswith("rescat: a: stored bytes hash to ") and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["get", "e", "missing"],
        ["stat", "e", "missing"],
        ["rm", "e", "missing"],
        ["mv", "e", "missing", "dst"],
        ["stat", "bad env", "x"],
        ["ls", ".."],
        ["put", "e/x", "p", "-"],
        ["get", "e", "/abs"],
        ["mv", "e", "a", "b/../c"],
        ["ls", "e", "bad\x01prefix"],
        ["put", "e", "p", "/nonexistent/file"],
        ["put", "e", "p"],
        ["get", "e", "x", "-o", "/nonexistent/dir/file"],
        ["gc", "--grace", "-5"],
        ["fsck", "--bogus"],
        ["no-such-command"],
        ["stats", "extra"],
    ],
)
def test_failures_are_one_line(
    base: list[str], capsysbinary: pytest.CaptureFixture[bytes], args: list[str]
) -> None:
    if args[:2] == ["get", "e"] and args[2] == "x":
        invoke(base, "put", "e", "x", "-", input=b"x")
    code, out, err = run_main(capsysbinary, [*base, *args])
    assert code != 0
    assert out == b""
    assert err.startswith("rescat: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ADMIN_COMMANDS, ids=" ".join)
def test_help_has_an_example(command: list[str]) -> None:
    result = CliRunner().invoke(rescat, [*command, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.stdout
    assert "rescat " + command[0] in result.stdout.split("Example:")[1]


def test_console_script(mongo_uri: str, db: Database[Any], tmp_path: Path) -> None:
    """The installed `rescat`, configured through its environment variables."""
    env = {**os.environ, "RESCAT_MONGO_URI": mongo_uri, "RESCAT_DATABASE": db.name}
    data = os.urandom(2 * 1024 * 1024 + 5)

    def rescat_run(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [RESCAT, *args], input=input, capture_output=True, env=env, timeout=60
        )

    put = rescat_run("put", "e", "dir/file", "-", input=data)
    assert put.returncode == 0 and put.stderr == b""  # no progress bar off a terminal
    assert put.stdout == f"blake3:{b3(data)}\n".encode()
    get = rescat_run("get", "e", "dir/file")
    assert get.returncode == 0 and get.stderr == b"" and get.stdout == data

    missing = rescat_run("stat", "e", "nope")
    assert missing.returncode == 1 and missing.stdout == b""
    assert missing.stderr == b"rescat: e: no such path 'nope'\n"
    usage = rescat_run("ls")
    assert usage.returncode == 2 and usage.stderr.count(b"\n") == 1
    assert b"Traceback" not in usage.stderr

    db["resources.chunks"].delete_many({"n": 1})
    fsck = rescat_run("fsck")
    assert fsck.returncode == 1 and b"missing_chunk" in fsck.stdout
    assert fsck.stderr == b"rescat: fsck found 1 problem (1 missing_chunk)\n"
    assert rescat_run("get", "e", "dir/file", "-o", str(tmp_path / "x")).returncode == 1
    assert not (tmp_path / "x").exists()


def test_stat_shows_repairs_in_the_history(base: list[str], db: Database[Any]) -> None:
    invoke(base, "put", "e", "a", "-", input=b"history")
    invoke(base, "put", "e", "b", "-", input=b"history")
    db.catalog.update_one(
        {}, {"$inc": {"refcount": 1}, "$set": {"lease_until": utcnow().replace(year=2000)}}
    )
    assert invoke(base, "gc", "--grace", "0").exit_code == 0
    info = json.loads(invoke(base, "stat", "e", "a", "--json").stdout)
    assert [h["state"] for h in info["history"]][-1] == "recounted"
    assert invoke(base, "stat", "e", "a").stdout.rstrip().endswith("recounted")


def test_debug_shows_the_exception(base: list[str]) -> None:
    from catalog import NotFoundError

    with pytest.raises(NotFoundError):
        main([*base, "--debug", "stat", "e", "missing"])


def test_mv_and_cp_into_a_folder(base: list[str]) -> None:
    invoke(base, "put", "e", "dir/a.txt", "-", input=b"a")
    moved = invoke(base, "mv", "e", "dir/a.txt", "other/", "--json")
    assert moved.exit_code == 0, moved.output
    assert json.loads(moved.stdout)["path"] == "other/a.txt"
    copied = invoke(base, "cp", "e", "other/a.txt", "deep/er/", "--json")
    assert json.loads(copied.stdout)["path"] == "deep/er/a.txt"
    assert invoke(base, "cp", "e:other/a.txt", "f:").exit_code == 0  # ENV2: alone: the top
    assert invoke(base, "mv", "e", "deep/er/a.txt", "/").exit_code == 0  # `/`: the top
    assert invoke(base, "ls", "e").stdout.splitlines() == ["a.txt", "other/a.txt"]
    assert invoke(base, "ls", "f").stdout == "a.txt\n"
