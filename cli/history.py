"""`rescat history`, and the blob-server options of `rescat serve`.

`history ENV PATH` prints one line per operation on the path, oldest first
(`--json`: `{"items": [...]}` as `GET /v1/environments/{env}/history/{path}`).
`blob_serve_options` adds `--gc-interval`, `--gc-grace`, `--history-days` and
`--compat-store` to `serve` and hands it one `BlobServe` that knows the extra
routes and runs online gc while the server runs.
"""

from __future__ import annotations

import functools
import itertools
import json
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from catalog import gc as gc_sweep
from catalog import history as path_history
from catalog.errors import NotFoundError
from catalog.managed import ManagedStorage
from cli.app import Context, cli, pass_ctx, server_options
from cli.completion import complete_env, complete_path

F = TypeVar("F", bound=Callable[..., Any])


@cli.command()
@click.argument("env", shell_complete=complete_env)
@click.argument("path", shell_complete=complete_path)
@click.option("--json", "as_json", is_flag=True, help='Print {"items": [...]} as the HTTP route.')
@server_options
@pass_ctx
def history(ctx: Context, env: str, path: str, as_json: bool) -> None:
    """Show every operation on PATH, oldest first (also after it was deleted).

    Each line: time, event (create, replace, move, delete, or upload for one
    that failed or is running), state (ok, failed, pending), revision, hash and
    length. Kept for `rescat gc --history-days` days.

    \b
    Example:
      rescat history team-a charms/app.tar
      rescat history team-a charms/app.tar --json
      rescat history --server http://catalog:8470 team-a charms/app.tar
    """
    if ctx.http is not None:
        items = ctx.http.iter_history(env, path)
    else:
        items = path_history.shown(ctx.managed.iter_history(env, path))
    first = next(items, None)
    if first is None:
        raise NotFoundError(f"{env}: no history for {path!r}", path=path)
    # Printed as read: a hot key's history, kept by age, may hold millions of items.
    if as_json:
        for piece in _json_pieces(itertools.chain((first,), items)):
            click.echo(piece)
        return
    for item in itertools.chain((first,), items):
        digest = f"blake3:{item['hash']}" if item["hash"] else "-"
        click.echo(
            f"{item['at']}  {item['event']:<7}  {item['state']:<7}  "
            f"rev {item['revision']}  {digest}  {item['length']}"
        )


def _json_pieces(items: Iterator[dict[str, Any]]) -> Iterator[str]:
    """`json.dumps({"items": [...]}, indent=2)`, the same text, an item at a time."""
    yield '{\n  "items": ['
    previous: dict[str, Any] | None = None
    for item in items:
        if previous is not None:
            yield textwrap.indent(json.dumps(previous, indent=2), "    ") + ","
        previous = item
    if previous is not None:
        yield textwrap.indent(json.dumps(previous, indent=2), "    ")
    yield "  ]\n}"


@dataclass(frozen=True)
class BlobServe:
    """What `serve`'s blob-server options ask for."""

    gc_interval: float | None
    gc_grace: float
    history_days: float
    compat_store: str | None

    def routes(self, base: tuple[Any, ...]) -> tuple[Any, ...]:
        """The service's routes, with the seed's /store routes when --compat-store is given."""
        if self.compat_store is None:
            return base
        from service.routes_blob import compat_store_routes

        return (*base, *compat_store_routes(self.compat_store))

    def banner(self) -> str:
        parts = []
        if self.compat_store is not None:
            parts.append(f"/store on environment {self.compat_store}")
        if self.gc_interval is not None:
            parts.append(f"gc every {self.gc_interval:g} s (grace {self.gc_grace:g} s)")
        return "; ".join(parts)

    @contextmanager
    def running(self, managed: ManagedStorage) -> Iterator[None]:
        """Online gc (one instance at a time across the database) while the block runs."""
        if self.gc_interval is None:
            yield
            return
        from catalog.online_gc import OnlineGc

        with OnlineGc(
            managed, self.gc_interval, grace=self.gc_grace, history_days=self.history_days
        ):
            yield


def blob_serve_options(fn: F) -> F:
    """Add the blob-server options to `serve`; it receives them as `blob: BlobServe`."""

    @functools.wraps(fn)
    def wrapper(
        *args: Any,
        gc_interval: float | None,
        gc_grace: float,
        history_days: float,
        compat_store: str | None,
        **kwargs: Any,
    ) -> Any:
        if compat_store is not None:
            from catalog.names import check_env

            check_env(compat_store)
        blob = BlobServe(gc_interval, gc_grace, history_days, compat_store)
        return fn(*args, blob=blob, **kwargs)

    for option in reversed(
        (
            click.option(
                "--gc-interval",
                type=click.FloatRange(min=0, min_open=True),
                default=None,
                metavar="SECONDS",
                help="Run gc online every SECONDS (one instance at a time per database).",
            ),
            click.option(
                "--gc-grace",
                type=click.FloatRange(min=0),
                default=gc_sweep.DEFAULT_GC_GRACE,
                show_default=True,
                metavar="SECONDS",
                help="With --gc-interval: gc's grace period.",
            ),
            click.option(
                "--history-days",
                type=click.FloatRange(min=0),
                default=path_history.DEFAULT_HISTORY_DAYS,
                show_default=True,
                help="With --gc-interval: keep path history this many days.",
            ),
            click.option(
                "--compat-store",
                metavar="ENV",
                default=None,
                help="Also serve the seed's API (/store/{name}) on environment ENV.",
            ),
        )
    ):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]
