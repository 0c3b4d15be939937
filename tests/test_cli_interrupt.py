"""Ctrl-C during `put -r`, `get -r` and `sync` stops the transfer (a real `rescat` process).

Ctrl-C sends SIGINT to the terminal's process group: the test starts `rescat`
in a group of its own and signals the group, once the first file is through.
What finished before the signal stays, queued files never start, files in
flight are cancelled, and what the command printed is exactly what it copied.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo.database import Database

from catalog import ManagedStorage
from tests.test_service_support import server_process, wait_until

RESCAT = str(Path(sys.executable).with_name("rescat"))
FILES = 12
SIZE = 16 * 1024 * 1024  # long enough per file that the signal lands while most wait


@pytest.fixture(params=["database", "http"])
def env(
    request: pytest.FixtureRequest, mongo_uri: str, db: Database[Any], tmp_path: Path
) -> Iterator[dict[str, str]]:
    """A real `rescat` process on the test database, directly or through `rescat serve`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RESCAT_")}
    base["RESCAT_CONFIG"] = str(tmp_path / "no-config.toml")
    if request.param == "database":
        yield {**base, "RESCAT_MONGO_URI": mongo_uri, "RESCAT_DATABASE": db.name}
        return
    with server_process(mongo_uri, db.name, "--no-auth", "--log-level", "warning") as url:
        yield {**base, "RESCAT_SERVER": url}


def interrupt_after_first(
    env: dict[str, str], args: list[str], first_done: Callable[[], bool]
) -> subprocess.CompletedProcess[str]:
    """Run `rescat ARGS`; SIGINT its process group (what Ctrl-C does) once `first_done()`."""
    proc = subprocess.Popen(
        [RESCAT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # a process group of its own, as a shell job has
    )
    try:
        assert wait_until(first_done, timeout=60, interval=0.01), "no file was ever copied"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=20)  # "promptly": never the whole queue
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line(err: str) -> None:
    """One line on stderr (after the newline that ends the terminal's ^C)."""
    assert err.strip().startswith("rescat: ") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err


def test_ctrl_c_stops_put_r(env: dict[str, str], managed: ManagedStorage, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(FILES):
        (src / f"f{i:02}").write_bytes(os.urandom(SIZE))

    def stored() -> list[str]:
        return managed.list_for_environment("e", "t/")

    done = interrupt_after_first(env, ["put", "-r", "-j", "2", "e", "t/", str(src)], stored)
    assert done.returncode == 130, done.stderr
    one_line(done.stderr)
    kept = stored()
    assert 1 <= len(kept) <= 4, kept  # the queue never started: far fewer than 12
    reported = sorted(line.rsplit(" -> e:", 1)[1] for line in done.stdout.splitlines())
    assert reported == kept  # the output says exactly what was stored
    for path in kept:  # each one whole
        assert managed.stat_for_environment("e", path).length == SIZE


def test_ctrl_c_stops_get_r(env: dict[str, str], managed: ManagedStorage, tmp_path: Path) -> None:
    data = {f"f{i:02}": os.urandom(SIZE) for i in range(FILES)}
    for name, content in data.items():
        managed.put_for_environment("e", f"t/{name}", io.BytesIO(content))
    out = tmp_path / "out"

    def written() -> list[str]:
        return sorted(p.name for p in out.glob("f*")) if out.is_dir() else []

    done = interrupt_after_first(env, ["get", "-r", "-j", "2", "e", "t/", str(out)], written)
    assert done.returncode == 130, done.stderr
    one_line(done.stderr)
    kept = written()
    assert 1 <= len(kept) <= 4, kept
    # No partial file where a file goes, nor a temporary one; over HTTP only the hidden
    # `.NAME.HASH.rescat-part` that a later run resumes from (README: local files).
    left = [
        n for n in os.listdir(out) if not n.endswith(".rescat-part") or "RESCAT_MONGO_URI" in env
    ]
    assert sorted(left) == kept
    for name in kept:
        assert (out / name).read_bytes() == data[name]
    reported = sorted(Path(line.rsplit(" -> ", 1)[1]).name for line in done.stdout.splitlines())
    assert reported == kept
