"""The `rescat` command group, its global options and the shared context.

Commands live in `cli.admin` (direct database access) and `cli.remote`
(HTTP only); both attach themselves to `cli` below. The database connection is
made lazily, so commands that talk HTTP never start the embedded mongod.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

import click

from catalog import ManagedStorage


@dataclass
class Context:
    mongo_uri: str | None
    database: str
    debug: bool = False
    _managed: ManagedStorage | None = field(default=None, repr=False)

    @property
    def managed(self) -> ManagedStorage:
        """The ManagedStorage for the configured database (connects on first use)."""
        if self._managed is None:
            from catalog import connect

            self._managed = connect(self.mongo_uri, self.database)
        return self._managed


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--mongo-uri",
    envvar="RESCAT_MONGO_URI",
    default=None,
    help="MongoDB URI (env RESCAT_MONGO_URI). Default: a local mongod of rescat's own.",
)
@click.option(
    "--database",
    envvar="RESCAT_DATABASE",
    default="rescat",
    show_default=True,
    help="Database name (env RESCAT_DATABASE).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="rescat")
@click.pass_context
def cli(ctx: click.Context, mongo_uri: str | None, database: str, debug: bool) -> None:
    """rescat: a content-addressed, reference-counted resource catalog.

    \b
    Example:
      rescat put team-a charms/app.tar ./app.tar
      rescat ls team-a charms/ --json
    """
    ctx.obj = Context(mongo_uri or None, database, debug)


def echo_json(data: Any) -> None:
    """Print data as JSON on stdout (datetimes as RFC 3339)."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    import datetime

    if isinstance(value, datetime.datetime):
        return value.isoformat().replace("+00:00", "Z")
    return str(value)


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
