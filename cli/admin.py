"""Admin commands over the core library (direct database access).

Thin faces over `catalog` (and its `stats`, `gc`, `fsck` modules): they validate names
before connecting, stream bytes, and format what the library returns.
Hashes print as `blake3:<hex>` in text; JSON fields carry the bare hex.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

import blake3
import click

from catalog import fsck as fsck_check
from catalog import gc as gc_sweep
from catalog import stats as catalog_stats
from catalog.clock import aware
from catalog.errors import (
    CatalogError,
    HashMismatchError,
    InvalidPathError,
    LengthMismatchError,
    NotFoundError,
)
from catalog.history import DEFAULT_HISTORY_DAYS
from catalog.managed import ManagedStorage, PathInfo, WriteOptions
from catalog.names import check_env, check_path, check_prefix, format_hash, parse_hash
from catalog.sessions import DEFAULT_MAX_AGE as DEFAULT_SESSION_MAX_AGE
from cli.app import SOURCE, Context, cli, echo_json, pass_ctx, server_options
from cli.completion import complete_env, complete_path
from cli.files import folder_hint, get_tree, jobs_option, put_tree, remove_tree
from cli.progress import ProgressReader, bar
from service.localfiles import Output, open_source, regular_size

READ_BLOCK = 1024 * 1024


# -- helpers ----------------------------------------------------------------------
def _path_json(info: PathInfo, env: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {
        "path": info.path,
        "hash": info.hash,
        "length": info.length,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "revision": info.revision,
        "resource_id": info.resource_id,
        "state": info.state,
        "history": [{"state": state, "at": at} for state, at in info.history],
    }
    if env:
        data["env"] = info.env_uuid
    return data


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _n(count: int, word: str) -> str:
    """`3 paths`, `1 path`."""
    return f"{count} {word}{'s' * (count != 1)}"


def _iso(value: Any) -> str:
    return str(as_time(value).isoformat(timespec="milliseconds").replace("+00:00", "Z"))


def as_time(value: Any) -> Any:
    """A datetime from the database, or the RFC 3339 text the service sends."""
    if isinstance(value, str):
        import datetime

        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value


def _pieces(reader: Any) -> Iterator[bytes]:
    """A stored stream chunk by chunk: never the whole object in memory."""
    if hasattr(reader, "iter_chunks"):
        yield from reader.iter_chunks()
        return
    while True:
        data = reader.read(READ_BLOCK)
        if not data:
            return
        yield data


# A write's precondition, as the HTTP service takes it in If-Match.
if_match_option = click.option(
    "--if-match",
    "if_match",
    default=None,
    metavar="REV|ETAG",
    help="Only if PATH is at this revision or holds this content (blake3:<hex>).",
)


# -- transfers --------------------------------------------------------------------
@cli.command()
@click.argument("env", shell_complete=complete_env)
@click.argument("path", shell_complete=complete_path)
@click.argument("file", type=SOURCE)
@click.option("--json", "as_json", is_flag=True, help='Print {"path","hash","length"}.')
@click.option("-r", "--recursive", is_flag=True, help="FILE is a directory, PATH a folder.")
@click.option("--dry-run", is_flag=True, help="With -r: print what would be stored only.")
@if_match_option
@click.option("--if-none-match", "create_only", is_flag=True, help="Only if PATH does not exist.")
@jobs_option
@server_options
@pass_ctx
def put(
    ctx: Context,
    env: str,
    path: str,
    file: str,
    as_json: bool,
    recursive: bool,
    dry_run: bool,
    if_match: str | None,
    create_only: bool,
    jobs: int,
) -> None:
    """Store FILE (or stdin for -) at PATH in environment ENV.

    Prints the content hash, blake3:<hex>, on one line. Content that is
    stored already is not written again (with --server, not even sent: the
    client proves it holds it). FILE may be a pipe or FIFO: it is read to its
    end. With -r, every file under the directory FILE is stored under the
    folder PATH, in parallel, skipping those already equal.

    --if-none-match (create only) and --if-match REV|ETAG (replace only that
    revision or content, as `rescat stat --json` shows them) are checked with the
    write: when they fail the command exits 1 and nothing changes. With
    --server a conditional put sends the bytes (the dedup proof carries no
    condition).

    \b
    Example:
      rescat put team-a charms/app.tar ./app.tar
      rescat put team-a charms/ ./app.tar          # charms/app.tar
      tar c src | rescat put team-a backups/src.tar -
      rescat put -r team-a charms/ ./build/charms
      rescat put team-a charms/app.tar ./app.tar --if-none-match
    """
    conditional = if_match is not None or create_only
    if recursive:
        if file == "-":
            raise click.UsageError("put -r needs a directory, not -")
        if conditional:
            raise click.UsageError("--if-match and --if-none-match are for one file, not -r")
        if as_json:  # it prints a line per file copied and a summary, as sync does
            raise click.UsageError(
                "--json is for one file, not -r (put -r prints one line per file copied)"
            )
        put_tree(ctx, env, path, file, jobs=jobs, dry_run=dry_run, delete=False)
        return
    if if_match is not None and create_only:
        raise click.UsageError("--if-match and --if-none-match exclude each other")
    match = _if_match(if_match)
    check_env(env)
    if path.endswith("/") and path.strip("/"):
        # Into that folder, under the file's own name (as `aws s3 cp FILE s3://b/dir/`).
        if file == "-":
            raise click.UsageError(f"{path!r} is a folder: stdin has no name to put under it")
        path = path.rstrip("/") + "/" + Path(file).name
    check_path(path)
    client = ctx.http
    if client is not None:
        from cli.remote import send_file

        digest, length = send_file(
            client, env, path, file, if_match=match, if_none_match=create_only
        )
        if as_json:
            echo_json({"path": path, "hash": digest, "length": length})
        else:
            click.echo(format_hash(digest))
        return
    managed = ctx.managed
    options = WriteOptions(if_match=match, if_none_match=create_only)
    with contextlib.ExitStack() as stack:
        source = sys.stdin.buffer if file == "-" else stack.enter_context(open_source(file))
        # Only a regular file's size is real: a pipe, FIFO or /dev/stdin is read to EOF.
        size = regular_size(source)
        length = -1 if size is None else size
        progress = stack.enter_context(bar(size, "hash" if size is not None else "upload"))
        reader = cast(BinaryIO, ProgressReader(source, progress))
        info = managed.put_path(env, path, reader, length, options=options)
    if as_json:
        echo_json({"path": path, "hash": info.hash, "length": info.length})
    else:
        click.echo(format_hash(info.hash))


def _if_match(value: str | None) -> int | str | None:
    """--if-match: a revision (digits) or content (blake3:<hex>, or its quoted ETag)."""
    if value is None:
        return None
    text = value.strip().strip('"')
    if text.isdigit():
        return int(text)
    try:
        return format_hash(parse_hash(text))
    except CatalogError:
        raise click.BadParameter(
            f"{value!r} is neither a revision nor blake3:<hex>", param_hint="--if-match"
        ) from None


@cli.command()
@click.argument("env", shell_complete=complete_env)
@click.argument("path", shell_complete=complete_path)
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(allow_dash=True),
    help="Write to this file instead of stdout (a regular file is replaced only once "
    "complete; devices and FIFOs are written through; links are followed).",
)
@click.option("-r", "--recursive", is_flag=True, help="PATH is a folder: copy it into DIRECTORY.")
@click.option("--dry-run", is_flag=True, help="With -r: print what would be fetched only.")
@jobs_option
@server_options
@pass_ctx
def get(
    ctx: Context,
    env: str,
    path: str,
    directory: str | None,
    output: str | None,
    recursive: bool,
    dry_run: bool,
    jobs: int,
) -> None:
    """Write the content of PATH in environment ENV to stdout (or -o FILE).

    The bytes stream through and are checked against the recorded length and
    BLAKE3 hash; a mismatch exits non-zero (and -o leaves FILE untouched).
    With -r, every path under the folder PATH goes to a file under DIRECTORY,
    in parallel, skipping files already equal.

    \b
    Example:
      rescat get team-a charms/app.tar -o app.tar
      rescat get team-a charms/app.tar | tar t
      rescat get -r team-a charms/ ./charms
    """
    if recursive:
        target = directory or output
        if target is None or target == "-":
            raise click.UsageError("get -r needs a DIRECTORY to write into")
        get_tree(ctx, env, path, target, jobs=jobs, dry_run=dry_run, delete=False)
        return
    if directory is not None:
        raise click.UsageError(f"unexpected argument {directory!r} (use -o FILE, or -r)")
    check_env(env)
    check_path(path)
    client = ctx.http
    if client is not None:
        from cli.remote import fetch_file

        try:
            fetch_file(client, env, path, output)
        except NotFoundError as exc:
            raise folder_hint(ctx, env, path, exc) from None
        return
    managed = ctx.managed
    try:
        info = managed.stat_for_environment(env, path)
    except NotFoundError as exc:
        raise folder_hint(ctx, env, path, exc) from None
    if output is None or output == "-":
        _copy_out(managed, env, path, info, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    with Output(output) as out:
        _copy_out(managed, env, path, info, out.file)
        out.commit()


def _copy_out(managed: ManagedStorage, env: str, path: str, info: PathInfo, sink: BinaryIO) -> None:
    """Stream a path's bytes into `sink`, checked against its length and BLAKE3."""
    reader, length = managed.get_for_environment(env, path)
    try:
        hasher = blake3.blake3()
        total = 0
        with bar(length, "get") as progress:
            for piece in _pieces(reader):
                sink.write(piece)
                hasher.update(piece)
                total += len(piece)
                progress.update(len(piece))
        sink.flush()
    finally:
        reader.close()
    if total != length:
        raise LengthMismatchError(f"{path}: read {total} bytes, expected {length}")
    digest = hasher.hexdigest()
    if digest != info.hash:
        now = managed.stat_for_environment(env, path)
        if now.revision != info.revision:
            raise CatalogError(f"{path} changed while it was being read; try again")
        raise HashMismatchError(f"{path}: stored bytes hash to {digest}, not {info.hash}")


