"""Issue 14: no file is ever damaged: pipes read to EOF, special targets written through,
regular targets replaced atomically with the umask's mode, downloads resume only their own
partial file, and every bad input is one line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from catalog import ManagedStorage
from service.app import create_app
from tests.test_service_support import ServerThread

RESCAT = str(Path(sys.executable).with_name("rescat"))


def b3(data: bytes) -> str:
    return str(blake3.blake3(data).hexdigest())


def run(
    env: dict[str, str], *args: str, input: bytes | None = None, shell: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    if shell is not None:
        return subprocess.run(
            ["bash", "-c", shell], input=input, capture_output=True, env=env, timeout=60
        )
    return subprocess.run([RESCAT, *args], input=input, capture_output=True, env=env, timeout=60)


def one_line_error(done: subprocess.CompletedProcess[bytes]) -> str:
    assert done.returncode != 0, done
    err = done.stderr.decode()
    assert err.startswith("rescat: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# -- defect 1: pipes as FILE ------------------------------------------------------------
def test_put_reads_pipes_and_fifos_to_eof(
    env: dict[str, str], managed: ManagedStorage, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    source = tmp_path / "f"
    source.write_bytes(data)
    env = {**env, "RESCAT": RESCAT, "SRC": str(source)}
    for name, shell in [
        ("subst", '"$RESCAT" put e subst <(cat "$SRC")'),
        ("stdin", 'cat "$SRC" | "$RESCAT" put e stdin /dev/stdin'),
        ("dash", 'cat "$SRC" | "$RESCAT" put e dash -'),
        ("redirect", '"$RESCAT" put e redirect /dev/stdin < "$SRC"'),
    ]:
        done = run(env, shell=shell.replace("subst", name, 1) if name == "subst" else shell)
        assert done.returncode == 0, (name, done.stderr)
        assert done.stdout == f"blake3:{b3(data)}\n".encode(), name
        assert managed.stat_for_environment("e", name).length == len(data), name

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as w:
            w.write(data)

    writer = threading.Thread(target=feed)
    writer.start()
    done = run(env, "put", "e", "fifo", str(fifo))
    writer.join(10)
    assert done.returncode == 0, done.stderr
    reader, length = managed.get_for_environment("e", "fifo")
    assert length == len(data) and reader.read() == data


# -- defect 2: get -o never replaces what it did not create ------------------------------
def test_get_to_devices_fifos_links_and_with_the_umask(
    env: dict[str, str], managed: ManagedStorage, tmp_path: Path
) -> None:
    import io

    data = os.urandom(200_000)
    managed.put_for_environment("e", "x", io.BytesIO(data))

    done = run(env, "get", "e", "x", "-o", "/dev/null")
    assert done.returncode == 0, done.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    done = run(env, "get", "e", "x", "-o", str(fifo))
    reader.join(10)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and got == [data]

    real = tmp_path / "real.bin"
    real.write_bytes(b"old")
    real.chmod(0o640)
    link = tmp_path / "link.bin"
    link.symlink_to(real.name)
    done = run(env, "get", "e", "x", "-o", str(link))
    assert done.returncode == 0, done.stderr
    assert link.is_symlink() and real.read_bytes() == data
    assert stat.S_IMODE(real.stat().st_mode) == 0o640  # a replaced file keeps its mode

    dangling = tmp_path / "dangling"
    dangling.symlink_to("made-by-get")
    assert run(env, "get", "e", "x", "-o", str(dangling)).returncode == 0
    assert dangling.is_symlink() and (tmp_path / "made-by-get").read_bytes() == data

    new = tmp_path / "new.bin"
    done = run(env, shell=f'umask 027; exec "{RESCAT}" get e x -o "{new}"')
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(new.stat().st_mode) == 0o640  # 0666 & ~027, not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir() if "rescat" in p.name] == []  # no temp left


def test_failing_get_keeps_an_existing_empty_file(env: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    one_line_error(run(env, "get", "e", "missing", "-o", str(empty)))
    assert empty.exists() and empty.read_bytes() == b""
    assert [p.name for p in tmp_path.iterdir() if "rescat" in p.name] == []


# -- defects 2, 3, 7 over HTTP ------------------------------------------------------------
@pytest.fixture
def server(managed: ManagedStorage) -> Iterator[ServerThread]:
    with ServerThread(create_app(managed, auth=False)) as srv:
        yield srv


@pytest.fixture
def http_env(tmp_path: Path, server: ServerThread) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RESCAT_")}
    return {
        **base,
        "RESCAT_SERVER": server.url,
        "RESCAT_CONFIG": str(tmp_path / "no-config.toml"),
        # upload/download never touch a database: a broken one proves it.
        "RESCAT_MONGOD": "/nonexistent/mongod",
        "RESCAT_DATA_DIR": str(tmp_path / "no-data"),
    }


def test_download_never_damages_the_target(
    http_env: dict[str, str], managed: ManagedStorage, tmp_path: Path
) -> None:
    import io

    data = os.urandom(1_500_000)
    managed.put_for_environment("e", "app.tar", io.BytesIO(data))

    # An older, different app.tar (shorter, then longer) is replaced whole, atomically.
    for old in (os.urandom(700_000), os.urandom(2_000_000)):
        target = tmp_path / "app.tar"
        target.write_bytes(old)
        done = run(http_env, "download", "e", "app.tar", "-o", str(target))
        assert done.returncode == 0, done.stderr
        assert target.read_bytes() == data

    # A failed download leaves an existing empty file (and /dev/null) alone.
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    one_line_error(run(http_env, "download", "e", "missing", "-o", str(empty)))
    assert empty.exists()
    one_line_error(run(http_env, "download", "e", "missing", "-o", "/dev/null"))
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert run(http_env, "download", "e", "app.tar", "-o", "/dev/null").returncode == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)

    new = tmp_path / "fresh"
    done = run(http_env, shell=f'umask 022; exec "{RESCAT}" download e app.tar -o "{new}"')
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(new.stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*rescat*"))
    assert not (tmp_path / "no-data").exists()


def test_upload_messages_and_pipes(
    http_env: dict[str, str], managed: ManagedStorage, tmp_path: Path
) -> None:
    missing_upload = one_line_error(run(http_env, "upload", "e", "p", "missing.txt"))
    missing_put = one_line_error(
        run(
            {**http_env, "RESCAT_MONGO_URI": "mongodb://127.0.0.1:1"},
            "put",
            "e",
            "p",
            "missing.txt",
        )
    )
    assert missing_upload == missing_put and "missing.txt" in missing_upload

    data = os.urandom(400_000)
    source = tmp_path / "f"
    source.write_bytes(data)
    env = {**http_env, "RESCAT": RESCAT, "SRC": str(source)}
    for name, shell in [
        ("subst", '"$RESCAT" upload e subst <(cat "$SRC")'),
        ("stdin", 'cat "$SRC" | "$RESCAT" upload e stdin /dev/stdin'),
        ("dash", 'cat "$SRC" | "$RESCAT" upload e dash -'),
    ]:
        done = run(env, shell=shell)
        assert done.returncode == 0, (name, done.stderr)
        assert done.stdout == f"blake3:{b3(data)}\n".encode(), name
        assert managed.stat_for_environment("e", name).length == len(data), name


# -- defect 8: names say the rule -----------------------------------------------------------
def test_invalid_names_state_the_rule(env: dict[str, str]) -> None:
    err = one_line_error(run(env, "get", "e", "/abs"))
    assert "no leading '/'" in err and "empty" not in err
    err = one_line_error(run(env, "get", "e", "a//b"))
    assert "empty segment" in err
    err = one_line_error(run(env, "get", "e", "a/../b"))
    assert "'.' or '..'" in err
    err = one_line_error(subprocess.run([RESCAT.encode(), b"get", b"e", b"bad\xffname"],
                                        capture_output=True, env=env, timeout=60))  # fmt: skip
    assert "not valid UTF-8" in err and "0xff" in err and "control" not in err
    err = one_line_error(run(env, "get", "e", "tab\there"))
    assert "control character" in err
    err = one_line_error(run(env, "ls", "bad env"))
    assert "A-Z a-z 0-9 . _ -" in err


# -- review: flags and names that said nothing ---------------------------------------------
def test_put_r_refuses_json_and_token_ls_lists(env: dict[str, str], tmp_path: Path) -> None:
    """`put -r --json` took the flag and printed plain lines; `token ls` was no command."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"a")
    err = one_line_error(run(env, "put", "-r", "e", "j/", str(tmp_path / "d"), "--json"))
    assert "--json is for one file, not -r" in err
    assert run(env, "ls", "e").stdout == b""  # refused before anything was copied
    created = run(env, "token", "create", "--env", "e")
    assert created.returncode == 0, created.stderr
    token_id = created.stderr.decode().split()[3]
    listed = run(env, "token", "ls")
    assert listed.returncode == 0 and listed.stdout == run(env, "token", "list").stdout
    assert token_id in listed.stdout.decode()


