"""distribution's storage driver conformance suite, ported to rescat's StorageDriver.

Ported test by test from distribution/distribution
`registry/storage/driver/testsuites/testsuites.go` (DriverSuite) and
`registry/storage/driver/walk_test.go` (WalkFallback's cases, run against the
driver's own walk). Each test keeps its Go name in its docstring. As in the Go
suite, `List("/")` must be empty after every test (the `driver` fixture checks).

Sizes are the suite's short mode, or shrunk where that is still too large for a
shared 2-core machine (each says so): TestWriteReadLargeStreams writes 64 MiB
instead of 5 GiB, TestConcurrentFileStreams runs 8 streams of 2 MiB instead of 8
of 8 MiB, and TestStatCall sleeps 1.1 s instead of 10 + 5 s. TestRedirectURL fetches the
URLs from a real service, as the Go test does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from catalog import InvalidOffsetError, InvalidPathError, ManagedStorage, NotFoundError
from catalog.driver import FileInfo, FilledBuffer, SkipDir, StorageDriver
from service.app import create_app
from service.signing import URLSigner
from tests.test_service_support import ServerThread

NAME = "rescat-suite"
_FILENAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
_RANDOM = random.Random()
_BYTES = os.urandom(16 * 1024 * 1024)


def random_contents(n: int) -> bytes:
    """randomContents: a prefix of one random buffer (larger sizes are generated)."""
    if n <= len(_BYTES):
        return _BYTES[:n]
    return os.urandom(n)


def random_filename(length: int) -> str:
    out = []
    was_separator = True
    for i in range(length):
        if not was_separator and i < length - 1 and _RANDOM.randrange(4) == 0:
            out.append("-")
            was_separator = True
        else:
            out.append(_RANDOM.choice(_FILENAME_CHARS))
            was_separator = False
    return "".join(out)


def random_path(length: int) -> str:
    path = "/"
    while len(path) < length:
        chunk_length = _RANDOM.randrange(length - len(path)) + 1
        path += random_filename(chunk_length)
        remaining = length - len(path)
        if remaining == 1:
            path += random_filename(1)
        elif remaining > 1:
            path += "/"
    return path


def first_part(path: str) -> str:
    """firstPart: the top-level entry of a path ("/a/b/c" -> "/a")."""
    parts = [p for p in path.split("/") if p]
    return "/" + parts[0] if parts else "/"


@pytest.fixture
def driver(managed: ManagedStorage) -> Iterator[StorageDriver]:
    d = StorageDriver(managed, "suite", name=NAME)
    yield d
    # TearDownTest: the suite aborts if any files are left around.
    left = d.list("/")
    assert left == [], f"Storage driver did not clean up properly. Offending files: {left}"


def delete_path(d: StorageDriver, path: str) -> None:
    with contextlib.suppress(NotFoundError):
        d.delete(path)


def write_read_compare(d: StorageDriver, filename: str, contents: bytes) -> None:
    try:
        d.put_content(filename, contents)
        assert d.get_content(filename) == contents
    finally:
        delete_path(d, first_part(filename))


def write_read_compare_streams(d: StorageDriver, filename: str, contents: bytes) -> None:
    try:
        writer = d.writer(filename, False)
        assert writer.write(contents) == len(contents)
        writer.commit()
        writer.close()
        reader = d.reader(filename, 0)
        assert reader.read() == contents
        reader.close()
    finally:
        delete_path(d, first_part(filename))


def assert_not_found(exc: pytest.ExceptionInfo[NotFoundError]) -> None:
    assert NAME in str(exc.value)


# -- DriverSuite --------------------------------------------------------------------
def test_root_exists(driver: StorageDriver) -> None:
    """TestRootExists"""
    driver.list("/")


def test_valid_paths(driver: StorageDriver) -> None:
    """TestValidPaths"""
    contents = random_contents(64)
    valid = [
        "/a", "/2", "/aa", "/a.a", "/0-9/abcdefg", "/abcdefg/z.75",
        "/abc/1.2.3.4.5-6_zyx/123.z/4", "/docker/docker-registry", "/123.abc",
        "/abc./abc", "/.abc", "/a--b", "/a-.b", "/_.abc", "/Docker/docker-registry",
        "/Abc/Cba",
    ]  # fmt: skip
    try:
        for filename in valid:
            driver.put_content(filename, contents)
            assert driver.get_content(filename) == contents
    finally:
        for filename in valid:
            delete_path(driver, first_part(filename))


def test_invalid_paths(driver: StorageDriver) -> None:
    """TestInvalidPaths"""
    contents = random_contents(64)
    for filename in ["", "/", "abc", "123.abc", "//bcd", "/abc_123/"]:
        with pytest.raises(InvalidPathError) as put_err:
            driver.put_content(filename, contents)
        assert NAME in str(put_err.value)
        with pytest.raises(InvalidPathError) as get_err:
            driver.get_content(filename)
        assert NAME in str(get_err.value)


@pytest.mark.parametrize(
    "contents",
    [b"a", b"\xc3\x9f", random_contents(32), random_contents(1024 * 1024), b"\x80\x80\x80\x80"],
    ids=["TestWriteRead1", "TestWriteRead2", "TestWriteRead3", "TestWriteRead4", "NonUTF8"],
)
def test_write_read(driver: StorageDriver, contents: bytes) -> None:
    """TestWriteRead1..4, TestWriteReadNonUTF8"""
    write_read_compare(driver, random_path(32), contents)


def test_truncate(driver: StorageDriver) -> None:
    """TestTruncate"""
    filename = random_path(32)
    write_read_compare(driver, filename, random_contents(1024 * 1024))
    write_read_compare(driver, filename, random_contents(1024))


def test_read_nonexistent(driver: StorageDriver) -> None:
    """TestReadNonexistent"""
    filename = random_path(32)
    with pytest.raises(NotFoundError) as err:
        driver.get_content(filename)
    assert NAME in str(err.value)
    assert err.value.path == filename


@pytest.mark.parametrize(
    "contents",
    [b"a", b"\xc3\x9f", random_contents(32), random_contents(1024 * 1024), b"\x80\x80\x80\x80"],
    ids=[
        "TestWriteReadStreams1",
        "TestWriteReadStreams2",
        "TestWriteReadStreams3",
        "TestWriteReadStreams4",
        "TestWriteReadStreamsNonUTF8",
    ],
)
def test_write_read_streams(driver: StorageDriver, contents: bytes) -> None:
    """TestWriteReadStreams1..4, TestWriteReadStreamsNonUTF8"""
    write_read_compare_streams(driver, random_path(32), contents)


@pytest.mark.slow
def test_write_read_large_streams(driver: StorageDriver) -> None:
    """TestWriteReadLargeStreams, with 64 MiB instead of 5 GiB (shared 2-core machine)."""
    filename = random_path(32)
    size = 64 * 1024 * 1024
    checksum = hashlib.sha256()
    try:
        writer = driver.writer(filename, False)
        written = 0
        rng = random.Random(7)
        while written < size:
            block = rng.randbytes(min(1024 * 1024 - 7, size - written))
            checksum.update(block)
            written += writer.write(block)
        assert written == size
        writer.commit()
        writer.close()
        reader = driver.reader(filename, 0)
        got = hashlib.sha256()
        while data := reader.read(4 * 1024 * 1024):
            got.update(data)
        reader.close()
        assert got.digest() == checksum.digest()
    finally:
        delete_path(driver, first_part(filename))


def test_reader_with_offset(driver: StorageDriver) -> None:
    """TestReaderWithOffset"""
    filename = random_path(32)
    chunk = 32
    c1, c2, c3 = os.urandom(chunk), os.urandom(chunk), os.urandom(chunk)
    try:
        driver.put_content(filename, c1 + c2 + c3)
        assert driver.reader(filename, 0).read() == c1 + c2 + c3
        assert driver.reader(filename, chunk).read() == c2 + c3
        assert driver.reader(filename, chunk * 2).read() == c3
        with pytest.raises(InvalidOffsetError) as err:
            driver.reader(filename, -1)
        assert err.value.offset == -1
        assert err.value.path == filename
        assert NAME in str(err.value)
        assert driver.reader(filename, chunk * 3).read(chunk) == b""
        reader = driver.reader(filename, chunk * 3 - 1)
        assert len(reader.read(chunk)) == 1
        assert reader.read(chunk) == b""
    finally:
        delete_path(driver, first_part(filename))


def continue_stream_append(d: StorageDriver, chunk_size: int) -> None:
    filename = random_path(32)
    full = io.BytesIO(os.urandom(chunk_size * 3))
    try:
        writer = d.writer(filename, False)
        assert writer.write(full.read(chunk_size)) == chunk_size
        writer.close()
        cur = writer.size()
        assert cur == chunk_size

        writer = d.writer(filename, True)
        assert writer.size() == cur
        assert writer.write(full.read(chunk_size)) == chunk_size
        writer.close()
        cur = writer.size()
        assert cur == 2 * chunk_size

        writer = d.writer(filename, True)
        assert writer.size() == cur
        assert writer.write(full.read(chunk_size)) == chunk_size
        writer.commit()
        writer.close()
        assert d.get_content(filename) == full.getvalue()
    finally:
        delete_path(d, first_part(filename))


def test_continue_stream_append_large(driver: StorageDriver) -> None:
    """TestContinueStreamAppendLarge (10 MiB chunks)"""
    continue_stream_append(driver, 10 * 1024 * 1024)


def test_continue_stream_append_small(driver: StorageDriver) -> None:
    """TestContinueStreamAppendSmall (32-byte chunks)"""
    continue_stream_append(driver, 32)


def test_read_nonexistent_stream(driver: StorageDriver) -> None:
    """TestReadNonexistentStream"""
    filename = random_path(32)
    for offset in (0, 64):
        with pytest.raises(NotFoundError) as err:
            driver.reader(filename, offset)
        assert NAME in str(err.value)


def test_write_zero_byte_stream_then_append(driver: StorageDriver) -> None:
    """TestWriteZeroByteStreamThenAppend"""
    filename = random_path(32)
    chunk = random_contents(32)
    try:
        writer = driver.writer(filename, False)
        writer.commit()
        writer.close()
        assert writer.size() == 0
        assert driver.reader(filename, 0).read(32) == b""

        awriter = driver.writer(filename, True)
        assert awriter.write(chunk) == len(chunk)
        awriter.commit()
        awriter.close()
        assert awriter.size() == len(chunk)
        assert driver.reader(filename, 0).read() == chunk
    finally:
        delete_path(driver, first_part(filename))


def test_write_zero_byte_content_then_append(driver: StorageDriver) -> None:
    """TestWriteZeroByteContentThenAppend"""
    filename = random_path(32)
    chunk = random_contents(32)
    try:
        driver.put_content(filename, b"")
        assert driver.reader(filename, 0).read(32) == b""
        awriter = driver.writer(filename, True)
        assert awriter.write(chunk) == len(chunk)
        awriter.commit()
        awriter.close()
        assert awriter.size() == len(chunk)
        assert driver.reader(filename, 0).read() == chunk
    finally:
        delete_path(driver, first_part(filename))


def test_list(driver: StorageDriver) -> None:
    """TestList"""
    root = "/" + random_filename(8 + _RANDOM.randrange(8))
    try:
        missing = root + "/nonexistent"
        with pytest.raises(NotFoundError) as err:
            driver.list(missing)
        assert err.value.path == missing
        assert NAME in str(err.value)

        parent = root + "/" + random_filename(8 + _RANDOM.randrange(8))
        children = []
        for _ in range(50):
            child = parent + "/" + random_filename(8 + _RANDOM.randrange(8))
            children.append(child)
            driver.put_content(child, random_contents(32))
        children = sorted(set(children))

        assert driver.list("/") == [root]
        assert driver.list(root) == [parent]
        assert sorted(driver.list(parent)) == children
    finally:
        delete_path(driver, root)


def test_move(driver: StorageDriver) -> None:
    """TestMove"""
    contents = random_contents(32)
    src, dst = random_path(32), random_path(32)
    try:
        driver.put_content(src, contents)
        driver.move(src, dst)
        assert driver.get_content(dst) == contents
        with pytest.raises(NotFoundError) as err:
            driver.get_content(src)
        assert NAME in str(err.value)
    finally:
        delete_path(driver, first_part(src))
        delete_path(driver, first_part(dst))


def test_move_overwrite(driver: StorageDriver) -> None:
    """TestMoveOverwrite"""
    src, dst = random_path(32), random_path(32)
    src_contents, dst_contents = random_contents(32), os.urandom(64)
    try:
        driver.put_content(src, src_contents)
        driver.put_content(dst, dst_contents)
        driver.move(src, dst)
        assert driver.get_content(dst) == src_contents
        with pytest.raises(NotFoundError) as err:
            driver.get_content(src)
        assert NAME in str(err.value)
    finally:
        delete_path(driver, first_part(src))
        delete_path(driver, first_part(dst))


def test_move_nonexistent(driver: StorageDriver) -> None:
    """TestMoveNonexistent"""
    contents = random_contents(32)
    src, dst = random_path(32), random_path(32)
    try:
        driver.put_content(dst, contents)
        with pytest.raises(NotFoundError) as err:
            driver.move(src, dst)
        assert NAME in str(err.value)
        assert driver.get_content(dst) == contents
    finally:
        delete_path(driver, first_part(dst))


def test_move_invalid(driver: StorageDriver) -> None:
    """TestMoveInvalid"""
    try:
        driver.put_content("/notadir", random_contents(32))
        with pytest.raises(NotFoundError):
            driver.move("/notadir/foo", "/notadir/bar")
    finally:
        delete_path(driver, "/notadir")


def test_delete(driver: StorageDriver) -> None:
    """TestDelete"""
    filename = random_path(32)
    try:
        driver.put_content(filename, random_contents(32))
        driver.delete(filename)
        with pytest.raises(NotFoundError) as err:
            driver.get_content(filename)
        assert NAME in str(err.value)
    finally:
        delete_path(driver, first_part(filename))


def test_redirect_url(
    driver: StorageDriver, managed: ManagedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TestRedirectURL: "" without a signer; with one, the URL is fetched as the suite does.

    A GET of the GET URL returns the content; a HEAD of the HEAD URL is 200 with
    Content-Length 32 (no Authorization header on either).
    """
    monkeypatch.delenv("RESCAT_SIGNING_SECRET", raising=False)
    filename = random_path(32)
    contents = random_contents(32)
    try:
        driver.put_content(filename, contents)
        assert driver.redirect_url("GET", filename) == ""
        with ServerThread(create_app(managed, auth=True)) as server, httpx.Client() as client:
            signer = URLSigner.for_database(managed, server.url, ttl=60)
            signed = StorageDriver(managed, "suite", name=NAME, redirect=signer)
            url = signed.redirect_url("GET", filename)
            assert url.startswith(server.url + "/v1/signed/environments/suite/resources/")
            response = client.get(url)
            assert response.status_code == 200
            assert response.content == contents
            response = client.head(signed.redirect_url("HEAD", filename))
            assert response.status_code == 200
            assert int(response.headers["content-length"]) == 32
    finally:
        delete_path(driver, first_part(filename))


