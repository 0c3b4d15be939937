"""`rescat kv` on keys of any size (a real `rescat` process): memory stays bounded.

A key is a path, and a path written with `rescat put` may hold hundreds of MiB.
`kv ls` reads no values, `kv get` streams the value as `get` does, and
`--json` writes each value as it reads it: peak RSS stays far below the size
of the value (measured on the process itself with wait4), and the output is
exact (valid JSON whatever the size).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from catalog import ManagedStorage
from catalog.kv import KVStore

RESCAT = str(Path(sys.executable).with_name("rescat"))
BIG = 64 * 1024 * 1024
SLACK = 32 * 1024  # KiB over the process with only small keys (the value: 64 MiB)


# Forks and runs the command, then writes its peak RSS (KiB) to argv[1]. A small parent of
# its own: a child forked from pytest would count pytest's pages (the test's data) as its
# own high-water mark, which exec does not reset.
MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_kib(env: dict[str, str], out: Path, *args: str) -> int:
    """Run `rescat ARGS` with stdout to `out`; its peak RSS in KiB (exit 0 asserted)."""
    report = out.with_name("peak")
    with open(out, "wb") as sink:
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, str(report), RESCAT, *args],
            stdout=sink,
            stderr=subprocess.PIPE,
            env=env,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr.decode()
    return int(report.read_text())


def test_kv_reads_a_big_value_in_bounded_memory(
    env: dict[str, str], managed: ManagedStorage, tmp_path: Path
) -> None:
    store = KVStore(managed, "small")
    store.put("k", b"v")
    store.close()
    out = tmp_path / "out"
    baseline = max(peak_kib(env, out, "kv", "ls", "small", "--json") for _ in range(2))

    data = os.urandom(BIG)
    managed.put_for_environment("e", "big.bin", io.BytesIO(data))
    store = KVStore(managed, "e")
    store.put("note", "héllo".encode())
    store.close()

    assert peak_kib(env, out, "kv", "ls", "e") < baseline + SLACK
    assert out.read_text() == "big.bin\nnote\n"

    assert peak_kib(env, out, "kv", "get", "e", "big.bin") < baseline + SLACK
    assert out.read_bytes() == data

    assert peak_kib(env, out, "kv", "ls", "e", "--json") < baseline + SLACK
    listed = json.loads(out.read_text())
    assert [item["key"] for item in listed] == ["big.bin", "note"]
    big, note = listed
    assert base64.b64decode(big["value_base64"]) == data and "value" not in big
    assert big["length"] == BIG
    assert big["revision"] == managed.stat_for_environment("e", "big.bin").revision
    assert note["value"] == "héllo" and base64.b64decode(note["value_base64"]) == "héllo".encode()

    assert peak_kib(env, out, "kv", "get", "e", "big.bin", "--json") < baseline + SLACK
    assert base64.b64decode(json.loads(out.read_text())["value_base64"]) == data


def test_kv_json_of_a_big_text_value_and_an_empty_listing(
    env: dict[str, str], managed: ManagedStorage, tmp_path: Path
) -> None:
    text = ("grüße, " * 400_000).encode()  # > 1 MiB of UTF-8: written as it is read
    managed.put_for_environment("e", "t/text", io.BytesIO(text))
    out = tmp_path / "out"
    peak_kib(env, out, "kv", "ls", "e", "t", "--json")
    (item,) = json.loads(out.read_text())
    assert item["value"].encode() == text and base64.b64decode(item["value_base64"]) == text
    peak_kib(env, out, "kv", "ls", "e", "nothing", "--json")
    assert out.read_text() == "[]\n"
