"""Review of the driver's signed URLs (RedirectURL) as an anonymous HTTP client uses them."""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest

from catalog import ManagedStorage
from catalog.driver import StorageDriver
from service.app import create_app
from service.signing import URLSigner
from tests.test_service_support import ServerThread


@pytest.fixture
def server(managed: ManagedStorage) -> Iterator[ServerThread]:
    with ServerThread(create_app(managed, auth=True)) as srv:
        yield srv


def test_a_head_url_does_not_serve_the_content(
    managed: ManagedStorage, server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RedirectURL(HEAD) grants the size and ETag of a blob, as S3's presigned HEAD does.

    Whoever holds that URL must not GET the bytes with it; a GET URL still answers
    HEAD (it shows less than GET).
    """
    monkeypatch.delenv("RESCAT_SIGNING_SECRET", raising=False)
    secret = b"layer bytes " * 100
    managed.put_for_environment("reg", "blobs/ab/data", io.BytesIO(secret))
    driver = StorageDriver(managed, "reg", redirect=URLSigner.for_database(managed, server.url))
    head_url = driver.redirect_url("HEAD", "/blobs/ab/data")
    get_url = driver.redirect_url("GET", "/blobs/ab/data")
    with httpx.Client(timeout=30) as anon:
        head = anon.head(head_url)
        assert head.status_code == 200 and head.headers["content-length"] == str(len(secret))
        refused = anon.get(head_url)
        assert refused.status_code == 403, refused.content[:40]
        assert refused.json()["error"]["code"] == "forbidden"
        assert secret not in refused.content
        ranged = anon.get(head_url, headers={"range": "bytes=0-9"})
        assert ranged.status_code == 403
        assert anon.get(get_url).content == secret
        assert anon.head(get_url).status_code == 200
