"""Commands that run or talk to the HTTP service: serve, token, upload, download.

`upload` and `download` talk HTTP only: they never touch the database (and so
never start the embedded mongod). `serve` and `token` work on the database.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import re
import sys
from collections.abc import Iterator
from typing import Any

import click

from catalog.errors import CatalogError
from catalog.reaper import DEFAULT_REAP_INTERVAL
from cli.app import SOURCE, Context, cli, echo_json, pass_ctx, with_hint
from cli.history import BlobServe, blob_serve_options
from cli.progress import bar
from service.localfiles import is_regular_source

DEFAULT_SERVER = "http://127.0.0.1:8470"
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


def parse_size(value: str) -> int:
    """`1048576`, `512M`, `10G`, `1.5GiB` -> bytes (binary multiples)."""
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise ValueError(f"not a size: {value!r} (examples: 1048576, 512M, 10G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


# -- serve --------------------------------------------------------------------
@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8470, show_default=True, type=click.IntRange(0, 65535))
@click.option("--no-auth", is_flag=True, help="Serve without tokens (local use only).")
@click.option(
    "--max-size",
    callback=_size_option,
    default=None,
    help="Largest object accepted (bytes, or 512M, 10G...); larger uploads get 413.",
)
@click.option(
    "--read-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds a request body may pause before it is dropped (408).",
)
@click.option(
    "--min-rate",
    type=float,
    default=1024.0,
    show_default=True,
    help="Bytes/s a request body must average once --read-timeout seconds have passed (0: off).",
)
@click.option(
    "--header-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds a request's line and headers may take; then the connection is closed.",
)
@click.option(
    "--max-conns-per-client",
    type=click.IntRange(0),
    default=64,
    show_default=True,
    help="Open connections per client IP address; more get 429 (0: no cap).",
)
@click.option(
    "--token-cache",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Seconds a known token is trusted without a database lookup; a revocation "
    "takes up to this long (0: looked up on every request, revocation at once).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="info logs one JSON line per request on stderr.",
)
@click.option(
    "--dedup-scope",
    type=click.Choice(["global", "environment"]),
    default=None,
    help="environment: a put-request only finds content the same environment already "
    "references (no cross-environment side channel). Default global, or $RESCAT_DEDUP_SCOPE.",
)
@click.option(
    "--reap-interval",
    type=click.FloatRange(min=0),
    default=DEFAULT_REAP_INTERVAL,
    show_default=True,
    metavar="SECONDS",
    help="Delete expired TTL keys every SECONDS, so that watchers see each expiry as a "
    "delete event, as with etcd's leases (0: off; reads hide them anyway, gc reclaims them).",
)
@blob_serve_options
@pass_ctx
def serve(
    ctx: Context,
    host: str,
    port: int,
    no_auth: bool,
    max_size: int | None,
    read_timeout: float,
    min_rate: float,
    header_timeout: float,
    max_conns_per_client: int,
    token_cache: float,
    log_level: str,
    dedup_scope: str | None,
    reap_interval: float,
    blob: BlobServe,
) -> None:
    """Run the HTTP service (API under /v1, /healthz, /metrics, /openapi.json).

    Several instances on one database behave as one service.

    \b
    Example:
      rescat --mongo-uri mongodb://db:27017/?replicaSet=rs0 serve --host 0.0.0.0 --max-size 10G
      rescat serve --no-auth            # local use, embedded MongoDB
      rescat serve --gc-interval 3600 --compat-store team-a
    """

    from service.app import create_app
    from service.routes import ROUTES
    from service.server import Limits, run

    logging.basicConfig(
        level=getattr(logging, log_level.upper()), format="%(message)s", stream=sys.stderr
    )
    sock = _listen(host, port)
    try:
        embedded = ctx.uses_embedded
        managed = ctx.managed
        if dedup_scope is not None:
            managed.dedup_scope = dedup_scope
        app = create_app(
            managed,
            auth=not no_auth,
            max_size=max_size,
            read_timeout=read_timeout,
            routes=blob.routes(ROUTES),
            min_rate=min_rate,
            token_cache_seconds=token_cache,
            reap_interval=reap_interval or None,
        )
        limits = Limits(header_timeout=header_timeout, max_conns_per_client=max_conns_per_client)
        bound_host, bound_port = sock.getsockname()[:2]
        shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        auth = "off (--no-auth)" if no_auth else "on"
        click.echo(
            f"rescat: serving on http://{shown_host}:{bound_port} (auth {auth}); "
            + _data_banner(ctx, embedded)
            + (f"; {blob.banner()}" if blob.banner() else ""),
            err=True,
        )
        watchdog = None
        if embedded:
            from catalog.mongod import Watchdog

            watchdog = Watchdog()
            watchdog.start()
        try:
            with blob.running(managed):
                run(app, sock, limits, log_level=log_level)
        finally:
            if watchdog is not None:
                watchdog.stop()
    finally:
        sock.close()


def _listen(host: str, port: int) -> Any:
    """Bind before anything else, so a busy port is one line and no banner."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        hint = " (is another service on it? pick another with --port, or --port 0)"
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            + (hint if exc.errno in (errno.EADDRINUSE, errno.EACCES) else "")
        ) from None
    return sock


