"""Issue 14: whole directories (put -r, get -r, rm -r, sync) and object-store listings."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from pymongo.database import Database

import cli.main  # noqa: F401  (registers every command)
from catalog import ManagedStorage, NotFoundError
from cli.app import cli as rescat


@pytest.fixture
def base(mongo_uri: str, db: Database[Any], tmp_path: Path, monkeypatch: Any) -> list[str]:
    monkeypatch.setenv("RESCAT_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.delenv("RESCAT_PROFILE", raising=False)
    return ["--mongo-uri", mongo_uri, "--database", db.name]


def invoke(base: list[str], *args: str) -> Result:
    return CliRunner().invoke(rescat, [*base, *args])


def error(result: Result) -> str:
    """What `rescat` prints for a failure: click's own, or main()'s one line for the rest."""
    assert result.exit_code != 0
    return result.output + (str(result.exception) if result.exception else "")


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


FILES = {
    "top.txt": b"top",
    "a/one.bin": os.urandom(150_000),
    "a/b/two.bin": os.urandom(70_000),
    "a/b/empty": b"",
    "c/same": b"dup",
    "c/same-too": b"dup",
}


def test_put_r_get_r_round_trip(base: list[str], managed: ManagedStorage, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, FILES)
    result = invoke(base, "put", "-r", "e", "pre/", str(src))
    assert result.exit_code == 0, result.output
    assert managed.list_for_environment("e") == sorted(f"pre/{rel}" for rel in FILES)
    total = sum(map(len, FILES.values()))
    assert result.stderr == f"rescat: {len(FILES)} copied ({total} bytes), 0 unchanged, 0 deleted\n"

    # Nothing changed: nothing moves (equal by BLAKE3), and revisions stay.
    revision = managed.stat_for_environment("e", "pre/top.txt").revision
    again = invoke(base, "put", "-r", "e", "pre", str(src))
    assert again.exit_code == 0 and again.stdout == ""
    assert f"0 copied (0 bytes), {len(FILES)} unchanged" in again.stderr
    assert managed.stat_for_environment("e", "pre/top.txt").revision == revision

    out = tmp_path / "out"
    got = invoke(base, "get", "-r", "e", "pre", str(out))
    assert got.exit_code == 0, got.output
    assert tree(out) == FILES
    assert invoke(base, "get", "-r", "e", "pre/a", str(tmp_path / "sub")).exit_code == 0
    assert tree(tmp_path / "sub") == {
        "one.bin": FILES["a/one.bin"],
        "b/two.bin": FILES["a/b/two.bin"],
        "b/empty": b"",
    }

    # A folder prefix respects segments: pre/a never means pre/ab.
    managed.put_for_environment("e", "pre/ab", io.BytesIO(b"neighbour"))
    assert "ab" not in tree(tmp_path / "sub")
    removed = invoke(base, "rm", "-r", "e", "pre/a")
    assert removed.exit_code == 0, removed.output
    assert managed.list_for_environment("e", "pre/a") == ["pre/ab"]
    missing = invoke(base, "rm", "-r", "e", "pre/a")
    assert missing.exit_code != 0


def test_sync_both_ways_dry_run_and_delete(
    base: list[str], managed: ManagedStorage, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_tree(src, FILES)
    dry = invoke(base, "sync", str(src), "e:site/", "--dry-run")
    assert dry.exit_code == 0 and dry.stdout.count("(dry run) upload: ") == len(FILES)
    assert managed.list_for_environment("e") == []  # a dry run changes nothing

    assert invoke(base, "sync", str(src), "e:site", "-j", "3").exit_code == 0
    (src / "top.txt").write_bytes(b"changed")
    (src / "a" / "one.bin").unlink()
    (src / "new").write_bytes(b"new")
    result = invoke(base, "sync", str(src), "e:site")
    assert result.exit_code == 0, result.output
    assert sorted(result.stdout.splitlines()) == [
        f"upload: {src / 'new'} -> e:site/new",
        f"upload: {src / 'top.txt'} -> e:site/top.txt",
    ]
    assert "site/a/one.bin" in managed.list_for_environment("e")  # no --delete: kept
    result = invoke(base, "sync", str(src), "e:site", "--delete")
    assert result.stdout == "delete: e:site/a/one.bin\n"
    assert "site/a/one.bin" not in managed.list_for_environment("e")

    # Remote to local: only what differs moves; --delete removes local extras.
    dst = tmp_path / "dst"
    make_tree(dst, {"top.txt": b"changed", "stale": b"old", "a/b/two.bin": b"other"})
    result = invoke(base, "sync", "e:site/", str(dst), "--delete")
    assert result.exit_code == 0, result.output
    assert tree(dst) == tree(src)
    lines = sorted(result.stdout.splitlines())
    assert f"delete: {dst / 'stale'}" in lines
    assert not any("top.txt" in line for line in lines)  # equal: skipped

    usage = invoke(base, "sync", str(src), str(dst))
    assert "ENV:PREFIX" in error(usage)


def test_bad_names_stop_before_anything_is_written(
    base: list[str], managed: ManagedStorage, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_tree(src, {"fine.txt": b"ok", "ctl\x01name": b"bad"})
    result = invoke(base, "put", "-r", "e", "p", str(src))
    assert "control character" in error(result)
    assert managed.list_for_environment("e") == []

    # A remote path that is also a folder cannot become a local file and a directory.
    managed.put_for_environment("e", "x/a", io.BytesIO(b"file"))
    managed.put_for_environment("e", "x/a/b", io.BytesIO(b"below"))
    out = tmp_path / "out"
    result = invoke(base, "get", "-r", "e", "x", str(out))
    assert "both a path and a folder" in error(result)
    assert not out.exists()

    not_dir = invoke(base, "put", "e", "p", str(src))
    assert "put -r" in error(not_dir)
    assert invoke(base, "rm", "-r", "e", "/").exit_code != 0
    with pytest.raises(NotFoundError):
        managed.stat_for_environment("e", "p")


def test_ls_long_bytes_and_delimiter(base: list[str], managed: ManagedStorage) -> None:
    for path, data in [
        ("charms/app.tar", os.urandom(3 * 1024 * 1024)),
        ("charms/lib/x", b"x"),
        ("charms/lib/y", b"y"),
        ("charms/zeta/z", b"z"),
        ("readme", b"hello"),
    ]:
        managed.put_for_environment("e", path, io.BytesIO(data))
    folders = invoke(base, "ls", "e", "--delimiter", "/")
    assert folders.stdout.splitlines() == ["charms/", "readme"]
    inner = invoke(base, "ls", "e", "charms/", "-d", "/")
    assert inner.stdout.splitlines() == ["charms/app.tar", "charms/lib/", "charms/zeta/"]
    as_json = json.loads(invoke(base, "ls", "e", "charms/", "-d", "/", "--json").stdout)
    assert as_json[1:] == [{"prefix": "charms/lib/"}, {"prefix": "charms/zeta/"}]
    assert as_json[0]["path"] == "charms/app.tar"

    long_ = invoke(base, "ls", "e", "charms/", "-l", "-d", "/").stdout.splitlines()
    assert "3.0 MiB" in long_[0] and long_[0].endswith("charms/app.tar")
    assert long_[1].split() == ["DIR", "charms/lib/"]
    exact = invoke(base, "ls", "e", "charms/app", "-l", "--bytes").stdout.split()
    assert exact[2] == str(3 * 1024 * 1024)
    assert invoke(base, "ls", "e", "-d", "ab").exit_code != 0


def test_a_failed_copy_is_one_line_and_deletes_nothing(
    base: list[str], managed: ManagedStorage, tmp_path: Path, monkeypatch: Any
) -> None:
    import cli.files

    src = tmp_path / "src"
    make_tree(src, {"ok": b"fine", "broken": b"fails"})
    managed.put_for_environment("e", "d/extra", io.BytesIO(b"stays"))
    real = cli.files._upload_one

    def flaky(managed: ManagedStorage, env: str, path: str, *rest: Any) -> None:
        if path.endswith("broken"):
            raise OSError("disk on fire")
        real(managed, env, path, *rest)

    monkeypatch.setattr(cli.files, "_upload_one", flaky)
    result = invoke(base, "sync", str(src), "e:d", "--delete")
    text = error(result)
    assert "upload broken failed: disk on fire (1 copied" in text and "nothing deleted" in text
    assert managed.list_for_environment("e") == ["d/extra", "d/ok"]

    dry = invoke(base, "sync", str(src), "e:d", "--delete", "--dry-run")
    assert dry.stderr == "rescat: dry run: 1 to copy (5 bytes), 1 unchanged, 1 to delete\n"


def test_put_r_survives_a_symlink_loop(
    base: list[str], managed: ManagedStorage, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_tree(src, {"d/f": b"f"})
    (src / "d" / "loop").symlink_to("..")
    result = invoke(base, "put", "-r", "e", "p", str(src))
    assert result.exit_code == 0, result.output
    assert managed.list_for_environment("e") == ["p/d/f"]
    assert "already walked" in result.stderr


def test_an_empty_source_refuses_and_changes_nothing(
    base: list[str], managed: ManagedStorage, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_tree(src, {"x1": b"1", "x2": b"2"})
    assert invoke(base, "sync", str(src), "e:syn/").exit_code == 0
    local = tmp_path / "local"
    assert invoke(base, "sync", "e:syn", str(local), "--delete").exit_code == 0
    assert tree(local) == {"x1": b"1", "x2": b"2"}

    # A typo in PREFIX (or an empty environment) must not empty the directory.
    for args, said in [
        (["sync", "e:sny/", str(local), "--delete"], "e: nothing at or under 'sny'"),
        (["sync", "e:sny/", str(local), "--delete", "--dry-run"], "nothing at or under 'sny'"),
        (["sync", "other:", str(local), "--delete"], "other: no paths in the environment"),
        (["get", "-r", "e", "nonexist/", str(tmp_path / "out")], "nothing at or under"),
    ]:
        result = invoke(base, *args)
        assert result.exit_code == 1 and said in error(result), args
        assert result.stdout == "", args
        assert tree(local) == {"x1": b"1", "x2": b"2"}, args
    assert not (tmp_path / "out").exists()

    # The other way: a missing or empty directory must not empty the folder.
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, said in [
        (["sync", str(empty), "e:syn/", "--delete"], "no files to copy"),
        (["sync", str(empty), "e:syn/", "--delete", "--dry-run"], "no files to copy"),
        (["sync", str(tmp_path / "missing"), "e:syn/", "--delete"], "no such directory"),
    ]:
        result = invoke(base, *args)
        assert result.exit_code == 1 and said in error(result), args
        assert result.stdout == "", args
        assert managed.list_for_environment("e") == ["syn/x1", "syn/x2"], args
    # Without --delete an empty directory copies nothing and is no error (aws s3 cp/sync).
    for args in (["sync", str(empty), "e:syn/"], ["put", "-r", "e", "syn/", str(empty)]):
        result = invoke(base, *args)
        assert result.exit_code == 0 and "0 copied" in result.stderr, (args, result.output)
        assert managed.list_for_environment("e") == ["syn/x1", "syn/x2"], args


def test_get_r_of_a_file_copies_that_file(
    base: list[str], managed: ManagedStorage, tmp_path: Path
) -> None:
    managed.put_for_environment("e", "dir/a.txt", io.BytesIO(b"a"))
    managed.put_for_environment("e", "dir/a.txt2", io.BytesIO(b"neighbour"))
    out = tmp_path / "out"
    result = invoke(base, "get", "-r", "e", "dir/a.txt", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"download: e:dir/a.txt -> {out / 'a.txt'}\n"
    assert tree(out) == {"a.txt": b"a"}  # by its name, never dir/a.txt2
    again = invoke(base, "sync", "e:dir/a.txt", str(out))
    assert again.exit_code == 0 and "0 copied (0 bytes), 1 unchanged" in again.stderr

    # With --delete, a file is no folder to mirror: refused, nothing changes.
    (out / "other").write_bytes(b"mine")
    refused = invoke(base, "sync", "e:dir/a.txt", str(out), "--delete")
    assert refused.exit_code == 1 and "'dir/a.txt' is a file, not a folder" in error(refused)
    assert tree(out) == {"a.txt": b"a", "other": b"mine"}


def test_ls_slash_is_the_top_level(base: list[str], managed: ManagedStorage) -> None:
    for path in ("charms/app.tar", "charms/lib/x", "readme"):
        managed.put_for_environment("e", path, io.BytesIO(path.encode()))
    everything = invoke(base, "ls", "e", "/")
    assert everything.exit_code == 0, everything.output
    assert everything.stdout.splitlines() == ["charms/app.tar", "charms/lib/x", "readme"]
    folded = invoke(base, "ls", "e", "/", "-d", "/")
    assert folded.stdout.splitlines() == ["charms/", "readme"]
    assert json.loads(invoke(base, "ls", "e", "/", "--json").stdout)[2]["path"] == "readme"

    leading = invoke(base, "ls", "e", "/charms/")
    assert "no leading '/' (write 'charms/')" in error(leading)


def test_rm_and_get_of_a_folder_hint_at_r(
    base: list[str], managed: ManagedStorage, tmp_path: Path
) -> None:
    managed.put_for_environment("e", "dir/a.txt", io.BytesIO(b"a"))
    for args in (["rm", "e", "dir"], ["get", "e", "dir"], ["get", "e", "dir", "-o", "f"]):
        result = invoke(base, *args)
        assert result.exit_code == 1, args
        assert "no such path 'dir'; 'dir' is a folder: use -r" in error(result), args
    assert managed.list_for_environment("e") == ["dir/a.txt"]
    missing = invoke(base, "rm", "e", "nope")
    assert "no such path 'nope'" in error(missing) and "folder" not in error(missing)
    neighbour = invoke(base, "get", "e", "di")  # di/ holds nothing: dir/ is not under it
    assert "folder" not in error(neighbour)
    for verb in ("cp", "mv"):
        result = invoke(base, verb, "e", "dir", "other")
        assert "'dir' is a folder: cp and mv take one path at a time" in error(result), verb
    assert managed.list_for_environment("e") == ["dir/a.txt"]


def test_rm_r_of_a_folder_with_its_slash_keeps_the_path_of_that_name(
    base: list[str], managed: ManagedStorage
) -> None:
    """As `aws s3 rm --recursive s3://b/r/a/`: the key r/a is not under r/a/."""
    for path in ("r/a", "r/a/x", "r/a/y/z", "r/ab"):
        managed.put_for_environment("e", path, io.BytesIO(path.encode()))
    dry = invoke(base, "rm", "-r", "e", "r/a/", "--dry-run")
    assert dry.output.split() == [
        w for p in ("r/a/x", "r/a/y/z") for w in ("(dry", "run)", "delete:", f"e:{p}")
    ]
    assert invoke(base, "rm", "-r", "e", "r/a/").exit_code == 0
    assert managed.list_for_environment("e") == ["r/a", "r/ab"]
    assert "nothing under 'r/a/'" in error(invoke(base, "rm", "-r", "e", "r/a/"))
    assert invoke(base, "rm", "-r", "e", "r/a").exit_code == 0  # no slash: the path too
    assert managed.list_for_environment("e") == ["r/ab"]


def test_sync_delete_never_reaches_outside_the_destination_through_a_link(
    base: list[str], managed: ManagedStorage, tmp_path: Path
) -> None:
    """A link to a directory in the destination is an entry (like rsync), not a way out."""
    outside = tmp_path / "outside"
    make_tree(outside, {"keep.txt": b"precious"})
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "shared").symlink_to(outside)
    managed.put_for_environment("e", "site/index.html", io.BytesIO(b"hello"))

    dry = invoke(base, "sync", "e:site/", str(mirror), "--delete", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "keep.txt" not in dry.output and f"delete: {mirror / 'shared'}" in dry.output
    done = invoke(base, "sync", "e:site/", str(mirror), "--delete")
    assert done.exit_code == 0, done.output
    assert tree(outside) == {"keep.txt": b"precious"}  # the link went, not what it points to
    assert not (mirror / "shared").exists() and tree(mirror) == {"index.html": b"hello"}

    # Files due under a folder that is a link there: refused before anything is written.
    (mirror / "docs").symlink_to(outside)
    managed.put_for_environment("e", "site/docs/a.txt", io.BytesIO(b"a"))
    managed.put_for_environment("e", "site/index.html", io.BytesIO(b"changed"))
    refused = invoke(base, "sync", "e:site/", str(mirror), "--delete")
    assert "is a symbolic link" in error(refused) and "nothing copied or deleted" in error(refused)
    assert tree(outside) == {"keep.txt": b"precious"}
    assert (mirror / "index.html").read_bytes() == b"hello"


def test_a_file_where_a_folder_goes_stops_the_sync_before_anything_is_written(
    base: list[str], managed: ManagedStorage, tmp_path: Path
) -> None:
    for rel, data in (("data/a.txt", b"a"), ("data/sub/b.txt", b"b")):
        managed.put_for_environment("e", rel, io.BytesIO(data))
    dst = tmp_path / "dst"
    make_tree(dst, {"sub": b"in the way"})
    for extra in ([], ["--delete"]):
        result = invoke(base, "sync", "e:data/", str(dst), *extra)
        assert "is a file, where the source's folder sub/ goes" in error(result)
        assert tree(dst) == {"sub": b"in the way"}  # nothing written, nothing deleted
    (dst / "sub").unlink()
    assert invoke(base, "sync", "e:data/", str(dst), "--delete").exit_code == 0
    assert tree(dst) == {"a.txt": b"a", "sub/b.txt": b"b"}


def test_a_partial_download_left_behind_is_not_a_local_extra(
    base: list[str], managed: ManagedStorage, tmp_path: Path
) -> None:
    managed.put_for_environment("e", "site/index.html", io.BytesIO(b"hello"))
    mirror = tmp_path / "m"
    part = f".index.html.{'8e' * 32}.rescat-part"
    make_tree(mirror, {part: b"hel", "stale.txt": b"old"})
    result = invoke(base, "sync", "e:site/", str(mirror), "--delete")
    assert result.exit_code == 0, result.output
    assert "rescat-part" not in result.output
    assert tree(mirror) == {"index.html": b"hello", part: b"hel"}
