"""fsspec filesystem `rescat://`: MongoDB mode in full, HTTP mode for the routes that exist."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator
from typing import Any

import fsspec
import httpx
import pytest
from pymongo.database import Database

from catalog import ManagedStorage
from service.app import create_app
from service.fsspec_fs import RescatFileSystem
from service.signing import URLSigner
from tests.helpers import b3, rand
from tests.test_core_catalog_races import race
from tests.test_service_support import ServerThread

MiB = 1024 * 1024


@pytest.fixture
def fs(mongo_uri: str, db: Database[Any]) -> RescatFileSystem:
    return fsspec.filesystem(
        "rescat", mongo_uri=mongo_uri, database=db.name, skip_instance_cache=True
    )  # type: ignore[no-any-return]


@pytest.fixture
def http_fs(managed: ManagedStorage) -> Iterator[tuple[RescatFileSystem, ManagedStorage]]:
    with ServerThread(create_app(managed, auth=False)) as srv:
        yield (
            fsspec.filesystem("rescat", server=srv.url, skip_instance_cache=True),
            managed,
        )


def test_registered_by_entry_point() -> None:
    assert fsspec.get_filesystem_class("rescat") is RescatFileSystem


def test_pipe_cat_info_ls(fs: RescatFileSystem) -> None:
    data = rand(200_000)
    fs.pipe_file("rescat://env/dir/a.bin", data)
    fs.pipe("env/dir/sub/b.txt", b"hello")
    assert fs.cat_file("rescat://env/dir/a.bin") == data
    assert fs.cat_file("env/dir/a.bin", start=10, end=20) == data[10:20]
    assert fs.cat_file("env/dir/a.bin", start=-5) == data[-5:]
    assert fs.cat_file("env/dir/a.bin", start=len(data) + 5) == b""
    info = fs.info("env/dir/a.bin")
    assert (info["name"], info["size"], info["type"], info["hash"]) == (
        "env/dir/a.bin", len(data), "file", b3(data)
    )  # fmt: skip
    assert fs.info("env/dir")["type"] == "directory"
    assert fs.ls("env/dir", detail=False) == ["env/dir/a.bin", "env/dir/sub"]
    detail = fs.ls("rescat://env/dir")
    assert [(e["name"], e["type"], e["size"]) for e in detail] == [
        ("env/dir/a.bin", "file", len(data)),
        ("env/dir/sub", "directory", 0),
    ]
    assert fs.ls("env/dir/a.bin", detail=False) == ["env/dir/a.bin"]
    assert fs.ls("", detail=False) == ["env"]
    assert fs.exists("env/dir/sub/b.txt") and not fs.exists("env/nope")
    assert fs.isdir("env/dir") and not fs.isdir("env/dir/a.bin")
    assert fs.isfile("env/dir/a.bin")
    assert fs.checksum("env/dir/sub/b.txt") == int(b3(b"hello"), 16)
    assert fs.modified("env/dir/a.bin").tzinfo is not None
    for call in (
        lambda: fs.cat_file("env/missing"),
        lambda: fs.info("env/missing"),
        lambda: fs.ls("env/missing"),
        lambda: fs.open("env/missing", "rb"),
    ):
        with pytest.raises(FileNotFoundError):
            call()


def test_open_read_is_seekable_and_ranged(fs: RescatFileSystem) -> None:
    data = rand(9 * MiB + 3)
    fs.pipe_file("env/big", data)
    with fs.open("env/big", "rb", block_size=MiB) as f:
        assert f.read(10) == data[:10]
        f.seek(5 * MiB)
        assert f.read(100) == data[5 * MiB : 5 * MiB + 100]
        f.seek(-3, 2)
        assert f.read() == data[-3:]


def test_open_write_is_a_session_committed_on_close(
    fs: RescatFileSystem, db: Database[Any]
) -> None:
    data = rand(6 * MiB + 7)
    with fs.open("env/w/out.bin", "wb", block_size=MiB) as f:
        for i in range(0, len(data), 700_000):
            f.write(data[i : i + 700_000])
        assert not fs.exists("env/w/out.bin")  # invisible until commit
    assert fs.cat_file("env/w/out.bin") == data
    assert db["resources.files"].count_documents({}) == 1
    assert db["upload_sessions"].count_documents({}) == 0

    fs.pipe_file("env/w/keep", b"old")

    class Boom(Exception):
        pass

    with pytest.raises(Boom), fs.open("env/w/keep", "wb", block_size=MiB) as f:
        f.write(rand(3 * MiB))
        raise Boom
    assert fs.cat_file("env/w/keep") == b"old"  # discarded on error
    assert db["upload_sessions"].count_documents({}) == 0
    assert db["resources.chunks"].count_documents({}) == 7  # only out.bin's


def test_mv_rm_find_walk_du(fs: RescatFileSystem, db: Database[Any]) -> None:
    for path in ("t/a/1", "t/a/2", "t/a/b/3", "t/a-x/4", "t/c"):
        fs.pipe_file(path, path.encode() * 1000)
    files_before = db["catalog"].count_documents({})
    fs.mv("t/c", "t/moved")
    assert fs.cat_file("t/moved") == b"t/c" * 1000 and not fs.exists("t/c")
    fs.mv("t/a/b", "t/z", recursive=True)
    assert fs.cat_file("t/z/3") == b"t/a/b/3" * 1000 and not fs.exists("t/a/b")
    assert db["catalog"].count_documents({}) == files_before  # repointed, nothing copied
    assert fs.find("t") == ["t/a-x/4", "t/a/1", "t/a/2", "t/moved", "t/z/3"]
    assert fs.find("t", withdirs=True, maxdepth=1) == ["t", "t/a", "t/a-x", "t/moved", "t/z"]
    assert fs.find("t/a/1") == ["t/a/1"]
    walked = list(fs.walk("t"))
    assert walked[0] == ("t", ["a", "a-x", "z"], ["moved"])
    assert fs.du("t") == sum(
        len(p.encode()) * 1000 for p in ("t/a/1", "t/a/2", "t/a/b/3", "t/a-x/4", "t/c")
    )
    with pytest.raises(IsADirectoryError):
        fs.rm("t/a")
    fs.rm("t/a", recursive=True)
    assert fs.find("t") == ["t/a-x/4", "t/moved", "t/z/3"]  # t/a-x stays
    fs.rm(["t/moved", "t/z/3"])
    assert fs.find("t") == ["t/a-x/4"]
    with pytest.raises(FileNotFoundError):
        fs.rm("t/nothing")


def test_copy_and_mv_repoint_across_environments(fs: RescatFileSystem, db: Database[Any]) -> None:
    for path in ("a/src/1", "a/src/2", "a/src/deep/3", "a/srcx/4"):
        fs.pipe_file(path, path.encode() * 1000)
    entries = db["catalog"].count_documents({})
    fs.copy("a/src/1", "b/one")
    assert fs.cat_file("b/one") == b"a/src/1" * 1000 and fs.exists("a/src/1")
    fs.copy("a/src", "b/tree", recursive=True)  # cp -r: b/tree does not exist yet
    assert fs.find("b/tree") == ["b/tree/1", "b/tree/2", "b/tree/deep/3"]
    one = db["catalog"].find_one({"hash": b3(b"a/src/1" * 1000)})
    assert one is not None and one["refcount"] == 3  # a/src/1, b/one, b/tree/1
    fs.mv("b/one", "c/moved")  # across environments, atomically
    assert fs.cat_file("c/moved") == b"a/src/1" * 1000 and not fs.exists("b/one")
    fs.mv("c/moved", "b/tree")  # into an existing directory, as mv does
    assert fs.cat_file("b/tree/moved") == b"a/src/1" * 1000 and not fs.exists("c/moved")
    fs.mv("b/tree/deep", "c/", recursive=True)  # a trailing / means into it
    assert fs.find("c") == ["c/deep/3"] and not fs.exists("b/tree/deep/3")
    assert db["catalog"].count_documents({}) == entries  # references, never bytes
    with pytest.raises(FileNotFoundError):
        fs.copy("a/nothing", "b/x")
    with pytest.raises(IsADirectoryError):
        fs.mv("a/src", "a/dst")  # a directory moves only with recursive=True
    assert fs.find("a") == ["a/src/1", "a/src/2", "a/src/deep/3", "a/srcx/4"]


@pytest.mark.parametrize("over_http", [False, True])
def test_pipe_file_create_is_one_atomic_step(
    over_http: bool, fs: RescatFileSystem, http_fs: tuple[RescatFileSystem, ManagedStorage]
) -> None:
    """mode="create": the existence check is the write's own (of 8 racing creators, one wins)."""
    target = http_fs[0] if over_http else fs
    target.pipe_file("env/new", b"first", mode="create")
    with pytest.raises(FileExistsError):
        target.pipe_file("env/new", b"second", mode="create")
    assert target.cat_file("env/new") == b"first"
    target.pipe_file("env/new", b"third")  # overwrite, the default
    assert target.cat_file("env/new") == b"third"
    with pytest.raises(ValueError):
        target.pipe_file("env/new", b"x", mode="append")

    def create(i: int) -> int:
        target.pipe_file("env/race", f"v{i}".encode(), mode="create")
        return i

    outcomes = race(8, create)
    assert all(isinstance(o, (int, FileExistsError)) for o in outcomes)
    won = [o for o in outcomes if isinstance(o, int)]
    assert len(outcomes) == 8 and len(won) == 1
    assert target.cat_file("env/race") == f"v{won[0]}".encode()