# -- paths ------------------------------------------------------------------------
@cli.command()
@click.argument("env", shell_complete=complete_env)
@click.argument("path", shell_complete=complete_path)
@click.option("-r", "--recursive", is_flag=True, help="Also every path under the folder PATH.")
@click.option("--dry-run", is_flag=True, help="With -r: print what would be removed only.")
@if_match_option
@server_options
@pass_ctx
def rm(
    ctx: Context, env: str, path: str, recursive: bool, dry_run: bool, if_match: str | None
) -> None:
    """Remove PATH from environment ENV (content nothing else uses is deleted).

    With -r, PATH and every path under PATH/ go (never `PATHxyz`); with -r
    and a trailing slash, `PATH/`, only the paths under it (as `aws s3 rm
    --recursive`: a path named PATH stays). With
    --if-match, only if PATH is still at that revision or holds that content
    (checked with the delete; otherwise exit 1 and nothing changes).

    \b
    Example:
      rescat rm team-a charms/app.tar
      rescat rm -r team-a charms/old/
      rescat rm team-a charms/app.tar --if-match 7713966
    """
    match = _if_match(if_match)
    if recursive:
        if match is not None:
            raise click.UsageError("--if-match is for one path, not -r")
        remove_tree(ctx, env, path, dry_run=dry_run)
        return
    check_env(env)
    check_path(path)
    client = ctx.http
    try:
        if client is not None:
            client.remove(env, path, if_match=match)
        else:
            ctx.managed.delete_path(env, path, if_match=match)
    except NotFoundError as exc:
        raise folder_hint(ctx, env, path, exc) from None


