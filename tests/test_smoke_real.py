from __future__ import annotations

import io

from catalog import ManagedStorage


def test_put_get_roundtrip_on_real_mongod(managed: ManagedStorage) -> None:
    data = b"x" * 3_000_000
    res = managed.put_for_environment("env", "a/b", io.BytesIO(data))
    reader, length = managed.get_for_environment("env", "a/b")
    assert length == len(data)
    assert reader.read() == data
    assert managed.catalog.get(res.id).refcount == 1
