"""The `rescat` command group, its global options and the shared context.

Commands live in `cli.admin` (direct database access) and `cli.remote`
(HTTP only); both attach themselves to `cli` below. The database connection is
made lazily, so commands that talk HTTP never start the embedded mongod.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import click
from click.core import ParameterSource

from catalog import ManagedStorage


@dataclass
class Context:
    mongo_uri: str | None
    database: str
    debug: bool = False
    default_env: str | None = None
    profile: dict[str, str] = field(default_factory=dict)
    _managed: ManagedStorage | None = field(default=None, repr=False)

    @property
    def uses_embedded(self) -> bool:
        """Whether the database is rescat's own local mongod (no URI anywhere)."""
        return not (self.mongo_uri or os.environ.get("RESCAT_MONGO_URI"))

    @property
    def managed(self) -> ManagedStorage:
        """The ManagedStorage for the configured database (connects on first use)."""
        if self._managed is None:
            from catalog import connect

            self._managed = connect(self.mongo_uri, self.database)
        return self._managed


pass_ctx = click.make_pass_decorator(Context)

# What `put` and `upload` read: one type, so both say the same about a bad FILE.
SOURCE = click.Path(exists=True, allow_dash=True, readable=True)


class EnvCommand(click.Command):
    """A command whose leading ENV argument may be left out when a profile names one.

    ENV is filled in when exactly one required argument is missing, or when the
    first argument cannot be an environment id (it holds a '/', as in
    `rescat ls charms/`), so an explicit ENV always means what it says.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        default_env = _default_env(ctx)
        if default_env and not ctx.resilient_parsing:
            arguments = [p for p in self.params if isinstance(p, click.Argument)]
            required = sum(1 for p in arguments if p.required)
            try:
                values, _, _ = self.make_parser(ctx).parse_args(args=list(args))
            except click.UsageError:
                values = None
            if values is not None and arguments:
                given = sum(1 for p in arguments if _given(values.get(p.name or "")))
                first = values.get(arguments[0].name or "")
                if given == required - 1 or (
                    given and isinstance(first, str) and not _is_env(first)
                ):
                    args = [default_env, *args]
        return super().parse_args(ctx, args)


def _given(value: object) -> bool:
    """Whether the parser saw a value (click >= 8.2 marks a missing one with a sentinel)."""
    return value is not None and type(value).__name__ != "Sentinel"


def _is_env(text: str) -> bool:
    from catalog.errors import InvalidPathError
    from catalog.names import check_env

    try:
        check_env(text)
    except InvalidPathError:
        return False
    return True


def _default_env(ctx: click.Context) -> str | None:
    obj = ctx.find_object(Context)
    return obj.default_env if obj is not None else None


class Group(click.Group):
    """Subcommands default to EnvCommand."""

    command_class = EnvCommand


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option(
    "--profile",
    envvar="RESCAT_PROFILE",
    default=None,
    help="Profile of the config file to use (env RESCAT_PROFILE). See `rescat config`.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="rescat")
@click.pass_context
def cli(
    ctx: click.Context, mongo_uri: str | None, database: str, profile: str | None, debug: bool
) -> None:
    """rescat: a content-addressed, reference-counted resource catalog.

    \b
    Example:
      rescat put team-a charms/app.tar ./app.tar
      rescat ls team-a charms/ --json
    """
    from cli.config import load_profile

    settings = load_profile(profile)
    if ctx.get_parameter_source("mongo_uri") == ParameterSource.DEFAULT:
        mongo_uri = settings.get("mongo_uri") or None
    if ctx.get_parameter_source("database") == ParameterSource.DEFAULT:
        database = settings.get("database", database)
    default_env = settings.get("env") or None
    if default_env is not None:
        from catalog.names import check_env

        check_env(default_env)
    remote = {k: settings[k] for k in ("server", "token") if k in settings}
    if remote:
        ctx.default_map = {name: dict(remote) for name in REMOTE_COMMANDS}
    ctx.obj = Context(mongo_uri or None, database, debug, default_env, settings)


# Commands that take --server/--token (their defaults come from the profile).
REMOTE_COMMANDS = ("upload", "download")


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