@cli.command(cls=click.Command)  # ENV:PATH forms: the profile's env is filled in below
@click.argument("first", metavar="ENV", shell_complete=complete_env)
@click.argument("second", metavar="SRC", shell_complete=complete_path)
@click.argument("third", metavar="DST", required=False, shell_complete=complete_path)
@click.option("--json", "as_json", is_flag=True, help="Print the moved path's stat as JSON.")
@server_options
@pass_ctx
def mv(ctx: Context, first: str, second: str, third: str | None, as_json: bool) -> None:
    """Move SRC to DST in ENV, or ENV:SRC to ENV2:DST; copies no bytes.

    DST is replaced if it exists; the move is atomic. A DST ending in `/` is
    a folder: SRC goes into it by its name. Across environments, a
    --server token must allow both. With a profile's env, `mv SRC DST` and
    `:SRC` mean that environment.

    \b
    Example:
      rescat mv team-a charms/app.tar charms/app-1.0.tar
      rescat mv team-a:charms/app.tar team-b:vendor/app.tar
    """
    src_env, src, dst_env, dst = _endpoints(ctx, first, second, third)
    client = ctx.http
    try:
        if client is not None:
            moved = client.move(src_env, src, dst, dst_env=dst_env)
        else:
            moved = _path_json(ctx.managed.move_path(src_env, src, dst_env, dst))
    except NotFoundError as exc:
        raise folder_hint(ctx, src_env, src, exc, advice=ONE_PATH) from None
    if as_json:
        echo_json(moved)


