"""The `rescat` command group, its global options and the shared context.

Commands live in `cli.admin` (direct database access) and `cli.remote`
(HTTP only); both attach themselves to `cli` below. The database connection is
made lazily, so commands that talk HTTP never start the embedded mongod.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from catalog import ManagedStorage
from catalog.errors import CatalogError

if TYPE_CHECKING:
    from service.client import CatalogClient


@dataclass
class Context:
    mongo_uri: str | None
    database: str
    debug: bool = False
    default_env: str | None = None
    profile: dict[str, str] = field(default_factory=dict)
    _managed: ManagedStorage | None = field(default=None, repr=False)
    # Where --mongo-uri came from (a Level), and the data commands' --server / --token.
    mongo_level: int = 0
    server: str | None = None
    token: str | None = field(default=None, repr=False)
    server_level: int = 0
    _client: CatalogClient | None = field(default=None, repr=False)

    @property
    def http(self) -> CatalogClient | None:
        """The service's client when the data commands go over HTTP, else None.

        --server (or RESCAT_SERVER, or the profile's server) sends them to the
        service, unless a MongoDB URI is given at the same level or a closer one:
        the command line beats the environment, which beats the profile, and
        within the environment or the profile the database wins (a profile with
        both is an admin's, whose server is for upload and download).
        """
        if self.server is None or self.server_level <= self.mongo_level:
            return None
        if self._client is None:
            from service.client import CatalogClient

            self._client = CatalogClient(self.server, self.token)
            click.get_current_context().call_on_close(self._client.close)
        return self._client

    @property
    def uses_embedded(self) -> bool:
        """Whether the database is rescat's own local mongod (no URI anywhere)."""
        return not (self.mongo_uri or os.environ.get("RESCAT_MONGO_URI"))

    @property
    def managed(self) -> ManagedStorage:
        """The ManagedStorage for the configured database (connects on first use)."""
        if self._managed is None:
            from catalog import connect

            server = self.profile.get("server") or os.environ.get("RESCAT_SERVER")
            if self.uses_embedded and server:
                # An admin command (gc, fsck, stats...) works on a database, never through
                # a service: say which, rather than quietly use the local one.
                click.echo(
                    "rescat: this command works on a database, not through --server; "
                    "no MongoDB URI is set, so it uses rescat's own local mongod "
                    "(set mongo_uri in the profile, or --mongo-uri)",
                    err=True,
                )
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
    """Subcommands default to EnvCommand; a reader that went away ends the command quietly.

    `rescat kv watch ENV | head -1`, `rescat ls ENV | head`: once the reader
    of stdout is gone there is nobody to tell, so the command stops with the
    status a command killed by SIGPIPE has (141, what `set -o pipefail` sees
    of `yes | head -1`) and says nothing. SIGPIPE itself stays ignored: the
    service and the database driver write to sockets, where a closed peer is
    an error to handle, not a reason to die.
    """

    command_class = EnvCommand

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            _quiet_stdout()
            raise click.exceptions.Exit(128 + signal.SIGPIPE) from None


def _quiet_stdout() -> None:
    """Point stdout at /dev/null: the interpreter's last flush must not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (captured): nothing will flush to a pipe
        pass


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
    mongo_level = _level(ctx.get_parameter_source("mongo_uri")) if mongo_uri else NONE
    if ctx.get_parameter_source("mongo_uri") == ParameterSource.DEFAULT:
        mongo_uri = settings.get("mongo_uri") or None
        mongo_level = PROFILE if mongo_uri else NONE
    if ctx.get_parameter_source("database") == ParameterSource.DEFAULT:
        database = settings.get("database", database)
    default_env = settings.get("env") or None
    if default_env is not None:
        from catalog.names import check_env

        check_env(default_env)
    remote = {k: settings[k] for k in ("server", "token") if k in settings}
    if remote:
        ctx.default_map = {name: dict(remote) for name in REMOTE_COMMANDS}
    ctx.obj = Context(
        mongo_uri or None, database, debug, default_env, settings, mongo_level=mongo_level
    )


# Commands that take --server/--token (their defaults come from the profile).
REMOTE_COMMANDS = (
    "upload",
    "download",
    *("put", "get", "rm", "mv", "cp", "ls", "stat", "sync", "history"),  # with server_options
)

# Where a setting came from, closest last: a closer one wins.
NONE, PROFILE, ENVIRONMENT, COMMAND_LINE = range(4)


def _level(source: ParameterSource | None) -> int:
    if source == ParameterSource.COMMANDLINE:
        return COMMAND_LINE
    if source == ParameterSource.ENVIRONMENT:
        return ENVIRONMENT
    if source == ParameterSource.DEFAULT_MAP:
        return PROFILE
    return NONE


def server_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--server / --token for a data command: with them it goes through the HTTP service.

    The command never connects to MongoDB then (nor starts the embedded one),
    and what the service refuses is one line saying what to do about it.
    """

    @functools.wraps(fn)
    def run(*args: Any, server: str | None, token: str | None, **kwargs: Any) -> Any:
        click_ctx = click.get_current_context()
        obj = click_ctx.find_object(Context)
        assert obj is not None
        level = _level(click_ctx.get_parameter_source("server")) if server else NONE
        if level == COMMAND_LINE and obj.mongo_level == COMMAND_LINE:
            raise click.UsageError("give --server or --mongo-uri, not both")
        obj.server, obj.token, obj.server_level = server, token or None, level
        if obj.http is None:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except CatalogError as exc:
            raise with_hint(exc, obj.server or "") from None

    run = click.option(
        "--token",
        envvar="RESCAT_TOKEN",
        default=None,
        help="Bearer token for --server (env RESCAT_TOKEN, or the profile's token).",
    )(run)
    run = click.option(
        "--server",
        envvar="RESCAT_SERVER",
        default=None,
        help="Go through the HTTP service at this URL instead of the database "
        "(env RESCAT_SERVER, or the profile's server).",
    )(run)
    return run


def with_hint(exc: CatalogError, server: str) -> Exception:
    """The service's refusal, with what to do about it (one line)."""
    text = " ".join(str(exc).split())
    hint = {
        "unauthorized": "give a token with --token, RESCAT_TOKEN or the profile's token",
        "forbidden": "use a token for that environment (rescat token create --env ENV)",
        "unavailable": f"is the service at {server} running? check --server / RESCAT_SERVER",
    }.get(exc.code)
    if exc.code == "not_rescat":  # service.client.NotAServiceError
        base, what, advice = (getattr(exc, name) for name in ("base", "what", "advice"))
        return click.ClickException(
            f"{base} is not a rescat service ({what}); check --server: {advice}"
        )
    if hint is None:
        return exc
    return click.ClickException(f"{text}; {hint}")


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
