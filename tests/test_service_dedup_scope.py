"""`rescat serve --dedup-scope environment`: no cross-environment side channel over HTTP."""

from __future__ import annotations

import os
from typing import Any

import blake3
import httpx
from pymongo.database import Database

from tests.test_service_support import server_process


def test_environment_scope_over_http(mongo_uri: str, db: Database[Any]) -> None:
    data = os.urandom(30_000)
    digest = blake3.blake3(data).hexdigest()
    with server_process(
        mongo_uri, db.name, "--no-auth", "--dedup-scope", "environment", "--log-level", "warning"
    ) as url:
        base = f"{url}/v1/environments"
        assert httpx.put(f"{base}/a/resources/orig", content=data).status_code == 201
        body = {"path": "copy", "hash": digest}
        r = httpx.post(f"{base}/b/put-requests", json=body)
        assert r.status_code == 404  # b cannot learn that a stores it
        assert httpx.post(f"{base}/a/put-requests", json=body).status_code == 201