@cli.command(cls=click.Command)  # ENV:PATH forms: the profile's env is filled in below
@click.argument("first", metavar="ENV", shell_complete=complete_env)
@click.argument("second", metavar="SRC", shell_complete=complete_path)
@click.argument("third", metavar="DST", required=False, shell_complete=complete_path)
@click.option("--json", "as_json", is_flag=True, help="Print the new path's stat as JSON.")
@server_options
@pass_ctx
def cp(ctx: Context, first: str, second: str, third: str | None, as_json: bool) -> None:
    """Copy SRC to DST in ENV, or ENV:SRC to ENV2:DST; copies no bytes.

    The content is stored once: DST becomes one more reference to it. DST is
    replaced if it exists; a DST ending in `/` is a folder: SRC goes into it
    by its name. Across environments, a --server token must allow
    both. With a profile's env, `cp SRC DST` and `:SRC` mean that environment.

    \b
    Example:
      rescat cp team-a charms/app.tar charms/app-stable.tar
      rescat cp team-a:charms/app.tar team-b:vendor/app.tar
    """
    src_env, src, dst_env, dst = _endpoints(ctx, first, second, third)
    client = ctx.http
    try:
        if client is not None:
            copied = client.copy(src_env, src, dst_env, dst)
        else:
            copied = _path_json(ctx.managed.copy_path(src_env, src, dst_env, dst))
    except NotFoundError as exc:
        raise folder_hint(ctx, src_env, src, exc, advice=ONE_PATH) from None
    if as_json:
        echo_json(copied)


ONE_PATH = "cp and mv take one path at a time"
_REMOTE = re.compile(r"([A-Za-z0-9._-]{0,128}):(.*)", re.DOTALL)


def _endpoints(
    ctx: Context, first: str, second: str, third: str | None
) -> tuple[str, str, str, str]:
    """(src_env, src, dst_env, dst) of `ENV SRC DST` or `ENV:SRC ENV2:DST`, checked."""
    if third is not None:
        src_env, src, dst_env, dst = first, second, first, third
    else:
        src_env, src = _located(ctx, first)
        dst_env, dst = _located(ctx, second)
    check_env(src_env)
    check_path(src)
    check_env(dst_env)
    if dst.endswith("/") or (third is None and dst == ""):
        # Into that folder (`/`, or `ENV2:` alone: the top level), as `mv` and `aws s3 mv` do.
        dst = ("" if dst == "/" else dst) + src.rpartition("/")[2]
    check_path(dst)
    return src_env, src, dst_env, dst


def _located(ctx: Context, spec: str) -> tuple[str, str]:
    """`ENV:PATH` (`:PATH`: the profile's environment) of `cp`'s two-argument form."""
    match = _REMOTE.fullmatch(spec)
    if match is None:
        if ctx.default_env is None:
            raise click.UsageError(
                f"{spec!r}: give ENV SRC DST, or ENV:SRC ENV2:DST (e.g. team-a:charms/app.tar)"
            )
        return ctx.default_env, spec
    env, path = match.group(1), match.group(2)
    if not env:
        if ctx.default_env is None:
            raise click.UsageError(f"{spec!r}: no ENV before ':' and no env in the profile")
        env = ctx.default_env
    return env, path


