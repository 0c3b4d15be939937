"""`rescat serve` as real processes: two instances on one database, killed clients, the CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import httpx
import pytest
from pymongo import MongoClient

from catalog.proof import ranges_checksum
from tests.test_service_support import REPO, cli_env, rescat_command, server_process, wait_until


def h(data: bytes) -> str:
    return str(blake3.blake3(data).hexdigest())


def rescat(
    *args: str, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        rescat_command(*args),
        capture_output=True,
        text=True,
        env=env or cli_env(),
        cwd=REPO,
        timeout=120,
        **kw,
    )


def test_two_instances_are_one_service(
    mongo_uri: str, database: str, mongo_client: MongoClient[Any]
) -> None:
    db_args = ("--mongo-uri", mongo_uri, "--database", database)
    with server_process(mongo_uri, database) as one, server_process(mongo_uri, database) as two:
        # A token created with the CLI while both run works on both at once.
        created = rescat(*db_args, "token", "create", "--env", "shared")
        assert created.returncode == 0, created.stderr
        token = created.stdout.strip()
        assert token and "\n" not in token
        auth = {"Authorization": f"Bearer {token}"}
        data = os.urandom(700_000)
        base = "/v1/environments/shared"
        r = httpx.put(f"{one}{base}/resources/orig", content=data, headers=auth)
        assert r.status_code == 201

        # A put request made through one instance is answered through the other.
        r = httpx.post(
            f"{one}{base}/put-requests", json={"path": "copy", "hash": h(data)}, headers=auth
        )
        assert r.status_code == 201
        challenge = r.json()
        checksum = ranges_checksum(io.BytesIO(data), [(s, n) for s, n in challenge["ranges"]])
        r = httpx.post(
            f"{two}{base}/put-requests/{challenge['request_id']}/response",
            json={"checksum": checksum},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        assert r.json() == {"path": "copy", "hash": h(data), "length": len(data)}
        assert httpx.get(f"{one}{base}/resources/copy", headers=auth).content == data
        assert httpx.get(f"{two}{base}/resources/copy", headers=auth).content == data
        # ...and the request is used up on both.
        r = httpx.post(
            f"{one}{base}/put-requests/{challenge['request_id']}/response",
            json={"checksum": checksum},
            headers=auth,
        )
        assert r.status_code == 410

        listed = rescat(*db_args, "token", "list", "--json")
        assert listed.returncode == 0
        tokens = json.loads(listed.stdout)
        assert [t["env"] for t in tokens] == ["shared"] and token not in listed.stdout

        revoked = rescat(*db_args, "token", "revoke", tokens[0]["id"])
        assert revoked.returncode == 0, revoked.stderr
        for url in (one, two):
            r = httpx.get(f"{url}{base}/resources", headers=auth)
            assert r.status_code == 401
        stored = mongo_client[database]["tokens"].count_documents({})
        assert stored == 0


KILLED_UPLOADER = """
import sys, time, os, httpx
url, total = sys.argv[1], int(sys.argv[2])
def body():
    yield os.urandom(total // 2)
    print("sent", flush=True)
    time.sleep(600)
httpx.put(url, content=body(), headers={"content-length": str(total)}, timeout=600)
"""


def test_client_killed_mid_upload_leaves_nothing(
    mongo_uri: str, database: str, mongo_client: MongoClient[Any]
) -> None:
    db = mongo_client[database]
    with server_process(mongo_uri, database, "--no-auth") as url:
        total = 40 * 1024 * 1024
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                KILLED_UPLOADER,
                f"{url}/v1/environments/e/resources/k",
                str(total),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "sent"
            assert wait_until(lambda: db["resources.chunks"].count_documents({}) > 0, 20)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()
        assert httpx.get(f"{url}/v1/environments/e/resources/k").status_code == 404
        assert wait_until(lambda: db["resources.chunks"].count_documents({}) == 0, 20)
        assert db["resources.files"].count_documents({}) == 0
        assert db["paths"].count_documents({}) == 0
        assert httpx.get(f"{url}/v1/environments/e/resources").json() == {"items": []}


def test_cli_upload_download(
    mongo_uri: str, database: str, tmp_path: Path, mongo_client: MongoClient[Any]
) -> None:
    data_dir = tmp_path / "rescat-data"
    data_dir.mkdir()
    # upload/download talk HTTP only: with no database configured they must not
    # start (or even look for) the embedded mongod.
    env = cli_env(RESCAT_DATA_DIR=str(data_dir), RESCAT_MONGOD="/nonexistent/mongod")
    db_args = ("--mongo-uri", mongo_uri, "--database", database)
    token = rescat(*db_args, "token", "create", "--env", "cli").stdout.strip()
    admin = rescat(*db_args, "token", "create", "--admin").stdout.strip()
    data = os.urandom(2 * 1024 * 1024 + 1)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    with server_process(mongo_uri, database) as url:
        first = rescat(
            "upload", "--server", url, "--token", token, "cli", "a/b", str(source), env=env
        )
        assert first.returncode == 0, first.stderr
        assert first.stdout == f"blake3:{h(data)}\n"
        second = rescat(
            "upload", "--json", "cli", "a/c", str(source),
            env={**env, "RESCAT_SERVER": url, "RESCAT_TOKEN": token},
        )  # fmt: skip
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout) == {
            "path": "a/c",
            "hash": h(data),
            "length": len(data),
            "deduplicated": True,
            "bytes_sent": 0,
        }
        with open(source, "rb") as piped_in:
            stdin = rescat(
                "upload", "--server", url, "--token", admin, "cli", "a/d", "-", env=env,
                stdin=piped_in,
            )  # fmt: skip
        assert stdin.returncode == 0, stdin.stderr

        out = tmp_path / "out.bin"
        got = rescat(
            "download", "--server", url, "--token", token, "cli", "a/c", "-o", str(out), env=env
        )
        assert got.returncode == 0, got.stderr
        assert out.read_bytes() == data
        piped = subprocess.run(
            rescat_command("download", "--server", url, "--token", token, "cli", "a/d"),
            capture_output=True,
            env=env,
            cwd=REPO,
            timeout=60,
        )
        assert piped.returncode == 0 and piped.stdout == data

        for args, message in (
            (("download", "--server", url, "--token", token, "cli", "missing"), "no such path"),
            (("download", "--server", url, "--token", "wrong", "cli", "a/c"), "token"),
            (("download", "--server", url, "--token", token, "other", "a/c"), "not valid"),
            (("upload", "--server", url, "--token", token, "cli", "../x", str(source)), "invalid"),
            (("download", "--server", "http://127.0.0.1:1", "cli", "a/c"), "127.0.0.1:1"),
        ):
            failed = rescat(*args, env=env)
            assert failed.returncode != 0, args
            assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("rescat: ")
            assert message in failed.stderr, failed.stderr
            assert "Traceback" not in failed.stderr
    assert list(data_dir.iterdir()) == []


def test_help_has_examples() -> None:
    for args in (
        ("serve",),
        ("token",),
        ("token", "create"),
        ("token", "list"),
        ("token", "revoke"),
        ("upload",),
        ("download",),
    ):
        result = rescat(*args, "--help")
        assert result.returncode == 0
        assert "Example" in result.stdout, args
    bad = rescat("token", "create")
    assert bad.returncode != 0 and bad.stderr.startswith("rescat: ")
    bad = rescat("serve", "--max-size", "lots")
    assert bad.returncode != 0 and "lots" in bad.stderr


def test_parse_size() -> None:
    from cli.remote import parse_size

    assert parse_size("1048576") == 1048576
    assert parse_size("512M") == 512 * 1024**2
    assert parse_size("10G") == 10 * 1024**3
    assert parse_size("1.5GiB") == int(1.5 * 1024**3)
    assert parse_size("4k") == 4096
    with pytest.raises(ValueError):
        parse_size("ten")
