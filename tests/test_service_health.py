"""/healthz while the database goes away and comes back (issue 14).

A mongod of the test's own is stopped under a running service: health checks
must answer 503 `unavailable` within 2 s (pymongo would wait 30 s for server
selection), every time, and 200 again once the database is back.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from catalog import connect
from catalog.mongod import free_port, start_mongod, stop_process, uri_for, wait_primary
from service.app import create_app
from tests.test_service_support import ServerThread, wait_until


def test_healthz_answers_503_within_2s_while_the_database_is_down(tmp_path: Path) -> None:
    port = free_port()
    mongod = start_mongod(tmp_path / "db", port)
    try:
        wait_primary(port, mongod)
        managed = connect(uri_for(port), "health")
        with (
            ServerThread(create_app(managed, auth=True)) as srv,
            httpx.Client(base_url=srv.url, timeout=30) as http,
        ):
            assert http.get("/healthz").status_code == 200
            stop_process(mongod)
            for method in ("GET", "HEAD", "GET", "GET"):
                started = time.monotonic()
                r = http.request(method, "/healthz")
                elapsed = time.monotonic() - started
                assert r.status_code == 503, (method, r.status_code)
                assert r.headers["x-rescat-error"] == "unavailable"
                if method == "GET":
                    assert r.json()["error"]["code"] == "unavailable"
                    # No token needed here: no database host or driver internals told.
                    assert r.json()["error"]["message"] == "the database does not answer"
                assert elapsed < 2.0, f"{method} /healthz took {elapsed:.2f} s"
            mongod = start_mongod(tmp_path / "db", port)
            wait_primary(port, mongod)
            assert wait_until(lambda: http.get("/healthz").status_code == 200, timeout=30)
        managed.db.client.close()
    finally:
        stop_process(mongod)