@cli.command()
@click.argument("env", shell_complete=complete_env)
@click.argument("prefix", default="", shell_complete=complete_path)
@click.option("--json", "as_json", is_flag=True, help='Print [{"path","hash","length"},...].')
@click.option("-l", "--long", "long_", is_flag=True, help="Also print date, size and hash.")
@click.option("--bytes", "exact", is_flag=True, help="With -l: sizes in bytes, not KiB/MiB.")
@click.option(
    "-d",
    "--delimiter",
    default=None,
    help="Group paths by this character after PREFIX, like folders (`--delimiter /`).",
)
@server_options
@pass_ctx
def ls(
    ctx: Context,
    env: str,
    prefix: str,
    as_json: bool,
    long_: bool,
    exact: bool,
    delimiter: str | None,
) -> None:
    """List the paths of environment ENV (starting with PREFIX), sorted.

    PREFIX is a plain string prefix; `/` alone is the whole environment (with
    --delimiter /, its top level, as `aws s3 ls s3://bucket/`). One path
    per line; with --delimiter /, paths below the next / after PREFIX show
    once as their folder, `dir/` (as `aws s3 ls` does). -l adds the time the
    path last changed (UTC), the size and the content hash.

    \b
    Example:
      rescat ls team-a charms/
      rescat ls team-a charms/ -l --delimiter /
      rescat ls team-a --json
    """
    check_env(env)
    if prefix.startswith("/"):
        relative = prefix.lstrip("/")
        if relative:
            raise InvalidPathError(
                f"invalid prefix {prefix!r}: paths are relative, no leading '/' "
                f"(write {relative!r})"
            )
        prefix = ""  # `/` is the whole environment (its top level with --delimiter /)
    check_prefix(prefix)
    if delimiter is not None and len(delimiter) != 1:
        raise click.BadParameter("one character, such as /", param_hint="--delimiter")
    from catalog.listing import check_delimiter, iter_listing

    check_delimiter(delimiter)
    client = ctx.http
    docs: Any
    if client is not None:
        # Pages of 1,000; --server folds folders on the service (delimiter=).
        from cli.remote import listing

        docs = listing(client, env, prefix, delimiter, long_)
    else:
        keys = iter_listing(ctx.managed, env, prefix, delimiter=delimiter)
        docs = ({"folder": key} if isinstance(key, str) else key for key in keys)
    docs = _primed(docs)  # a refusal is one line on stderr, before any output
    if as_json:
        # Streamed: a large listing is never built in memory.
        first = True
        click.echo("[", nl=False)
        for item in docs:
            if "folder" in item:
                item = {"prefix": item["folder"]}
            else:
                item = {"path": item["path"], "hash": item["hash"], "length": int(item["length"])}
            click.echo(("\n  " if first else ",\n  ") + json.dumps(item, sort_keys=True), nl=False)
            first = False
        click.echo("]" if first else "\n]")
        return
    for item in docs:
        if "folder" in item:
            click.echo(f"{'':<19}  {'DIR':>10}  {item['folder']}" if long_ else item["folder"])
        elif long_:
            size = str(int(item["length"])) if exact else _human(int(item["length"]))
            when = _when(item.get("updated_at"))
            click.echo(f"{when}  {size:>10}  {format_hash(item['hash'])}  {item['path']}")
        else:
            click.echo(item["path"])


