"""The generated OpenAPI document against a real `rescat serve`, and /docs.

schemathesis reads /openapi.json and sends what it describes (and what it does
not: negative cases, unexpected methods, missing tokens), in all its phases,
seeded and bounded, to a server on loopback. Every check must pass: no 5xx, no
status, header, content type or body outside the document, no request the
document calls valid refused as invalid (see tests/schemathesis.toml).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import MongoClient

from catalog import ManagedStorage
from catalog.tokens import TokenStore
from service.app import create_app
from service.routes import ROUTES
from tests.test_service_support import ServerThread, server_process

HERE = Path(__file__).resolve().parent


def test_schemathesis_finds_nothing(
    mongo_uri: str, database: str, mongo_client: MongoClient[Any], tmp_path: Path
) -> None:
    token, _ = TokenStore(mongo_client[database]).create(admin=True)
    serve_args = ("--max-size", str(1 << 20), "--log-level", "warning", "--compat-store", "seed")
    with server_process(mongo_uri, database, *serve_args) as url:
        started = time.monotonic()
        command = [
            sys.executable, "-m", "schemathesis.cli",
            "--config-file", str(HERE / "schemathesis.toml"),
            "run", f"{url}/openapi.json",
            "--header", f"Authorization: Bearer {token}",
            "--checks", "all",
            "--max-examples", "20",
            "--seed", "20261130",
            "--workers", "1",
            "--request-timeout", "10",
            "--generation-database", "none",
            # Free-text header schemas (If-Match, ...) make Hypothesis discard many
            # examples; whether an operation trips that health check depends on the
            # random stream, i.e. on how many operations the document has.
            "--suppress-health-check", "filter_too_much",
            "--no-color",
        ]  # fmt: skip
        run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
        seconds = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    print(f"schemathesis: {seconds:.1f} s\n{run.stdout[-1500:]}")


@pytest.fixture
def http(managed: ManagedStorage) -> Iterator[httpx.Client]:
    with ServerThread(create_app(managed, auth=True)) as srv, httpx.Client(base_url=srv.url) as c:
        yield c


def test_document_has_every_route_and_its_errors(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    assert doc["openapi"] == "3.0.3"
    for endpoint in ROUTES:
        item = doc["paths"][endpoint.path_format]
        for method in endpoint.methods:
            op = item[method.lower()]
            statuses = {int(s) for s in op["responses"]}
            assert {a.status for a in endpoint.answers} <= statuses
            if endpoint.auth:
                assert {401} <= statuses and "security" not in op
            else:
                assert op["security"] == []
            if any(p.name in ("env", "path") for p in endpoint.path_params):
                assert 400 in statuses and 403 in statuses
            for status, response in op["responses"].items():
                if int(status) >= 400:
                    name = response["$ref"].rsplit("/", 1)[1]
                    error = doc["components"]["responses"][name]
                    assert "X-Rescat-Error" in error["headers"], (endpoint.template, status)
                    if method != "HEAD":
                        schema = error["content"]["application/json"]["schema"]
                        assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}
    # The contract's rules are stated as patterns and lengths.
    env = doc["paths"]["/v1/environments/{env}/resources"]["get"]["parameters"][0]
    assert env["schema"]["maxLength"] == 128 and env["schema"]["pattern"]
    assert "bytes of UTF-8" in doc["info"]["description"]


def test_docs_are_served_from_the_package(http: httpx.Client) -> None:
    page = http.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:href|src)="(docs/[^"]+)"', page.text)
    assert "docs/swagger-ui-bundle.js" in assets and "docs/swagger-ui.css" in assets
    assert "openapi.json" in page.text and "//" not in page.text.replace("<!DOCTYPE", "")
    for asset in assets:
        r = http.get("/" + asset)
        assert r.status_code == 200 and len(r.content) > 100, asset
    assert "SwaggerUIBundle" in http.get("/docs/swagger-ui-bundle.js").text
    assert http.head("/docs/swagger-ui.css").status_code == 200
    r = http.get("/docs/secret.txt")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert http.get("/docs/..%2Fapp.py").status_code == 404


def test_metrics_labels_are_declared_templates(http: httpx.Client) -> None:
    headers = {"Authorization": "Bearer nope"}
    http.get("/v1/environments/e/resources/a/b", headers=headers)
    http.get("/nowhere")
    http.get("/docs")
    text = http.get("/metrics").text
    labels = set(re.findall(r'route="([^"]*)"', text))
    templates = {e.path_format for e in ROUTES}
    assert "/v1/environments/{env}/resources/{path}" in labels and "/docs" in labels
    assert labels <= templates | {"unmatched", "/v1 (unmatched)"}, labels - templates