def test_delete_nonexistent(driver: StorageDriver) -> None:
    """TestDeleteNonexistent"""
    with pytest.raises(NotFoundError) as err:
        driver.delete(random_path(32))
    assert NAME in str(err.value)


def test_delete_folder(driver: StorageDriver) -> None:
    """TestDeleteFolder"""
    dirname = random_path(32)
    f1, f2, f3 = (dirname + random_path(32) for _ in range(3))
    contents = random_contents(32)
    try:
        for f in (f1, f2, f3):
            driver.put_content(f, contents)
        driver.delete(f1)
        with pytest.raises(NotFoundError) as err:
            driver.get_content(f1)
        assert NAME in str(err.value)
        driver.get_content(f2)
        driver.get_content(f3)
        driver.delete(dirname)
        for f in (f1, f2, f3):
            with pytest.raises(NotFoundError) as err:
                driver.get_content(f)
            assert NAME in str(err.value)
    finally:
        delete_path(driver, first_part(dirname))


def test_delete_only_deletes_subpaths(driver: StorageDriver) -> None:
    """TestDeleteOnlyDeletesSubpaths"""
    dirname = random_path(32)
    filename = random_path(32)
    contents = random_contents(32)
    try:
        driver.put_content(dirname + filename, contents)
        driver.put_content(dirname + filename + "suffix", contents)
        driver.put_content(dirname + dirname + filename, contents)
        driver.put_content(dirname + dirname + "suffix" + filename, contents)

        driver.delete(dirname + filename)
        with pytest.raises(NotFoundError) as err:
            driver.get_content(dirname + filename)
        assert NAME in str(err.value)
        driver.get_content(dirname + filename + "suffix")

        driver.delete(dirname + dirname)
        with pytest.raises(NotFoundError) as err:
            driver.get_content(dirname + dirname + filename)
        assert NAME in str(err.value)
        driver.get_content(dirname + dirname + "suffix" + filename)
    finally:
        delete_path(driver, first_part(dirname))