def _primed(items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The same items, the first one fetched now (so that its errors come first)."""
    first = next(items, None)
    if first is None:
        return iter(())
    return itertools.chain((first,), items)


def _when(value: Any) -> str:
    if value is None:
        return "-"
    return str(aware(as_time(value)).strftime("%Y-%m-%d %H:%M:%S"))


@cli.command()
@click.argument("env", shell_complete=complete_env)
@click.argument("path", shell_complete=complete_path)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@server_options
@pass_ctx
def stat(ctx: Context, env: str, path: str, as_json: bool) -> None:
    """Show what PATH in ENV holds, and its content's state history.

    \b
    Example:
      rescat stat team-a charms/app.tar
      rescat stat team-a charms/app.tar --json
    """
    check_env(env)
    check_path(path)
    client = ctx.http
    if client is not None:
        info = client.path_info(env, path)
    else:
        info = _path_json(ctx.managed.stat_for_environment(env, path))
    if as_json:
        echo_json(info)
        return
    # Two clocks live here: the path's own (created/updated/revision) and the
    # stored content's, which every path holding the same bytes shares.
    rows = [
        ("env", info["env"]),
        ("path", info["path"]),
        ("hash", format_hash(info["hash"])),
        ("length", f"{info['length']} ({_human(info['length'])})"),
        ("path created", f"{_iso(info['created_at'])}  (this path first stored)"),
        ("path updated", f"{_iso(info['updated_at'])}  (this path last written)"),
        ("revision", f"{info['revision']}  (of this path)"),
        ("content", f"resource {info['resource_id']}, {info['state']}"),
    ]
    for key, value in rows:
        click.echo(f"{key + ':':<14} {value}")
    if info["history"]:
        click.echo("content history (of the stored bytes, shared by every path holding them):")
        for event in info["history"]:
            click.echo(f"  {_iso(event['at'])}  {event['state']}")


# -- whole catalog ----------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--by-env", is_flag=True, help="Also break the figures down per environment.")
@pass_ctx
def stats(ctx: Context, as_json: bool, by_env: bool) -> None:
    """Resources, paths, logical and physical bytes, dedup ratio.

    Logical bytes sum the length of every path; physical bytes count each
    distinct content once. Storage size and free storage come from MongoDB's
    dbStats: gc frees logical bytes, only `compact` shrinks the files on disk.

    \b
    Example:
      rescat stats
      rescat stats --by-env --json
    """
    result = catalog_stats.stats(ctx.managed, by_env=by_env)
    if as_json:
        echo_json(result.to_dict())
        return
    ratio = f"{result.dedup_ratio:.2f}" if result.dedup_ratio is not None else "-"
    rows = [
        ("resources", f"{result.resources} ready, {result.pending} pending"),
        ("paths", f"{result.paths} in {_n(result.environments, 'environment')}"),
        ("logical bytes", f"{result.logical_bytes} ({_human(result.logical_bytes)})"),
        ("physical bytes", f"{result.physical_bytes} ({_human(result.physical_bytes)})"),
        ("dedup ratio", ratio),
        ("stored files", f"{result.stored_files}, {_human(result.stored_bytes)}"),
        ("storage size", _human(result.storage_size)),
        ("free storage", _human(result.free_storage_size)),
    ]
    for key, value in rows:
        click.echo(f"{key + ':':<16} {value}")
    if result.by_env is not None:
        click.echo("")
        width = max([len("ENV"), *(len(e.env) for e in result.by_env)])
        click.echo(f"{'ENV':<{width}}  {'PATHS':>8}  {'LOGICAL':>12}  {'PHYSICAL':>12}  DEDUP")
        for e in result.by_env:
            dedup = f"{e.dedup_ratio:.2f}" if e.dedup_ratio is not None else "-"
            click.echo(
                f"{e.env:<{width}}  {e.paths:>8}  {_human(e.logical_bytes):>12}  "
                f"{_human(e.physical_bytes):>12}  {dedup}"
            )


@cli.group("env", invoke_without_command=True)
@click.pass_context
def env_group(click_ctx: click.Context) -> None:
    """Environments.

    \b
    Example:
      rescat env ls
    """
    if click_ctx.invoked_subcommand is None:
        click.echo(click_ctx.get_help())


@env_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help='Print [{"env","paths","bytes"},...].')
@pass_ctx
def env_ls(ctx: Context, as_json: bool) -> None:
    """List environments with their path counts and bytes.

    \b
    Example:
      rescat env ls
      rescat env ls --json
    """
    envs = catalog_stats.environments(ctx.managed)
    if as_json:
        echo_json([e.to_dict() for e in envs])
        return
    for e in envs:
        click.echo(f"{e.env}\t{e.paths}\t{e.bytes}\t{_human(e.bytes)}")


@cli.command()
@click.option("--dry-run", is_flag=True, help="Report what would be reclaimed; change nothing.")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=gc_sweep.DEFAULT_GC_GRACE,
    show_default=True,
    help="Seconds unreferenced bytes must have been idle before they are reclaimed.",
)
@click.option(
    "--session-max-age",
    type=click.FloatRange(min=0),
    default=DEFAULT_SESSION_MAX_AGE,
    show_default=True,
    help="Seconds an uncommitted writer session may sit untouched before it is reclaimed.",
)
@click.option(
    "--history-days",
    type=click.FloatRange(min=0),
    default=DEFAULT_HISTORY_DAYS,
    show_default=True,
    help="Keep the paths' history this many days (older items are dropped).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="List every action.")
@pass_ctx
def gc(
    ctx: Context,
    dry_run: bool,
    grace: float,
    session_max_age: float,
    as_json: bool,
    verbose: bool,
    history_days: float,
) -> None:
    """Reclaim what nothing references; safe while uploads run.

    Deletes stored files and chunks no catalog entry points at (once idle for
    the grace period), pending entries whose uploader's lease expired, expired
    proof requests; recounts reference counts that drifted (deleting content
    no path uses) and rebuilds entries that paths point at when their bytes
    are still stored. In the paths' history, uploads whose uploader died are
    marked failed and items older than --history-days are dropped.

    \b
    Example:
      rescat gc --dry-run
      rescat gc --grace 600 --json
    """
    report = gc_sweep.gc(
        ctx.managed,
        grace=grace,
        dry_run=dry_run,
        progress=bar,
        session_max_age=session_max_age,
        history_days=history_days,
    )
    if as_json:
        echo_json(report.to_dict())
        return
    verb = "would reclaim" if dry_run else "reclaimed"
    if verbose or dry_run:
        for action in report.actions:
            click.echo(("would: " if dry_run else "") + action)
    rows: list[tuple[str, int | str]] = [
        ("expired put requests", report.expired_requests),
        ("expired keys", report.expired_keys),
        ("sessions reclaimed", _sessions_row(report.sessions_reclaimed, report.session_bytes)),
        ("abandoned uploads", report.abandoned_pending),
        ("unreferenced entries", report.unreferenced_entries),
        ("refcounts fixed", report.refcounts_fixed),
        ("entries restored", report.restored_entries),
        ("paths repointed", report.repointed_paths),
        ("files repaired", report.repaired_files),
        ("orphan files", report.orphan_files),
        ("orphan chunks", report.orphan_chunks),
        ("failed uploads", report.failed_uploads),
        ("history items trimmed", report.history_trimmed),
        ("files kept", report.kept_files),
        ("orphan chunks kept", report.kept_chunks),
        ("malformed paths", report.malformed_paths),
    ]
    for key, value in rows:
        if value:
            click.echo(f"{key + ':':<22} {value}")
    if report.in_flight:
        click.echo(f"{'in flight (kept):':<22} {report.in_flight}")
    if report.kept_chunks and report.missing_files:
        click.echo(
            f"rescat: kept {_n(report.kept_chunks, 'orphan chunk')}: entries have missing "
            "files; run fsck",
            err=True,
        )
    if report.malformed_paths:
        click.echo(
            f"rescat: skipped {_n(report.malformed_paths, 'malformed path document')}; run fsck",
            err=True,
        )
    entries = _n(report.entries, "entry").replace("entrys", "entries")
    summary = f"{verb} {entries}, {_n(report.bytes, 'byte')} ({_human(report.bytes)})"
    more = [
        _n(n, word)
        for n, word in (
            (report.expired_keys, "expired key"),
            (report.sessions_reclaimed, "writer session"),
            (report.history_trimmed, "history item"),
        )
        if n
    ]
    click.echo(summary + (", " + ", ".join(more) if more else ""))


def _sessions_row(count: int, size: int) -> str:
    return f"{count} ({_human(size)})" if count else ""


@cli.command()
@click.option("--verify-content", is_flag=True, help="Re-hash every stored content (slow).")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=fsck_check.DEFAULT_FSCK_GRACE,
    show_default=True,
    help="Unreferenced bytes younger than this are in-flight uploads, not problems.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_ctx
def fsck(ctx: Context, verify_content: bool, grace: float, as_json: bool) -> None:
    """Check every path, reference count, stored file and chunk.

    Exits 0 when everything is consistent, 1 with a report naming each
    problem otherwise. `rescat gc` repairs what can be repaired.

    \b
    Example:
      rescat fsck
      rescat fsck --verify-content --json
    """
    report = fsck_check.fsck(ctx.managed, verify_content=verify_content, grace=grace, progress=bar)
    if as_json:
        echo_json(report.to_dict())
    else:
        for problem in report.problems:
            click.echo(str(problem))
        checked = (
            f"checked {_n(report.resources, 'resource')}, {_n(report.paths, 'path')}, "
            f"{_n(report.files, 'file')}"
        )
        if verify_content:
            checked += f", re-hashed {_human(report.bytes_verified)}"
        if report.in_flight:
            checked += f"; {report.in_flight} in flight"
        click.echo(checked)
    if not report.clean:
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(report.counts().items()))
        found = _n(len(report.problems), "problem")
        click.echo(f"rescat: fsck found {found} ({counts})", err=True)
        # sys.exit, not ctx.exit: click returns ctx.exit's code in non-standalone mode.
        sys.exit(1)
