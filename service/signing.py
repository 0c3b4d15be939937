"""Signed URLs: a GET of one path's content without an Authorization header.

`URLSigner.sign(method, env, path)` returns the service's signed-read URL of the
path, `/v1/signed/environments/{env}/resources/{path}` (served without a token
by service.routes_uploads), with two query parameters: `expires` (Unix seconds)
and `signature`, the hex HMAC-SHA256 over the method, environment, path and
expiry. `verify` recomputes it in constant time and raises ForbiddenError when
the URL expired or any part of it was changed. A GET URL also answers HEAD (HEAD
shows less than GET); a HEAD URL answers only HEAD: it was given out to tell a
file's size and ETag, not its content (as S3's presigned HEAD URLs).

The secret: `RESCAT_SIGNING_SECRET` when set, else one kept in the database
(`settings` collection), created on first use by an atomic upsert, so every
instance on that database signs and verifies alike. It never appears in repr,
logs or command lines.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from pymongo import ReturnDocument, WriteConcern
from pymongo.errors import DuplicateKeyError

from catalog.errors import BadRequestError, ForbiddenError
from catalog.names import check_env, check_path

SECRET_ENV = "RESCAT_SIGNING_SECRET"
SETTINGS = "settings"
SECRET_ID = "signing_secret"
EXPIRES = "expires"
SIGNATURE = "signature"
# The id of the token a URL was signed for (POST .../sign with a bearer token): the
# URL is good only while that token is (signed in, so it cannot be dropped).
SIGNED_BY = "by"
READS = ("GET", "HEAD")


class URLSigner:
    """Signs and verifies URLs of `base_url` (the service root, no /v1)."""

    def __init__(self, base_url: str, secret: str | bytes, ttl: float = 3600.0) -> None:
        if not secret:
            raise BadRequestError("a URL signer needs a non-empty secret")
        if not ttl > 0:
            raise BadRequestError(f"ttl must be > 0 seconds, not {ttl!r}")
        self.base_url = str(base_url).rstrip("/")
        self.ttl = float(ttl)
        self.__key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)

    @classmethod
    def for_database(cls, managed: Any, base_url: str, ttl: float = 3600.0) -> URLSigner:
        """A signer with RESCAT_SIGNING_SECRET, else the database's shared secret."""
        return cls(base_url, shared_secret(managed.db), ttl)

    def __repr__(self) -> str:
        return f"URLSigner({self.base_url!r}, secret=<hidden>, ttl={self.ttl})"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a URLSigner holds a secret and is not pickled")

    def sign(
        self,
        method: str,
        env: str,
        path: str,
        *,
        ttl: float | None = None,
        token_id: str | None = None,
    ) -> str:
        """The URL of `path` in `env` for `method`, valid for `ttl` seconds (default self.ttl).

        token_id: the token the URL is given out for; `verify` returns it, and the
        service honours the URL only while that token is not revoked.
        """
        check_env(env)
        check_path(path)
        lifetime = self.ttl if ttl is None else float(ttl)
        if not lifetime > 0:
            raise BadRequestError(f"ttl must be > 0 seconds, not {ttl!r}")
        expires = int(time.time() + lifetime + 0.999)
        signature = self._signature(method, env, path, expires, token_id)
        encoded = "/".join(quote(segment, safe="") for segment in path.split("/"))
        url = f"{self.base_url}/v1/signed/environments/{quote(env, safe='')}/resources/{encoded}"
        query = {EXPIRES: str(expires), SIGNATURE: signature}
        if token_id:
            query = {EXPIRES: str(expires), SIGNED_BY: token_id, SIGNATURE: signature}
        return url + "?" + urlencode(query)

    def verify(self, method: str, env: str, path: str, query: Mapping[str, Any]) -> str | None:
        """Raise ForbiddenError unless `query` carries a valid, unexpired signature.

        Returns the id of the token the URL was signed for, if it was (the
        caller checks that it still exists).
        """
        expires_text = _one(query.get(EXPIRES))
        given = _one(query.get(SIGNATURE))
        token_id = _one(query.get(SIGNED_BY)) or None
        if not expires_text or not given:
            raise ForbiddenError("the URL is not signed")
        try:
            expires = int(expires_text)
        except ValueError:
            raise ForbiddenError("the URL's signature is invalid") from None
        verb = str(method).upper()
        signed_for = (verb, "GET") if verb == "HEAD" else (verb,)
        offered = given.encode("utf-8", "replace")
        if not any(
            hmac.compare_digest(self._signature(m, env, path, expires, token_id).encode(), offered)
            for m in signed_for
        ):
            raise ForbiddenError("the URL's signature is invalid")
        if expires <= time.time():
            raise ForbiddenError("the signed URL has expired")
        return token_id

    def _signature(
        self, method: str, env: str, path: str, expires: int, token_id: str | None = None
    ) -> str:
        verb = str(method).upper()
        parts = [verb, env, path, str(expires)]
        if token_id:  # a URL without it signs what it always did
            parts.append(token_id)
        message = "\n".join(parts).encode("utf-8", "surrogatepass")
        return hmac.new(self.__key, message, hashlib.sha256).hexdigest()


def _one(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0] if len(value) == 1 else None
    return value if isinstance(value, str) else ""


def shared_secret(db: Any) -> str:
    """RESCAT_SIGNING_SECRET, else the database's secret (created once, atomically)."""
    explicit = os.environ.get(SECRET_ENV)
    if explicit:
        return explicit
    settings = db[SETTINGS].with_options(write_concern=WriteConcern("majority"))
    for _ in range(3):
        try:
            doc = settings.find_one_and_update(
                {"_id": SECRET_ID},
                {"$setOnInsert": {"value": secrets.token_hex(32)}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            continue  # two first users at once: the other one's insert won; read it
        if doc is not None:
            return str(doc["value"])
    doc = settings.find_one({"_id": SECRET_ID})
    if doc is None:  # pragma: no cover - the upsert above always leaves one
        raise ForbiddenError("no signing secret")
    return str(doc["value"])