def test_stat_call(driver: StorageDriver) -> None:
    """TestStatCall (sleeps 1.1 s instead of 10 + 5 s: our clock is the server's)."""
    content = random_contents(4096)
    dir_path = random_path(32)
    file_path = dir_path + "/" + random_filename(32)
    try:
        for missing in (dir_path, file_path):
            with pytest.raises(NotFoundError) as err:
                driver.stat(missing)
            assert NAME in str(err.value)

        driver.put_content(file_path, content)
        fi = driver.stat(file_path)
        assert (fi.path, fi.size, fi.is_dir) == (file_path, len(content), False)
        created = fi.mod_time

        time.sleep(1.1)
        driver.put_content(file_path, os.urandom(4096))
        fi = driver.stat(file_path)
        assert fi.mod_time > created

        fi = driver.stat(dir_path)
        assert (fi.path, fi.size, fi.is_dir) == (dir_path, 0, True)

        root = driver.stat("/")  # the health check's call: no error, or not found
        assert root.is_dir
    finally:
        delete_path(driver, first_part(dir_path))


def test_put_content_multiple_times(driver: StorageDriver) -> None:
    """TestPutContentMultipleTimes"""
    filename = random_path(32)
    try:
        driver.put_content(filename, random_contents(4096))
        contents = os.urandom(2048)
        driver.put_content(filename, contents)
        assert driver.get_content(filename) == contents
    finally:
        delete_path(driver, first_part(filename))