def test_get_r_of_slash_is_the_whole_environment(env: dict[str, str], tmp_path: Path) -> None:
    """`ls ENV /` lists the whole environment; `get -r ENV / DIR` said 'invalid prefix'."""
    (tmp_path / "a").write_bytes(b"one")
    assert run(env, "put", "e", "top", str(tmp_path / "a")).returncode == 0
    assert run(env, "put", "e", "d/x", str(tmp_path / "a")).returncode == 0
    got = run(env, "get", "-r", "e", "/", str(tmp_path / "out"))
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "out" / "top").read_bytes() == b"one"
    assert (tmp_path / "out" / "d" / "x").read_bytes() == b"one"
    # rm -r still never empties a whole environment.
    err = one_line_error(run(env, "rm", "-r", "e", "/"))
    assert "never empties a whole environment" in err


def test_put_into_a_folder_keeps_the_file_name(env: dict[str, str], tmp_path: Path) -> None:
    """`put ENV folder/ FILE` said 'invalid path'; aws s3 cp puts FILE into the folder."""
    (tmp_path / "app.tar").write_bytes(b"tar")
    done = run(env, "put", "e", "charms/", str(tmp_path / "app.tar"))
    assert done.returncode == 0, done.stderr
    assert run(env, "get", "e", "charms/app.tar", "-o", "-").stdout == b"tar"
    err = one_line_error(run(env, "put", "e", "charms/", "-", input=b"x"))
    assert "stdin has no name" in err
