"""Shell completion of environments and paths (click's shell_complete).

Enable it once per shell (see README):

    eval "$(_RESCAT_COMPLETE=bash_source rescat)"     # bash, in ~/.bashrc
    eval "$(_RESCAT_COMPLETE=zsh_source rescat)"      # zsh, in ~/.zshrc
    _RESCAT_COMPLETE=fish_source rescat | source      # fish

Completion runs on every TAB, so it must be quick and must never start a
server: it uses the configured URI, or the embedded mongod only if it runs
already, with a short timeout, and completes nothing when neither answers.
Paths complete one folder at a time, as a file system would.
"""

from __future__ import annotations

import contextlib
from typing import Any

import click
from click.shell_completion import CompletionItem

LIMIT = 200
TIMEOUT_MS = 1500


def _database(ctx: click.Context) -> Any | None:
    import os

    from pymongo import MongoClient

    root = ctx.find_root().params
    uri = root.get("mongo_uri") or os.environ.get("RESCAT_MONGO_URI")
    database = root.get("database") or "rescat"
    with contextlib.suppress(Exception):
        from cli.config import load_profile

        profile = load_profile(root.get("profile"))
        uri = uri or profile.get("mongo_uri")
        database = profile.get("database", database) if database == "rescat" else database
    if not uri:
        from catalog.mongod import embedded_status

        uri = embedded_status()["uri"]
        if not uri:
            return None
    client: Any = MongoClient(uri, serverSelectionTimeoutMS=TIMEOUT_MS, timeoutMS=TIMEOUT_MS)
    return client[database]


def complete_env(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Environments that have paths and start with what was typed."""
    with contextlib.suppress(Exception):
        db = _database(ctx)
        if db is None:
            return []
        envs = db["paths"].distinct("env")
        return [CompletionItem(e) for e in sorted(envs) if e.startswith(incomplete)][:LIMIT]
    return []


def _service(ctx: click.Context) -> tuple[str, str | None] | None:
    """(URL, token) of the service when no database is configured but a server is."""
    import os

    root = ctx.find_root().params
    server, token = ctx.params.get("server"), ctx.params.get("token")
    with contextlib.suppress(Exception):
        from cli.config import load_profile

        profile = load_profile(root.get("profile"))
        if root.get("mongo_uri") or os.environ.get("RESCAT_MONGO_URI") or profile.get("mongo_uri"):
            return None  # at the same level the database wins, as for the commands
        server = server or os.environ.get("RESCAT_SERVER") or profile.get("server")
        token = token or os.environ.get("RESCAT_TOKEN") or profile.get("token")
    return (str(server), token) if server else None


def _remote_paths(service: tuple[str, str | None], env: str, incomplete: str) -> list[str]:
    """One folder level of the paths under `incomplete`, from the service's listing."""
    import httpx

    url, token = service
    headers = {"authorization": f"Bearer {token}"} if token else {}
    params = {"prefix": incomplete, "delimiter": "/", "limit": str(LIMIT)}
    got = httpx.get(
        f"{url.rstrip('/')}/v1/environments/{env}/resources",
        params=params,
        headers=headers,
        timeout=TIMEOUT_MS / 1000,
    )
    got.raise_for_status()
    page = got.json()
    return sorted({*(i["path"] for i in page.get("items", [])), *page.get("prefixes", [])})


def complete_path(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Paths of the ENV typed before, up to the next '/' after what was typed.

    From the database, or from the service (--server, RESCAT_SERVER, the
    profile's server) when no database is configured.
    """
    env = ctx.params.get("env") or ctx.params.get("first")  # `first`: mv's and cp's ENV
    if not env or ":" in env:
        return []
    with contextlib.suppress(Exception):
        import re

        service = _service(ctx)
        if service is not None:
            return [CompletionItem(p) for p in _remote_paths(service, env, incomplete)[:LIMIT]]
        db = _database(ctx)
        if db is None:
            return []
        query = {"env": env, "path": {"$regex": "^" + re.escape(incomplete)}}
        seen: list[str] = []
        for doc in db["paths"].find(query, {"path": 1}).sort("path", 1).limit(LIMIT * 10):
            path = str(doc["path"])
            cut = path.find("/", len(incomplete))
            item = path if cut < 0 else path[: cut + 1]
            if not seen or seen[-1] != item:
                seen.append(item)
            if len(seen) >= LIMIT:
                break
        return [CompletionItem(p) for p in seen]
    return []