def test_sign_with_database_secret(
    fs: RescatFileSystem, mongo_uri: str, db: Database[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RESCAT_SIGNING_SECRET", raising=False)
    fs.pipe_file("env/s", b"x")
    with pytest.raises(NotImplementedError):
        fs.sign("env/s")
    signed = fsspec.filesystem(
        "rescat",
        mongo_uri=mongo_uri,
        database=db.name,
        base_url="http://svc",
        skip_instance_cache=True,
    )
    url = signed.sign("rescat://env/s", expiration=60)
    query = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
    URLSigner.for_database(signed.managed, "http://svc").verify("GET", "env", "s", query)


def test_pandas_csv_and_parquet(mongo_uri: str, db: Database[Any]) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    options = {"mongo_uri": mongo_uri, "database": db.name}
    frame = pd.DataFrame({"n": list(range(1000)), "s": [f"row {i}" for i in range(1000)]})
    frame.to_csv("rescat://data/tables/t.csv", index=False, storage_options=options)
    frame.to_parquet("rescat://data/tables/t.parquet", storage_options=options)
    back = pd.read_csv("rescat://data/tables/t.csv", storage_options=options)
    assert back.equals(frame)
    back = pd.read_parquet("rescat://data/tables/t.parquet", storage_options=options)
    assert back.equals(frame)
    fs = fsspec.filesystem("rescat", **options)
    assert fs.ls("data/tables", detail=False) == ["data/tables/t.csv", "data/tables/t.parquet"]


def test_http_mode(http_fs: tuple[RescatFileSystem, ManagedStorage]) -> None:
    fs, managed = http_fs
    data = rand(3 * MiB + 5)
    fs.pipe_file("rescat://env/h/a.bin", data)
    assert managed.get_for_environment("env", "h/a.bin")[0].read() == data
    assert fs.cat_file("env/h/a.bin") == data
    assert fs.cat_file("env/h/a.bin", start=100, end=200) == data[100:200]
    assert fs.cat_file("env/h/a.bin", start=-10) == data[-10:]
    with fs.open("env/h/a.bin", "rb", block_size=MiB) as f:
        f.seek(2 * MiB)
        assert f.read(50) == data[2 * MiB : 2 * MiB + 50]
    with fs.open("env/h/sub/w.bin", "wb") as f:
        f.write(b"written over http")
    assert fs.ls("env/h", detail=False) == ["env/h/a.bin", "env/h/sub"]
    assert fs.info("env/h/sub")["type"] == "directory"
    assert fs.info("env/h/a.bin")["size"] == len(data)
    assert fs.checksum("env/h/a.bin") == int(b3(data), 16)
    assert fs.find("env/h") == ["env/h/a.bin", "env/h/sub/w.bin"]
    assert fs.du("env/h") == len(data) + len(b"written over http")
    url = fs.sign("env/h/a.bin", expiration=30)
    assert "/v1/signed/environments/env/resources/h/a.bin?" in url
    assert httpx.get(url, headers={"range": "bytes=5-9"}).content == data[5:10]
    with pytest.raises(FileNotFoundError):
        fs.cat_file("env/h/missing")
    fs.mv("env/h/a.bin", "env/h/b.bin")  # the service's move route: no bytes sent
    assert fs.cat_file("env/h/b.bin") == data and not fs.exists("env/h/a.bin")
    fs.copy("env/h/b.bin", "other/h/c.bin")  # its copy route, across environments
    assert managed.get_for_environment("other", "h/c.bin")[0].read() == data
    fs.mv("env/h/b.bin", "env/h/a.bin")
    with pytest.raises(FileNotFoundError):
        fs.mv("env/h/nothing", "env/h/x")
    with pytest.raises(IsADirectoryError):
        fs.rm("env/h")
    fs.rm("env/h", recursive=True)
    assert managed.list_for_environment("env") == []
    with pytest.raises(FileNotFoundError):
        fs.rm("env/h/a.bin")


# -- what fsspec's own filesystems do, in both modes ------------------------------------
@pytest.fixture(params=["mongo", "http"])
def any_fs(
    request: pytest.FixtureRequest, mongo_uri: str, db: Database[Any], managed: ManagedStorage
) -> Iterator[RescatFileSystem]:
    if request.param == "mongo":
        yield fsspec.filesystem(
            "rescat", mongo_uri=mongo_uri, database=db.name, skip_instance_cache=True
        )
        return
    with ServerThread(create_app(managed, auth=False)) as srv:
        yield fsspec.filesystem("rescat", server=srv.url, skip_instance_cache=True)


def _put(managed: ManagedStorage, env: str, path: str, data: bytes) -> None:
    """Written as the CLI and HTTP write: any path the catalog takes."""
    managed.put_for_environment(env, path, io.BytesIO(data), len(data))


def test_paths_beyond_the_registry_charset(
    any_fs: RescatFileSystem, managed: ManagedStorage
) -> None:
    fs = any_fs
    for path in ("a/ok.txt", "b c/x", "b/y", "b-c", "b!x/z", "é/ü"):
        _put(managed, "sp", path, path.encode())
    assert fs.find("sp") == ["sp/a/ok.txt", "sp/b c/x", "sp/b!x/z", "sp/b-c", "sp/b/y", "sp/é/ü"]
    walked = [(root, sorted(dirs), files) for root, dirs, files in fs.walk("sp")]
    assert walked[0] == ("sp", ["a", "b", "b c", "b!x", "é"], ["b-c"])
    assert fs.cat_file("sp/b c/x") == b"b c/x"
    fs.pipe_file("sp/new file", b"n")
    with fs.open("sp/d e/f g", "wb") as f:
        f.write(b"w")
    assert fs.cat_file("sp/d e/f g") == b"w" and fs.cat_file("sp/new file") == b"n"
    fs.rm("sp/b c", recursive=True)
    assert not fs.exists("sp/b c/x")
    fs.rm("sp", recursive=True)  # every path, not a part of them
    assert managed.list_for_environment("sp") == []


def test_glob_and_find_list_directories_as_fsspec_does(any_fs: RescatFileSystem) -> None:
    fs = any_fs
    mem = fsspec.filesystem("memory", skip_instance_cache=True)
    mem.store.clear()
    mem.pseudo_dirs.clear()
    mem.pseudo_dirs.append("")
    for path in ("E/top.txt", "E/d/s/b.txt", "E/d/a.txt"):
        fs.pipe_file(path, b"x")
        mem.pipe_file("/" + path, b"x")

    def same(call: str, *args: Any, **kwargs: Any) -> None:
        ours = getattr(fs, call)(*args, **kwargs)
        theirs = [p.lstrip("/") for p in getattr(mem, call)("/" + args[0], *args[1:], **kwargs)]
        assert ours == theirs, (call, args, kwargs)

    same("glob", "E/*")
    same("glob", "E/d/*")
    same("glob", "E/**")
    same("find", "E", maxdepth=1, withdirs=True)
    same("find", "E/d", withdirs=True)
    same("find", "E/d", maxdepth=1, withdirs=True)
    # a missing path finds nothing, as in fsspec's own filesystems
    for call in ("glob", "find"):
        same(call, "E/nope/*" if call == "glob" else "E/nope")
    assert fs.glob("E/nope/**") == [] and fs.du("E/nope") == 0


def test_missing_environments_do_not_exist(any_fs: RescatFileSystem) -> None:
    fs = any_fs
    assert not fs.exists("no-such-env") and not fs.isdir("no-such-env")
    with pytest.raises(FileNotFoundError):
        fs.ls("no-such-env")
    fs.pipe_file("gone/a", b"a")
    assert fs.isdir("gone")
    fs.rm("gone", recursive=True)
    assert not fs.exists("gone")


def test_open_a_directory_for_reading(any_fs: RescatFileSystem) -> None:
    any_fs.pipe_file("E9/d/x", b"123")
    for path in ("E9/d", "E9"):
        with pytest.raises(IsADirectoryError):
            any_fs.open(path, "rb")
    with pytest.raises(FileNotFoundError):
        any_fs.open("E9/nope", "rb")


def test_a_read_never_mixes_two_contents(any_fs: RescatFileSystem) -> None:
    fs, old, new = any_fs, b"A" * (12 * MiB), b"B" * (12 * MiB)
    fs.pipe_file("E8/f", old)
    with fs.open("E8/f", "rb") as f:
        first = f.read(5 * MiB)
        fs.pipe_file("E8/f", new)
        if fs.client is None:  # the file holds the content it opened
            assert first + f.read() == old
        else:  # each range is asked for on the condition that the content is the same
            with pytest.raises(OSError) as caught:
                f.read()
            assert caught.value.errno == errno.ESTALE
    assert fs.cat_file("E8/f") == new


def test_rm_of_globs_and_lists_is_all_or_nothing(any_fs: RescatFileSystem) -> None:
    fs = any_fs
    for path in ("E/a/1", "E/a/2", "E/a/s/3", "E9/a", "E9/b"):
        fs.pipe_file(path, b"x")
    with pytest.raises(FileNotFoundError):
        fs.rm(["E9/a", "E9/missing", "E9/b"])
    assert fs.find("E9") == ["E9/a", "E9/b"]  # nothing deleted
    with pytest.raises(IsADirectoryError):
        fs.rm("E/a/*")  # matches the directory E/a/s too
    assert fs.find("E/a") == ["E/a/1", "E/a/2", "E/a/s/3"]
    fs.rm("E/a/[12]")
    assert fs.find("E/a") == ["E/a/s/3"]
    with pytest.raises(FileNotFoundError):
        fs.rm("E/a/*.nothing")
    fs.rm("E9/*", recursive=True)
    assert not fs.exists("E9")


def test_times_and_checksums(any_fs: RescatFileSystem) -> None:
    fs = any_fs
    fs.pipe_file("T/d/f", b"one")
    modified, created = fs.modified("T/d/f"), fs.created("T/d/f")
    assert modified.tzinfo is not None and created <= modified
    assert fs.checksum("T/d/f") == int(b3(b"one"), 16)
    assert isinstance(fs.checksum("T/d"), int)  # a directory's is fsspec's own token
    with pytest.raises(IsADirectoryError):
        fs.modified("T/d")


def test_transactions_and_autocommit_false_publish_only_on_commit(any_fs: RescatFileSystem) -> None:
    """fsspec's contract for autocommit=False: the file lands on commit(), and discard()
    throws it away. Files were published at close() whatever the caller asked."""

    class Boom(Exception):
        pass

    with pytest.raises(Boom), any_fs.transaction:
        with any_fs.open("env/t/aborted", "wb") as f:
            f.write(b"should not land")
        assert not any_fs.exists("env/t/aborted")
        raise Boom
    assert not any_fs.exists("env/t/aborted")

    with any_fs.transaction:
        for name in ("a", "b"):
            with any_fs.open(f"env/t/{name}", "wb") as f:
                f.write(name.encode() * 5)
        assert not any_fs.exists("env/t/a")
    assert any_fs.cat_file("env/t/a") == b"aaaaa" and any_fs.cat_file("env/t/b") == b"bbbbb"

    f = any_fs.open("env/t/later", "wb", autocommit=False)
    f.write(b"x")
    f.close()
    assert not any_fs.exists("env/t/later")
    f.discard()
    assert not any_fs.exists("env/t/later")
    f = any_fs.open("env/t/later", "wb", autocommit=False)
    f.write(b"y")
    f.close()
    f.commit()
    assert any_fs.cat_file("env/t/later") == b"y"


def test_a_refused_commit_leaves_no_session_held(
    any_fs: RescatFileSystem, db: Database[Any]
) -> None:
    """The file is closed by then: a session left open was renewed for the process's life,
    holding the path's uploads, and gc never reclaimed it. Over HTTP no check was made:
    a file went below a file. The refusal is the OSError a local file system raises (it
    was InvalidPathError, a ValueError)."""
    fs = any_fs
    f = fs.open("env/n/o", "wb", block_size=MiB)
    f.write(rand(5 * MiB))  # past the first block: the session holds chunks
    fs.pipe_file("env/n", b"a file where the directory goes")
    with pytest.raises(NotADirectoryError, match="is a file"):
        f.close()
    assert db["upload_sessions"].count_documents({}) == 0
    assert fs.cat_file("env/n") == b"a file where the directory goes"
    # mv and cp_file refuse it as every other write here does (they made such trees)
    fs.pipe_file("env/h", b"H")
    for place in (fs.mv, fs.cp_file):
        with pytest.raises(NotADirectoryError, match="is a file"):
            place("env/h", "env/n/y")
    with pytest.raises(NotADirectoryError):
        fs.pipe_file("env/n/z", b"below a file", mode="create")
    assert fs.cat_file("env/h") == b"H" and not fs.exists("env/n/y")
    # ...nor a file where a directory is
    fs.pipe_file("env/d/f1", b"in d")
    with pytest.raises(IsADirectoryError):
        fs.pipe_file("env/d", b"z")
    with pytest.raises(IsADirectoryError):
        fs.open("env/d", "wb").close()
    with pytest.raises(IsADirectoryError):
        fs.cp_file("env/h", "env/d")
    assert fs.isdir("env/d") and fs.cat_file("env/d/f1") == b"in d"


def test_moving_a_directory_needs_recursive_and_never_into_itself(
    any_fs: RescatFileSystem,
) -> None:
    """mv of a directory without recursive said FileNotFoundError (it exists); with
    recursive, a move into its own subdirectory went ahead. mv and shutil.move refuse it."""
    fs = any_fs
    fs.pipe_file("e/d/f1", b"one")
    fs.pipe_file("e/d/f2", b"two")
    with pytest.raises(IsADirectoryError):
        fs.mv("e/d", "e/n")
    with pytest.raises(ValueError, match="into itself"):
        fs.mv("e/d", "e/d/sub/z", recursive=True)
    assert sorted(fs.find("e")) == ["e/d/f1", "e/d/f2"]
    fs.mv("e/d", "e/n", recursive=True)
    assert sorted(fs.find("e")) == ["e/n/f1", "e/n/f2"]


def test_an_environment_whose_keys_all_expired_is_not_listed(
    fs: RescatFileSystem, managed: ManagedStorage
) -> None:
    import datetime

    from catalog.managed import WriteOptions

    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    managed.put_path("gone", "k", io.BytesIO(b"v"), 1, options=WriteOptions(expires_at=past))
    _put(managed, "here", "k", b"v")
    assert fs.ls("", detail=False) == ["here"]
    assert not fs.exists("gone")


def test_two_opens_of_one_path_for_writing_both_close_and_the_last_wins(
    mongo_uri: str, db: Database[Any]
) -> None:
    """A later open('wb') of a path took the earlier writer's session over: the earlier
    close raised SessionLostError (not even an OSError) and its bytes were dropped. On S3
    or a local disk both closes succeed and the path holds what closed last."""
    one, two = (
        fsspec.filesystem("rescat", mongo_uri=mongo_uri, database=db.name, skip_instance_cache=True)
        for _ in range(2)
    )
    first, second = os.urandom(6 * 1024 * 1024), os.urandom(5 * 1024 * 1024)
    f1 = one.open("e/same.bin", "wb")
    f1.write(first)
    f2 = two.open("e/same.bin", "wb")
    f2.write(second)
    f2.close()
    assert one.cat_file("e/same.bin") == second
    f1.close()
    assert two.cat_file("e/same.bin") == first
    assert db["upload_sessions"].count_documents({}) == 0