def test_concurrent_stream_reads(driver: StorageDriver) -> None:
    """TestConcurrentStreamReads (the suite's short-mode 10 MiB)"""
    contents = random_contents(10 * 1024 * 1024)
    filename = random_path(32)
    errors: list[BaseException] = []

    def read_contents() -> None:
        try:
            offset = _RANDOM.randrange(len(contents))
            reader = driver.reader(filename, offset)
            assert reader.read() == contents[offset:]
        except BaseException as exc:
            errors.append(exc)

    try:
        driver.put_content(filename, contents)
        threads = [threading.Thread(target=read_contents) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    finally:
        delete_path(driver, first_part(filename))


def test_concurrent_file_streams(driver: StorageDriver) -> None:
    """TestConcurrentFileStreams: 8 streams (short mode) of 2 MiB instead of 8 MiB."""
    errors: list[BaseException] = []

    def test_file_streams(size: int) -> None:
        filename = random_path(32)
        try:
            contents = os.urandom(size)
            with tempfile.TemporaryFile() as tf:
                tf.write(contents)
                tf.flush()
                tf.seek(0)
                writer = driver.writer(filename, False)
                copied = 0
                while data := tf.read(32 * 1024):
                    copied += writer.write(data)
                assert copied == size
                writer.commit()
                writer.close()
            assert driver.reader(filename, 0).read() == contents
        except BaseException as exc:
            errors.append(exc)
        finally:
            delete_path(driver, first_part(filename))

    size = 2 * 1024 * 1024
    threads = [threading.Thread(target=test_file_streams, args=(size,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# -- walk_test.go -------------------------------------------------------------------
WALK_TREE = [
    "/file1",
    "/folder1/file1",
    "/folder1-suffix/file1",  # importantly, - is before / in the ascii table
    "/folder2/file1",
    "/folder3/subfolder1/subfolder1/file1",
    "/folder3/subfolder2/subfolder1/file1",
    "/folder4/file1",
]
WALK_DIRS = {
    "/folder1", "/folder1-suffix", "/folder2", "/folder3", "/folder3/subfolder1",
    "/folder3/subfolder1/subfolder1", "/folder3/subfolder2", "/folder3/subfolder2/subfolder1",
    "/folder4",
}  # fmt: skip
WALK_ALL = [
    "/file1",
    "/folder1",
    "/folder1/file1",
    "/folder1-suffix",
    "/folder1-suffix/file1",
    "/folder2",
    "/folder2/file1",
    "/folder3",
    "/folder3/subfolder1",
    "/folder3/subfolder1/subfolder1",
    "/folder3/subfolder1/subfolder1/file1",
    "/folder3/subfolder2",
    "/folder3/subfolder2/subfolder1",
    "/folder3/subfolder2/subfolder1/file1",
    "/folder4",
    "/folder4/file1",
]


@pytest.fixture
def walk_tree(driver: StorageDriver) -> Iterator[StorageDriver]:
    for path in WALK_TREE:
        driver.put_content(path, path.encode())
    yield driver
    for path in WALK_TREE:
        delete_path(driver, first_part(path))


def _skip_folder1(fi: FileInfo) -> None:
    if fi.path == "/folder1":
        raise SkipDir


def _stop_early(fi: FileInfo) -> None:
    if fi.path == "/folder1/file1":
        raise FilledBuffer


class Foo(Exception):
    pass


def _error(fi: FileInfo) -> None:
    raise Foo("foo")


DEEP = "/folder3/subfolder1/subfolder1/file1"
WALK_CASES: list[tuple[str, Any, str, str, list[str], bool]] = [
    ("walk all", None, "/", "", WALK_ALL, False),
    ("skip directory", _skip_folder1, "/", "", WALK_ALL[:2] + WALK_ALL[3:], False),
    ("start late expecting -suffix", None, "/", "/folder1/file1", WALK_ALL[3:], False),
    ("start late without from", None, "/", DEEP, WALK_ALL[11:], False),
    ("start late with from", None, "/folder3", DEEP, WALK_ALL[11:14], False),
    ("start after from", None, "/folder1", "/folder1-suffix", [], False),
    ("start matches from", None, "/folder3", "/folder3", WALK_ALL[8:14], False),
    ("start doesn't exist", None, "/folder3", "/folder3/nota/notafile", WALK_ALL[8:14], False),
    ("stop early", _stop_early, "/", "", WALK_ALL[:3], False),
    ("error", _error, "/", "", WALK_ALL[:1], True),
    ("from folder", None, "/folder1", "", ["/folder1/file1"], False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fn", "start", "hint", "expected", "err"),
    [case[1:] for case in WALK_CASES],
    ids=[case[0] for case in WALK_CASES],
)
def test_walk_fallback(
    walk_tree: StorageDriver, fn: Any, start: str, hint: str, expected: list[str], err: bool
) -> None:
    """TestWalkFallback (every case, against the driver's own walk)"""
    walked: list[str] = []

    def visit(fi: FileInfo) -> None:
        walked.append(fi.path)
        assert fi.is_dir == (fi.path in WALK_DIRS)
        if not fi.is_dir:
            assert fi.size == len(fi.path)
        if fn is not None:
            fn(fi)

    if err:
        with pytest.raises(Foo):
            walk_tree.walk(start, visit, start_after_hint=hint)
    else:
        walk_tree.walk(start, visit, start_after_hint=hint)
    assert walked == expected


def test_walk_file_removed(driver: StorageDriver) -> None:
    """TestWalkFileRemoved, adapted: a path removed while the walk runs is no error.

    The Go test stubs List and Stat; here the walk reads paths with a cursor,
    so a file removed after the walk started is skipped or still seen, never an error.
    """
    driver.put_content("/bender", b"b")
    driver.put_content("/zoidberg", b"z")
    seen: list[str] = []

    def visit(fi: FileInfo) -> None:
        seen.append(fi.path)
        if fi.path == "/bender":
            driver.delete("/zoidberg")

    driver.walk("/", visit)
    assert seen[0] == "/bender"
    assert driver.list("/") == ["/bender"]
    driver.delete("/bender")
