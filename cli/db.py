"""`rescat db`: the embedded MongoDB as something a user can see and stop; `rescat config`.

The embedded mongod outlives the commands that start it (so each call does not
pay its start-up); these commands say where it is and stop it cleanly. They
never start it.
"""

from __future__ import annotations

import os

import click
from click.core import ParameterSource

from cli.app import Context, cli, echo_json, pass_ctx


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


@cli.group("db", cls=click.Group, invoke_without_command=True)
@click.pass_context
def db_group(click_ctx: click.Context) -> None:
    """The embedded MongoDB (used when no --mongo-uri / RESCAT_MONGO_URI is set).

    Its data lives under RESCAT_DATA_DIR (default: the user data directory,
    e.g. ~/.local/share/rescat). It keeps running after a command or
    `rescat serve` ends; `rescat db stop` stops it.

    \b
    Example:
      rescat db status
      rescat db stop
    """
    if click_ctx.invoked_subcommand is None:
        click.echo(click_ctx.get_help())


@db_group.command("status", cls=click.Command)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_ctx
def db_status(ctx: Context, as_json: bool) -> None:
    """Data directory, port, PID and size of the embedded mongod; starts nothing.

    \b
    Example:
      rescat db status
      rescat db status --json
    """
    from catalog.mongod import embedded_status

    status = embedded_status()
    if as_json:
        echo_json(dict(status))
        return
    rows = [
        ("state", "running" if status["running"] else "stopped"),
        ("data dir", status["data_dir"]),
        ("size", f"{status['size_bytes']} ({_human(status['size_bytes'])})"),
        ("port", str(status["port"] or "-")),
        ("pid", str(status["pid"] or "-")),
        ("uri", status["uri"] or "-"),
        ("log", status["log"]),
    ]
    for key, value in rows:
        click.echo(f"{key + ':':<10} {value}")
    if not ctx.uses_embedded:
        click.echo(
            "rescat: note: this configuration uses --mongo-uri, not the embedded mongod", err=True
        )


@db_group.command("stop", cls=click.Command)
def db_stop() -> None:
    """Stop the embedded mongod cleanly; the next command that needs it starts it again.

    \b
    Example:
      rescat db stop
    """
    from catalog.mongod import stop_embedded

    pid = stop_embedded()
    if pid is None:
        click.echo("rescat: the embedded mongod is not running", err=True)
    else:
        click.echo(f"rescat: stopped the embedded mongod (pid {pid})", err=True)


@cli.command("config", cls=click.Command)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_ctx
def config_show(ctx: Context, as_json: bool) -> None:
    """Show the config file's location and the settings in effect, each with its source.

    Profiles are tables of ~/.config/rescat/config.toml (RESCAT_CONFIG names
    another file) with the keys server, token, env, mongo_uri, database; pick
    one with --profile NAME or RESCAT_PROFILE (default: [default]). The
    command line beats the environment (RESCAT_MONGO_URI, RESCAT_DATABASE,
    RESCAT_SERVER, RESCAT_TOKEN), which beats the profile.

    \b
    Example:
      rescat config
      rescat --profile prod config --json
    """
    from cli.config import config_path

    settings, sources = _in_effect(ctx)
    shown = {k: ("***" if k == "token" else v) for k, v in settings.items()}
    if as_json:
        echo_json({"file": str(config_path()), "settings": shown, "sources": sources})
        return
    click.echo(f"file: {config_path()}")
    for key, value in sorted(shown.items()):
        click.echo(f"{key}: {value}  ({sources[key]})")


def _in_effect(ctx: Context) -> tuple[dict[str, str], dict[str, str]]:
    """What the data commands use: (settings, where each came from)."""
    root = click.get_current_context().find_root()
    names = {
        ParameterSource.COMMANDLINE: "command line",
        ParameterSource.ENVIRONMENT: "environment",
    }
    settings: dict[str, str] = {}
    sources: dict[str, str] = {}

    def put(key: str, value: str | None, source: str) -> None:
        if value:
            settings[key], sources[key] = value, source

    profile = ctx.profile
    for key in ("mongo_uri", "database"):
        source = root.get_parameter_source(key)
        if source in names:
            put(key, str(root.params[key]), names[source])  # type: ignore[index]
        elif key in profile:
            put(key, profile[key], "profile")
    if "database" not in settings:
        put("database", ctx.database, "default")
    if "mongo_uri" not in settings:
        put("mongo_uri", "(rescat's own local mongod)", "default")
    for key, variable in (("server", "RESCAT_SERVER"), ("token", "RESCAT_TOKEN")):
        if os.environ.get(variable):
            put(key, os.environ[variable], "environment")
        else:
            put(key, profile.get(key), "profile")
    put("env", profile.get("env"), "profile")
    return settings, sources
