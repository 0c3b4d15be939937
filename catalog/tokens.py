"""API tokens for the HTTP service, kept in MongoDB.

A token is shown once, when it is created; the database keeps only its SHA-256
(a token is 32 random bytes, so a fast hash is enough: there is nothing to
brute-force). Every request looks its token up, so a token created or revoked
through any instance, or the CLI, takes effect at once in every instance.

A token's scope is one environment or `admin` (every environment).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from pymongo import ASCENDING, WriteConcern
from pymongo.database import Database

from catalog.clock import aware, utcnow
from catalog.errors import ForbiddenError, NotFoundError, UnauthorizedError
from catalog.names import check_env

TOKEN_PREFIX = "rescat_"
ADMIN = "admin"
_ID_BYTES = 6
_SECRET_BYTES = 32


@dataclass(frozen=True)
class TokenInfo:
    """A stored token, without its secret."""

    id: str
    scope: str  # "admin" or "env"
    env: str | None  # the environment when scope == "env"
    created_at: Any
    description: str = ""

    @property
    def admin(self) -> bool:
        return self.scope == ADMIN

    def allows(self, env_uuid: str) -> bool:
        return self.admin or self.env == env_uuid

    def check_env(self, env_uuid: str) -> None:
        """Raise ForbiddenError unless this token may act on `env_uuid`."""
        if not self.allows(env_uuid):
            raise ForbiddenError(f"this token is not valid for environment {env_uuid!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scope": self.scope,
            "env": self.env,
            "created_at": self.created_at,
            "description": self.description,
        }


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """Create, list, revoke and check tokens in the `tokens` collection."""

    def __init__(self, db: Database[Any], collection: str = "tokens") -> None:
        self.tokens = db[collection].with_options(write_concern=WriteConcern("majority"))
        self.tokens.create_index([("digest", ASCENDING)], unique=True)

    def create(
        self, *, env: str | None = None, admin: bool = False, description: str = ""
    ) -> tuple[str, TokenInfo]:
        """A new token for one environment (`env`) or every one (`admin`): (secret, info)."""
        if admin == (env is not None):
            raise ValueError("a token is for exactly one of: an environment, or admin")
        if env is not None:
            check_env(env)
        token_id = secrets.token_hex(_ID_BYTES)
        token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
        info = TokenInfo(
            id=token_id,
            scope=ADMIN if admin else "env",
            env=env,
            created_at=utcnow(),
            description=description,
        )
        self.tokens.insert_one(
            {
                "_id": token_id,
                "digest": token_digest(token),
                "scope": info.scope,
                "env": env,
                "created_at": info.created_at,
                "description": description,
            }
        )
        return token, info

    def list(self) -> list[TokenInfo]:
        return [_info(doc) for doc in self.tokens.find({}, sort=[("created_at", ASCENDING)])]

    def revoke(self, token_id: str) -> None:
        """Delete a token by id (NotFoundError when there is none)."""
        if self.tokens.delete_one({"_id": token_id}).deleted_count == 0:
            raise NotFoundError(f"no token with id {token_id!r}")

    def exists(self, token_id: str) -> bool:
        """Whether the token with this id is still there (not revoked)."""
        return self.tokens.find_one({"_id": token_id}, {"_id": 1}) is not None

    def check(self, token: str | None) -> TokenInfo:
        """The token's info; UnauthorizedError when it is missing or unknown."""
        if not token:
            raise UnauthorizedError("a bearer token is required")
        digest = token_digest(token)
        doc = self.tokens.find_one({"digest": digest})
        if doc is None or not hmac.compare_digest(str(doc["digest"]), digest):
            raise UnauthorizedError("unknown or revoked token")
        return _info(doc)


def _info(doc: dict[str, Any]) -> TokenInfo:
    created = doc.get("created_at")
    return TokenInfo(
        id=str(doc["_id"]),
        scope=str(doc.get("scope", "env")),
        env=doc.get("env"),
        created_at=aware(created) if created is not None else None,
        description=str(doc.get("description", "")),
    )
