"""Admin commands over the core library (direct database access).

Thin faces over `catalog` (and its `stats`, `gc`, `fsck` modules): they validate names
before connecting, stream bytes, and format what the library returns.
Hashes print as `blake3:<hex>` in text; JSON fields carry the bare hex.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat as stat_module
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

import blake3
import click

from catalog import fsck as fsck_check
from catalog import gc as gc_sweep
from catalog import stats as catalog_stats
from catalog.errors import CatalogError, HashMismatchError, LengthMismatchError
from catalog.managed import PathInfo
from catalog.names import check_env, check_path, check_prefix, format_hash
from cli.app import Context, cli, echo_json, pass_ctx
from cli.progress import ProgressReader, bar

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
    return str(value.isoformat(timespec="milliseconds").replace("+00:00", "Z"))


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


def _stdin_size(stream: BinaryIO) -> int | None:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        st = os.fstat(stream.fileno())
        if stat_module.S_ISREG(st.st_mode):
            return st.st_size - stream.tell()
    return None


# -- transfers --------------------------------------------------------------------
@cli.command()
@click.argument("env")
@click.argument("path")
@click.argument(
    "file", type=click.Path(exists=True, dir_okay=False, allow_dash=True, readable=True)
)
@click.option("--json", "as_json", is_flag=True, help='Print {"path","hash","length"}.')
@pass_ctx
def put(ctx: Context, env: str, path: str, file: str, as_json: bool) -> None:
    """Store FILE (or stdin for -) at PATH in environment ENV.

    Prints the content hash, blake3:<hex>, on one line. Content that is
    stored already is not written again.

    \b
    Example:
      rescat put team-a charms/app.tar ./app.tar
      tar c src | rescat put team-a backups/src.tar -
    """
    check_env(env)
    check_path(path)
    managed = ctx.managed
    with contextlib.ExitStack() as stack:
        if file == "-":
            source = sys.stdin.buffer
            size = _stdin_size(source)
            length = -1
        else:
            source = stack.enter_context(open(file, "rb"))
            size = os.fstat(source.fileno()).st_size
            length = size
        progress = stack.enter_context(bar(size, "hash" if size is not None else "upload"))
        reader = cast(BinaryIO, ProgressReader(source, progress))
        res = managed.put_for_environment(env, path, reader, length)
    if as_json:
        echo_json({"path": path, "hash": res.hash, "length": res.length})
    else:
        click.echo(format_hash(res.hash))


@cli.command()
@click.argument("env")
@click.argument("path")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    help="Write to this file (replaced only once complete) instead of stdout.",
)
@pass_ctx
def get(ctx: Context, env: str, path: str, output: str | None) -> None:
    """Write the content of PATH in environment ENV to stdout (or -o FILE).

    The bytes stream through and are checked against the recorded length and
    BLAKE3 hash; a mismatch exits non-zero (and -o leaves FILE untouched).

    \b
    Example:
      rescat get team-a charms/app.tar -o app.tar
      rescat get team-a charms/app.tar | tar t
    """
    check_env(env)
    check_path(path)
    managed = ctx.managed
    info = managed.stat_for_environment(env, path)
    reader, length = managed.get_for_environment(env, path)
    tmp_name: str | None = None
    try:
        if output is None or output == "-":
            sink: BinaryIO = sys.stdout.buffer
        else:
            directory = os.path.dirname(os.path.abspath(output))
            try:
                fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".rescat-", suffix=".part")
            except OSError as exc:
                raise click.ClickException(f"cannot write {output}: {exc.strerror}") from None
            sink = os.fdopen(fd, "wb")
        hasher = blake3.blake3()
        total = 0
        with bar(length, "get") as progress:
            for piece in _pieces(reader):
                sink.write(piece)
                hasher.update(piece)
                total += len(piece)
                progress.update(len(piece))
        sink.flush()
        if total != length:
            raise LengthMismatchError(f"{path}: read {total} bytes, expected {length}")
        digest = hasher.hexdigest()
        if digest != info.hash:
            now = managed.stat_for_environment(env, path)
            if now.revision != info.revision:
                raise CatalogError(f"{path} changed while it was being read; try again")
            raise HashMismatchError(f"{path}: stored bytes hash to {digest}, not {info.hash}")
        if tmp_name is not None:
            sink.close()
            os.replace(tmp_name, cast(str, output))
            tmp_name = None
    finally:
        reader.close()
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                sink.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


# -- paths ------------------------------------------------------------------------
@cli.command()
@click.argument("env")
@click.argument("path")
@pass_ctx
def rm(ctx: Context, env: str, path: str) -> None:
    """Remove PATH from environment ENV (content nothing else uses is deleted).

    \b
    Example:
      rescat rm team-a charms/app.tar
    """
    check_env(env)
    check_path(path)
    ctx.managed.remove_for_environment(env, path)


@cli.command()
@click.argument("env")
@click.argument("src")
@click.argument("dst")
@click.option("--json", "as_json", is_flag=True, help="Print the moved path's stat as JSON.")
@pass_ctx
def mv(ctx: Context, env: str, src: str, dst: str, as_json: bool) -> None:
    """Move SRC to DST within environment ENV; copies no bytes.

    DST is replaced if it exists.

    \b
    Example:
      rescat mv team-a charms/app.tar charms/app-1.0.tar
    """
    check_env(env)
    check_path(src)
    check_path(dst)
    info = ctx.managed.move_for_environment(env, src, dst)
    if as_json:
        echo_json(_path_json(info))


@cli.command()
@click.argument("env")
@click.argument("prefix", default="")
@click.option("--json", "as_json", is_flag=True, help='Print [{"path","hash","length"},...].')
@click.option("-l", "--long", "long_", is_flag=True, help="Also print hash and length.")
@pass_ctx
def ls(ctx: Context, env: str, prefix: str, as_json: bool, long_: bool) -> None:
    """List the paths of environment ENV (starting with PREFIX), sorted.

    PREFIX is a plain string prefix. One path per line.

    \b
    Example:
      rescat ls team-a charms/
      rescat ls team-a --json
    """
    check_env(env)
    check_prefix(prefix)
    docs = ctx.managed.iter_paths(env, prefix)
    if as_json:
        # Streamed: a large listing is never built in memory.
        first = True
        click.echo("[", nl=False)
        for doc in docs:
            item = {"path": doc["path"], "hash": doc["hash"], "length": int(doc["length"])}
            click.echo(("\n  " if first else ",\n  ") + json.dumps(item, sort_keys=True), nl=False)
            first = False
        click.echo("]" if first else "\n]")
        return
    for doc in docs:
        if long_:
            click.echo(f"{format_hash(doc['hash'])}  {int(doc['length']):>12}  {doc['path']}")
        else:
            click.echo(doc["path"])


@cli.command()
@click.argument("env")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
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
    info = ctx.managed.stat_for_environment(env, path)
    if as_json:
        echo_json(_path_json(info))
        return
    rows = [
        ("env", info.env_uuid),
        ("path", info.path),
        ("hash", format_hash(info.hash)),
        ("length", f"{info.length} ({_human(info.length)})"),
        ("state", info.state),
        ("revision", str(info.revision)),
        ("resource", info.resource_id),
        ("created", _iso(info.created_at)),
        ("updated", _iso(info.updated_at)),
    ]
    for key, value in rows:
        click.echo(f"{key + ':':<10} {value}")
    if info.history:
        click.echo("history:")
        for state, at in info.history:
            click.echo(f"  {_iso(at)}  {state}")


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
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="List every action.")
@pass_ctx
def gc(ctx: Context, dry_run: bool, grace: float, as_json: bool, verbose: bool) -> None:
    """Reclaim what nothing references; safe while uploads run.

    Deletes stored files and chunks no catalog entry points at (once idle for
    the grace period), pending entries whose uploader's lease expired, expired
    proof requests; recounts reference counts that drifted (deleting content
    no path uses) and rebuilds entries that paths point at when their bytes
    are still stored.

    \b
    Example:
      rescat gc --dry-run
      rescat gc --grace 600 --json
    """
    report = gc_sweep.gc(ctx.managed, grace=grace, dry_run=dry_run, progress=bar)
    if as_json:
        echo_json(report.to_dict())
        return
    verb = "would reclaim" if dry_run else "reclaimed"
    if verbose or dry_run:
        for action in report.actions:
            click.echo(("would: " if dry_run else "") + action)
    rows = [
        ("expired put requests", report.expired_requests),
        ("abandoned uploads", report.abandoned_pending),
        ("unreferenced entries", report.unreferenced_entries),
        ("refcounts fixed", report.refcounts_fixed),
        ("entries restored", report.restored_entries),
        ("paths repointed", report.repointed_paths),
        ("orphan files", report.orphan_files),
        ("orphan chunks", report.orphan_chunks),
    ]
    for key, value in rows:
        if value:
            click.echo(f"{key + ':':<22} {value}")
    if report.in_flight:
        click.echo(f"{'in flight (kept):':<22} {report.in_flight}")
    entries = _n(report.entries, "entry").replace("entrys", "entries")
    click.echo(f"{verb} {entries}, {_n(report.bytes, 'byte')} ({_human(report.bytes)})")


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
