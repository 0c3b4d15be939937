"""The document's patterns against catalog.names, the authority on names.

Requests the document calls valid must pass the checks (never 400
invalid_path); for environment ids and hashes the two must agree exactly, and
for paths and prefixes within the lengths JSON Schema can state.
"""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from catalog.errors import BadRequestError, InvalidPathError
from catalog.names import check_env, check_path, check_prefix, parse_hash
from service import schemas

SETTINGS = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def accepted(check: object, value: str) -> bool:
    try:
        check(value)  # type: ignore[operator]
    except (InvalidPathError, BadRequestError):
        return False
    return True


def matches(schema: dict[str, object], value: str) -> bool:
    """A tiny evaluator for the keywords the name schemas use."""
    if "anyOf" in schema:
        return any(matches(sub, value) for sub in schema["anyOf"])  # type: ignore[attr-defined]
    if len(value) < int(schema.get("minLength", 0)):  # type: ignore[call-overload]
        return False
    if "maxLength" in schema and len(value) > int(schema["maxLength"]):  # type: ignore[call-overload]
        return False
    pattern = schema.get("pattern")
    return pattern is None or re.search(str(pattern), value) is not None


def generated(pattern: str, max_size: int) -> st.SearchStrategy[str]:
    return st.from_regex(pattern, fullmatch=True).filter(lambda s: len(s) <= max_size)


@SETTINGS
@given(st.one_of(generated(schemas.ENV_PATTERN, 128), st.text("ab.-_*/é \x00", max_size=130)))
def test_env_pattern_is_exactly_check_env(value: str) -> None:
    assert matches(schemas.ENV_SCHEMA, value) == accepted(check_env, value), value


@SETTINGS
@given(
    st.one_of(
        generated(schemas.PATH_ASCII_PATTERN, 1024),
        generated(schemas.PATH_PATTERN, 256),
        st.text("a./ é\x00\x7f\x85", max_size=40),
    )
)
def test_a_path_the_document_calls_valid_is_valid(value: str) -> None:
    if matches(schemas.PATH_SCHEMA, value):
        assert accepted(check_path, value), value
        assert schemas.decode_path(quote(value, safe="")) == value
        assert schemas.decode_path(quote(value, safe="/")) == value
    if accepted(check_path, value) and value.isascii():
        assert matches(schemas.PATH_SCHEMA, value), value  # and short paths are all stated


@SETTINGS
@given(st.one_of(generated(schemas.PREFIX_PATTERN, 256), st.text("a/. é\x00\x1f\x9f", max_size=40)))
def test_a_prefix_the_document_calls_valid_is_valid(value: str) -> None:
    if matches(schemas.PREFIX_SCHEMA, value):
        assert accepted(check_prefix, value), value
    if accepted(check_prefix, value) and len(value) <= 256:
        assert matches(schemas.PREFIX_SCHEMA, value), value


@SETTINGS
@given(st.one_of(generated(schemas.HASH_PATTERN, 80), st.text("0aFg:blake3 ", max_size=72)))
def test_hash_pattern_is_exactly_parse_hash(value: str) -> None:
    if matches(schemas.HASH_SCHEMA, value):
        assert accepted(parse_hash, value), value
    if accepted(parse_hash, value) and value == value.strip():
        assert matches(schemas.HASH_SCHEMA, value), value


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (".", False),
        ("..", False),
        ("...", True),
        (".a", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
    ],
)
def test_env_edges(value: str, valid: bool) -> None:
    assert matches(schemas.ENV_SCHEMA, value) is valid
    assert accepted(check_env, value) is valid


def test_long_paths_by_bytes() -> None:
    assert matches(schemas.PATH_SCHEMA, "a" * 1024) and accepted(check_path, "a" * 1024)
    assert not matches(schemas.PATH_SCHEMA, "a" * 1025)
    assert matches(schemas.PATH_SCHEMA, "é" * 256) and accepted(check_path, "é" * 256)
    # Valid (512 x 2 bytes), but beyond what the document can state in characters:
    assert accepted(check_path, "é" * 512) and not matches(schemas.PATH_SCHEMA, "é" * 512)
