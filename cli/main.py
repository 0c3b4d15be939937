"""Entry point of the `rescat` console script.

Every failure, usage errors included, ends with a non-zero status and one line
on stderr; `--debug` shows the traceback.
"""

from __future__ import annotations

import sys

import click
from pymongo.errors import InvalidName

from catalog.errors import CatalogError
from cli import admin, db, files, remote  # noqa: F401  (they register their commands)
from cli import history as _history  # noqa: F401  (registers `rescat history`)
from cli import kv as _kv  # noqa: F401  (registers `rescat kv`)
from cli.app import cli


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        status = cli.main(args=argv, prog_name="rescat", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:  # `rescat`, `rescat token`: help
        click.echo(exc.ctx.get_help() if exc.ctx else "")
        sys.exit(0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("rescat: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        if debug:
            raise
        click.echo(f"rescat: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except CatalogError as exc:
        if debug:
            raise
        click.echo(f"rescat: {_one_line(exc)}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("rescat: interrupted", err=True)
        sys.exit(130)
    except InvalidName as exc:  # --database (or RESCAT_DATABASE) that MongoDB refuses
        if debug:
            raise
        click.echo(f"rescat: invalid database name: {_one_line(exc)}", err=True)
        sys.exit(2)
    except Exception as exc:
        if debug:
            raise
        click.echo(f"rescat: {type(exc).__name__}: {_one_line(exc)}", err=True)
        sys.exit(1)
    # standalone_mode=False returns ctx.exit(n)'s status instead of exiting.
    sys.exit(status if isinstance(status, int) else 0)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    main()