def _data_banner(ctx: Context, embedded: bool) -> str:
    if not embedded:
        from catalog.connect import redact

        return f"data in MongoDB at {redact(ctx.mongo_uri or '')}, database {ctx.database}"
    from catalog.mongod import embedded_status

    status = embedded_status()
    return (
        f"data in {status['data_dir']} (embedded mongod, pid {status['pid']}, port "
        f"{status['port']}, database {ctx.database}; it keeps running after serve stops: "
        "`rescat db stop`)"
    )


# -- token --------------------------------------------------------------------
@cli.group()
def token() -> None:
    """Create, list and revoke API tokens (stored hashed in MongoDB).

    \b
    Example:
      TOKEN=$(rescat token create --env team-a)
      rescat token list
      rescat token revoke 3f9a1c2b4d5e
    """


def _store(ctx: Context) -> Any:
    from catalog.tokens import TokenStore

    return TokenStore(ctx.managed.db)


@token.command("create")
@click.option("--env", "env", default=None, help="The environment the token is for.")
@click.option("--admin", is_flag=True, help="A token for every environment.")
@click.option("--description", default="", help="A note shown by `token list`.")
@pass_ctx
def token_create(ctx: Context, env: str | None, admin: bool, description: str) -> None:
    """Create a token and print it on one line (it is not shown again).

    \b
    Example:
      rescat token create --env team-a --description "CI of team a"
      rescat token create --admin
    """
    if admin == (env is not None):
        raise click.UsageError("give exactly one of --env ENV and --admin")
    from catalog.names import check_env

    if env is not None:
        check_env(env)
    secret, info = _store(ctx).create(env=env, admin=admin, description=description)
    click.echo(secret)
    scope = f"{info.scope} {info.env}" if info.env else info.scope
    click.echo(f"rescat: created token {info.id} ({scope})", err=True)


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@pass_ctx
def token_list(ctx: Context, as_json: bool) -> None:
    """List tokens (ids and scopes, never the secrets).

    \b
    Example:
      rescat token list --json
    """
    infos = _store(ctx).list()
    if as_json:
        echo_json([info.as_dict() for info in infos])
        return
    for info in infos:
        created = info.created_at.isoformat().replace("+00:00", "Z") if info.created_at else "-"
        scope = "admin" if info.admin else f"env:{info.env}"
        click.echo(f"{info.id}\t{scope}\t{created}\t{info.description}".rstrip())


# `ls` as `env ls` has it: the name a hand types first.
token.add_command(token_list, "ls")


@token.command("revoke")
@click.argument("token_id")
@pass_ctx
def token_revoke(ctx: Context, token_id: str) -> None:
    """Revoke a token by id; every instance refuses it from the next request.

    \b
    Example:
      rescat token revoke 3f9a1c2b4d5e
    """
    _store(ctx).revoke(token_id)
    click.echo(f"rescat: revoked token {token_id}", err=True)


# -- upload / download (HTTP only) ----------------------------------------------
def _server_options(fn: Any) -> Any:
    """--server and --token; the service's refusals said with what to do about them."""

    command = fn

    @functools.wraps(command)
    def hinted(*args: Any, server: str, **kwargs: Any) -> Any:
        try:
            return command(*args, server=server, **kwargs)
        except CatalogError as exc:
            raise with_hint(exc, server) from None

    fn = click.option(
        "--token",
        envvar="RESCAT_TOKEN",
        default=None,
        help="Bearer token (env RESCAT_TOKEN).",
    )(hinted)
    fn = click.option(
        "--server",
        envvar="RESCAT_SERVER",
        default=DEFAULT_SERVER,
        show_default=True,
        help="Service root URL (env RESCAT_SERVER).",
    )(fn)
    return fn


