"""Invalid environment ids and paths fail before anything is written."""

from __future__ import annotations

import io

import pytest

from catalog import InvalidPathError, ManagedStorage
from catalog.names import check_env, check_path, format_hash, parse_hash

BAD_ENVS = ["", ".", "..", "a/b", "a b", "x" * 129, "é", "a\x00", None, 5]
BAD_PATHS = [
    "",
    "/abs",
    "a//b",
    "a/",
    "./a",
    "a/../b",
    "a/.",
    "..",
    "a\x00b",
    "a\nb",
    "a\x7fb",
    "a\x85b",
    "\ud800",
    "x" * 1025,
    "é" * 513,
    None,
    b"bytes",
]


@pytest.mark.parametrize("env", BAD_ENVS)
def test_bad_env(env: object) -> None:
    with pytest.raises(InvalidPathError):
        check_env(env)


@pytest.mark.parametrize("path", BAD_PATHS)
def test_bad_path(path: object) -> None:
    with pytest.raises(InvalidPathError):
        check_path(path)


def test_good_names() -> None:
    assert check_env("A-z_0.9") == "A-z_0.9"
    assert check_env("x" * 128)
    for path in ["a", "a/b/c", "é/日本", "x" * 1024, "a..b/.c/..d", "with space/ok"]:
        assert check_path(path) == path


def test_hash_forms() -> None:
    hexd = "ab" * 32
    assert parse_hash(hexd) == hexd
    assert parse_hash("blake3:" + hexd.upper()) == hexd
    assert format_hash(hexd) == "blake3:" + hexd
    for bad in ["", "blake3:", "ab" * 31, "zz" * 32, "sha256:" + hexd]:
        with pytest.raises(ValueError):
            parse_hash(bad)


@pytest.mark.parametrize("env,path", [("..", "p"), ("env", "a/../b"), ("env", "")])
def test_every_operation_validates_before_writing(
    managed: ManagedStorage, env: str, path: str
) -> None:
    ops = [
        lambda: managed.put_for_environment(env, path, io.BytesIO(b"x")),
        lambda: managed.put_for_environment_and_check_hash(env, path, io.BytesIO(b"x"), 1, None),
        lambda: managed.get_for_environment(env, path),
        lambda: managed.stat_for_environment(env, path),
        lambda: managed.remove_for_environment(env, path),
        lambda: managed.put_for_environment_request(env, path, "ab" * 32),
    ]
    for op in ops:
        with pytest.raises(InvalidPathError):
            op()
    assert managed.db["resources.chunks"].count_documents({}) == 0
    assert managed.catalog.collection.count_documents({}) == 0
    assert managed.paths.count_documents({}) == 0


def test_list_validates_env(managed: ManagedStorage) -> None:
    with pytest.raises(InvalidPathError):
        managed.list_for_environment("..")