class _Bars:
    """One tqdm bar per phase of a transfer, on stderr when it is a terminal."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.phase: str | None = None
        self.bar: Any = None
        self.done = 0

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if phase == "resume":  # a resumable upload picks up after a dropped connection
            click.echo(f"rescat: {self.name}: resuming at {done} bytes", err=True)
            if self.bar is not None:
                self.bar.n = done
                self.bar.refresh()
            self.done = done
            return
        if phase != self.phase:
            self.close()
            self.phase, self.done = phase, 0
            self.bar = bar(total, f"{phase} {self.name}")
        if self.bar is not None:
            self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@cli.command()
@_server_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead.")
@click.option(
    "--resumable/--no-resumable",
    default=None,
    help="Send through a resumable upload session (default: when larger than 64 MiB).",
)
@click.argument("env")
@click.argument("path")
@click.argument("file", type=SOURCE)
def upload(
    server: str,
    token: str | None,
    as_json: bool,
    resumable: bool | None,
    env: str,
    path: str,
    file: str,
) -> None:
    """Upload FILE (- for stdin) to PATH, sending no bytes the service already has.

    Hashes FILE locally, proves to the service that it holds the content, and
    only uploads when the service lacks it. Prints blake3:<hex>. Files larger
    than 64 MiB go through a resumable upload that picks up where a dropped
    connection left it ("resuming at N bytes" on stderr).

    \b
    Example:
      rescat upload --server http://catalog:8470 --token "$TOKEN" team-a charms/app.tar ./app.tar
      RESCAT_SERVER=http://catalog:8470 RESCAT_TOKEN=... rescat upload team-a a/b.bin b.bin
    """
    from service.client import CatalogClient

    progress = _Bars(path)
    try:
        with CatalogClient(server, token) as client:
            if file == "-" or not is_regular_source(file):
                # A pipe streams (no spooling, no dedup round trip): its hash is
                # only known at the end, checked against the service's.
                source: Any = sys.stdin.buffer if file == "-" else file
                result = client.put(env, path, source, progress=progress)
            else:
                result = client.upload(env, path, file, progress=progress, resumable=resumable)
    finally:
        progress.close()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "path": result.path,
                    "hash": result.hash,
                    "length": result.length,
                    "deduplicated": result.deduplicated,
                    "bytes_sent": result.bytes_sent,
                }
            )
        )
    else:
        click.echo(f"blake3:{result.hash}")


@cli.command()
@_server_options
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    default=None,
    help="Write to this file (resumes a partial one) instead of stdout.",
)
@click.argument("env")
@click.argument("path")
def download(server: str, token: str | None, output: str | None, env: str, path: str) -> None:
    """Download PATH to stdout or -o FILE, verifying its length and BLAKE3.

    \b
    Example:
      rescat download --server http://catalog:8470 team-a charms/app.tar -o app.tar
      rescat download team-a charms/app.tar | tar t
    """
    from service.client import CatalogClient

    progress = _Bars(path)
    try:
        with CatalogClient(server, token) as client:
            if output is None or output == "-":
                client.download(env, path, sys.stdout.buffer, progress=progress)
                sys.stdout.buffer.flush()
            else:
                client.download(env, path, output, progress=progress)
    finally:
        progress.close()


# -- the data commands' --server mode (called by cli.admin and cli.files) ----------------
def send_file(
    client: Any,
    env: str,
    path: str,
    file: str,
    *,
    if_match: int | str | None = None,
    if_none_match: bool = False,
) -> tuple[str, int]:
    """`put` over HTTP: (hash, length).

    A regular file goes by the dedup workflow, a pipe is streamed; a put with
    a condition is one plain PUT carrying it (the dedup proof carries none).
    """
    progress = _Bars(path)
    conditional = if_match is not None or if_none_match
    try:
        if conditional or file == "-" or not is_regular_source(file):
            source: Any = sys.stdin.buffer if file == "-" else file
            result = client.put(
                env, path, source, progress=progress,
                if_match=if_match, if_none_match=if_none_match,
            )  # fmt: skip
        else:
            result = client.upload(env, path, file, progress=progress)
    finally:
        progress.close()
    return str(result.hash), int(result.length)


def fetch_file(client: Any, env: str, path: str, output: str | None) -> None:
    """`get` over HTTP: to stdout, or to a file replaced only once verified."""
    progress = _Bars(path)
    try:
        if output is None or output == "-":
            client.download(env, path, sys.stdout.buffer, progress=progress)
            sys.stdout.buffer.flush()
        else:
            client.download(env, path, output, progress=progress)
    finally:
        progress.close()


def listing(
    client: Any, env: str, prefix: str, delimiter: str | None, detail: bool
) -> Iterator[dict[str, Any]]:
    """`ls` over HTTP: path items, and `{"folder"}` items the service folded (delimiter=)."""
    for item in client.iter_list(env, prefix, delimiter=delimiter, detail=detail):
        if "prefix" in item:
            yield {"folder": item["prefix"]}
        else:
            yield item
