"""Whole directories: `put -r`, `get -r`, `rm -r` and `sync`, over the database or HTTP.

One engine serves them all, in three steps, so that bad input stops the
command before anything is written:

1. plan: list both sides, validate every name (a local file whose name cannot
   be a path, a remote path that cannot be a local file) and decide per file;
2. compare: a file whose size matches the other side is hashed (BLAKE3, local
   side) and skipped when equal, so a re-run moves nothing;
3. transfer on a small thread pool, each file atomically (a put becomes
   visible only complete; a local file is renamed into place only verified),
   under one progress bar on stderr (silent off a terminal).

A PREFIX is a folder: `a/b` means the paths under `a/b/`, never `a/bc`.

With --server (`Context.http`) the same plan runs through the service: the
listing comes in pages with each path's hash, uploads use the dedup workflow
(content the service has is proved, not sent), downloads are verified and
replace their file only once complete.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, cast

import blake3
import click

from catalog.errors import CatalogError, InvalidPathError, NotFoundError
from catalog.managed import ManagedStorage
from catalog.names import check_env, check_path
from cli.app import Context, cli, pass_ctx, server_options
from cli.progress import bar
from service.localfiles import LocalFileError, Output, current_umask

DEFAULT_JOBS = 4
_REMOTE_RE = re.compile(r"([A-Za-z0-9._-]{0,128}):(.*)", re.DOTALL)


def folder(prefix: str) -> str:
    """The query prefix of a folder: '' and '/' (the whole environment, as for `ls`) are
    '', `a/b` and `a/b/` become `a/b/`."""
    stripped = prefix.rstrip("/")
    if not stripped:
        return ""
    check_path(stripped)
    return stripped + "/"


def local_hash(path: Path) -> str:
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            hasher.update(block)
    return str(hasher.hexdigest())


# -- the two sides --------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    rel: str  # '/'-separated, relative to the folder
    size: int
    hash: str | None = None  # known for remote entries
    link: bool = False  # a link to a directory inside a destination (never walked into)


# The client's resumable partial download of NAME (service.client.CatalogClient.download).
_PART_RE = re.compile(r"\..*\.[0-9a-f]{64}\.rescat-part")


def local_entries(root: Path, *, destination: bool = False) -> dict[str, Entry]:
    """Regular files under `root` (symlinks to files followed, like `cp -r -L`).

    Anything else (FIFOs, sockets, devices, broken links) is skipped with one
    line on stderr: reading a FIFO would hang, a device would never end.
    A `destination` (what a download writes into, and --delete prunes) is
    not followed out of through links to directories, as rsync does not:
    such a link is an entry of its own (`--delete` unlinks the link, never
    what it points to), and rescat's own partial downloads are not entries.
    """
    found: dict[str, Entry] = {}
    seen: set[tuple[int, int]] = set()  # directories by (device, inode): links can loop
    for dirpath, dirnames, filenames in os.walk(root, followlinks=not destination):
        if destination:
            for name in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                dirnames.remove(name)
                rel = (Path(dirpath) / name).relative_to(root).as_posix()
                found[rel] = Entry(rel, 0, link=True)
            filenames = [f for f in filenames if not _PART_RE.fullmatch(f)]
        try:
            here = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (here.st_dev, here.st_ino) in seen:
            click.echo(
                f"rescat: skipping {dirpath}: a link back to a directory already walked", err=True
            )
            dirnames[:] = []
            continue
        seen.add((here.st_dev, here.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            try:
                st = os.stat(full)
            except OSError as exc:
                click.echo(f"rescat: skipping {full}: {exc.strerror or exc}", err=True)
                continue
            if not stat.S_ISREG(st.st_mode):
                click.echo(f"rescat: skipping {full}: not a regular file", err=True)
                continue
            found[rel] = Entry(rel, st.st_size)
    return found


def remote_entries(ctx: Context, env: str, prefix: str) -> dict[str, Entry]:
    query = folder(prefix)
    found: dict[str, Entry] = {}
    for doc in _iter_paths(ctx, env, query):
        rel = str(doc["path"])[len(query) :]
        found[rel] = Entry(rel, int(doc["length"]), str(doc["hash"]))
    return found


def _iter_paths(ctx: Context, env: str, query: str) -> Any:
    client = ctx.http
    if client is not None:
        return client.iter_list(env, query)
    return ctx.managed.iter_paths(env, query)


# -- plan -------------------------------------------------------------------------------
@dataclass
class Action:
    kind: str  # "upload", "download", "delete-remote", "delete-local"
    rel: str
    size: int
    hash: str | None = None  # the source's hash, when known


@dataclass
class Plan:
    actions: list[Action]
    unchanged: int


def plan_upload(
    local: dict[str, Entry],
    remote: dict[str, Entry],
    root: Path,
    prefix: str,
    *,
    delete: bool,
) -> Plan:
    query = folder(prefix)
    for rel in local:  # every name first: nothing is written if one is bad
        try:
            check_path(query + rel)
        except InvalidPathError as exc:
            raise InvalidPathError(f"{root / rel}: cannot be stored: {exc}") from None
    actions: list[Action] = []
    unchanged = 0
    for rel, entry in local.items():
        other = remote.get(rel)
        digest = None
        if other is not None and other.size == entry.size:
            digest = local_hash(root / rel)
            if digest == other.hash:
                unchanged += 1
                continue
        actions.append(Action("upload", rel, entry.size, digest))
    if delete:
        actions += [
            Action("delete-remote", rel, e.size) for rel, e in remote.items() if rel not in local
        ]
    return Plan(actions, unchanged)


def plan_download(
    remote: dict[str, Entry],
    local: dict[str, Entry],
    root: Path,
    env: str,
    *,
    delete: bool,
) -> Plan:
    dirs = {rel.rsplit("/", n)[0] for rel in remote for n in range(1, rel.count("/") + 1)}
    for rel in remote:
        if rel in dirs:
            raise CatalogError(
                f"{env}: {rel!r} is both a path and a folder of other paths: it cannot be "
                f"a file and a directory under {root}; fetch its folders separately"
            )
        target = root / rel
        if target.is_dir() and not target.is_symlink():
            raise LocalFileError(f"{target}: is a directory, cannot be replaced by {env}:{rel}")
    for folder_rel in sorted(dirs):  # where a folder's files go, only directories of the tree
        here = root / folder_rel
        if here.is_symlink():
            raise LocalFileError(
                f"{here}: is a symbolic link, where the source's folder {folder_rel}/ goes: "
                "rescat never writes through a link inside the destination (remove the "
                "link, or sync into where it points); nothing copied or deleted"
            )
        if here.exists() and not here.is_dir():
            raise LocalFileError(
                f"{here}: is a file, where the source's folder {folder_rel}/ goes; remove "
                "or rename it, then run again; nothing copied or deleted"
            )
    actions: list[Action] = []
    unchanged = 0
    for rel, entry in remote.items():
        mine = local.get(rel)
        same_size = mine is not None and not mine.link and mine.size == entry.size
        if same_size and local_hash(root / rel) == entry.hash:
            unchanged += 1
            continue
        actions.append(Action("download", rel, entry.size, entry.hash))
    if delete:
        actions += [
            Action("delete-local", rel, e.size) for rel, e in local.items() if rel not in remote
        ]
    return Plan(actions, unchanged)


# -- transfers ----------------------------------------------------------------------
class Stopped(Exception):
    """Raised inside a transfer once Ctrl-C stopped the command: it unwinds that transfer.

    A put fails before it commits (no path appears), a download before its
    rename (no file appears); both clean up as after any other failure.
    """


class _Stop:
    """The abort flag that every running transfer checks between blocks."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Stopped("interrupted")


class _Counted:
    """A reader that advances the shared bar, at most once per byte of the file.

    The core may read a seekable file twice (a hash pass, then the upload):
    the bar shows progress through the file, not bytes read. Each read checks
    the abort flag, so Ctrl-C cancels a put in flight before it commits.
    """

    def __init__(self, inner: BinaryIO, advance: Callable[[int], None], stop: _Stop) -> None:
        self._inner = inner
        self._advance = advance
        self._stop = stop
        self._pos = 0
        self._shown = 0

    def read(self, size: int = -1) -> bytes:
        self._stop.check()
        data = self._inner.read(size)
        self._pos += len(data)
        if self._pos > self._shown:
            self._advance(self._pos - self._shown)
            self._shown = self._pos
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._inner.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = self._inner.seek(offset, whence)
        return self._pos


def _upload_one(
    managed: ManagedStorage,
    env: str,
    path: str,
    source: Path,
    action: Action,
    advance: Callable[[int], None],
    stop: _Stop,
) -> None:
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        reader = cast(BinaryIO, _Counted(f, advance, stop))
        managed.put_for_environment_and_check_hash(env, path, reader, size, action.hash)


def _download_one(
    managed: ManagedStorage,
    env: str,
    path: str,
    target: Path,
    action: Action,
    advance: Callable[[int], None],
    stop: _Stop,
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    reader, length = managed.get_for_environment(env, path)
    try:
        with Output(target) as out:
            hasher = blake3.blake3()
            total = 0
            while True:
                stop.check()
                piece = reader.read(1024 * 1024)
                if not piece:
                    break
                out.file.write(piece)
                hasher.update(piece)
                total += len(piece)
                advance(len(piece))
            if total != length or (action.hash and hasher.hexdigest() != action.hash):
                raise CatalogError(f"{env}:{path} changed while it was read; run again")
            out.commit()
    finally:
        reader.close()


def _progress_of(
    advance: Callable[[int], None], stop: _Stop
) -> Callable[[str, int, int | None], None]:
    """A client progress callback that advances the shared bar by transferred bytes.

    The client calls it between blocks of every phase (hash, upload, download),
    so checking the abort flag here cancels an HTTP transfer in flight.
    """
    shown = 0

    def progress(phase: str, done: int, total: int | None) -> None:
        nonlocal shown
        stop.check()
        if phase in ("upload", "download") and done > shown:
            advance(done - shown)
            shown = done

    return progress


@dataclass
class Outcome:
    done: list[Action]
    failed: list[tuple[Action, BaseException]]


def execute(
    ctx: Context,
    plan: Plan,
    *,
    env: str,
    prefix: str,
    root: Path,
    jobs: int,
    dry_run: bool,
    label: str,
) -> Outcome:
    """Run the plan's actions (deletions after every transfer succeeded)."""
    query = folder(prefix)
    transfers = [a for a in plan.actions if a.kind in ("upload", "download")]
    deletions = [a for a in plan.actions if a.kind.startswith("delete")]
    if dry_run:
        for action in plan.actions:
            click.echo(f"(dry run) {_describe(action, env, query, root)}")
        return Outcome([], [])
    outcome = Outcome([], [])
    lock = threading.Lock()
    total = sum(a.size for a in transfers)
    with bar(total, label) as progress:

        def advance(n: int) -> None:
            with lock:
                progress.update(n)

        client = ctx.http
        stop = _Stop()

        def run(action: Action) -> None:
            stop.check()  # queued before Ctrl-C, started after: never begins
            remote_path = query + action.rel
            local_path = root / action.rel
            if client is not None:
                progress_cb = _progress_of(advance, stop)
                if action.kind == "upload":
                    client.upload(env, remote_path, local_path, progress=progress_cb)
                else:
                    local_path.parent.mkdir(parents=True, exist_ok=True)
                    client.download(env, remote_path, local_path, progress=progress_cb)
            elif action.kind == "upload":
                _upload_one(ctx.managed, env, remote_path, local_path, action, advance, stop)
            else:
                _download_one(ctx.managed, env, remote_path, local_path, action, advance, stop)

        def record(future: Future[None], action: Action) -> None:
            exc = future.exception()
            if exc is None:
                outcome.done.append(action)
                progress.write(_describe(action, env, query, root), file=sys.stdout)
            elif not isinstance(exc, Stopped):
                outcome.failed.append((action, exc))

        if transfers:
            if client is None:
                _ = ctx.managed  # connect once, before the threads
            current_umask()  # and read the umask before they create files
            _transfer_all(transfers, run, record, stop, jobs)
            if stop.is_set():
                progress.close()
                raise Interrupted(_interrupted(outcome, len(transfers)))
    if outcome.failed:
        return outcome  # never delete on the strength of an incomplete copy
    for action in deletions:
        try:
            if action.kind == "delete-remote":
                _remove(ctx, env, query + action.rel)
            else:
                with suppress(FileNotFoundError):  # gone already: as good as deleted
                    (root / action.rel).unlink()
        except (OSError, NotFoundError) as exc:
            outcome.failed.append((action, exc))
            continue
        outcome.done.append(action)
        click.echo(_describe(action, env, query, root))
    return outcome


def _transfer_all(
    transfers: list[Action],
    run: Callable[[Action], None],
    record: Callable[[Future[None], Action], None],
    stop: _Stop,
    jobs: int,
) -> None:
    """Run the transfers on a pool, recording each as it ends; Ctrl-C stops them all.

    Ctrl-C sets the abort flag (see `_stop_on_ctrl_c`): transfers still
    queued end at once without starting, those in flight unwind at their next
    block, and every one is still recorded here, so what the command prints is
    exactly what was copied (one may finish between the signal and its next
    check). The `with` block only waits for that unwinding, not for the queue.
    """
    with (
        _stop_on_ctrl_c(stop),
        ThreadPoolExecutor(max(1, jobs), thread_name_prefix="rescat-sync") as pool,
    ):
        futures = {pool.submit(run, a): a for a in transfers}
        for future in as_completed(futures):
            record(future, futures[future])


@contextmanager
def _stop_on_ctrl_c(stop: _Stop) -> Iterator[None]:
    """While the block runs, the first SIGINT sets `stop` instead of raising KeyboardInterrupt.

    Raised in the main thread, KeyboardInterrupt could land between a finished
    transfer and its line, and the pool would still run the whole queue on the
    way out. A second Ctrl-C raises it as usual (the handler is given back).
    Off the main thread no handler can be set: nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # set from outside Python: give back Python's own
        previous = signal.default_int_handler

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Interrupted(click.ClickException):
    """Ctrl-C stopped a transfer: exit 130 (128 + SIGINT), as a shell reports it."""

    exit_code = 130


def _remove(ctx: Context, env: str, path: str) -> None:
    client = ctx.http
    if client is not None:
        client.remove(env, path)
    else:
        ctx.managed.remove_for_environment(env, path)


def _describe(action: Action, env: str, query: str, root: Path) -> str:
    remote = f"{env}:{query}{action.rel}"
    local = root / action.rel
    if action.kind == "upload":
        return f"upload: {local} -> {remote}"
    if action.kind == "download":
        return f"download: {remote} -> {local}"
    if action.kind == "delete-remote":
        return f"delete: {remote}"
    return f"delete: {local}"


def _interrupted(outcome: Outcome, planned: int) -> str:
    """What Ctrl-C left: the copies that finished (printed above) and those that did not."""
    copied = [a for a in outcome.done if a.kind in ("upload", "download")]
    moved = sum(a.size for a in copied)
    return (
        f"interrupted: {len(copied)} copied ({moved} bytes), {planned - len(copied)} not "
        "copied, nothing deleted; run again to finish"
    )


def report(outcome: Outcome, plan: Plan, dry_run: bool) -> None:
    """One line on stderr: the summary, or the first failure with the summary (exit 1)."""
    if dry_run:
        copies = [a for a in plan.actions if a.kind in ("upload", "download")]
        deletions = len(plan.actions) - len(copies)
        click.echo(
            f"rescat: dry run: {len(copies)} to copy ({sum(a.size for a in copies)} bytes), "
            f"{plan.unchanged} unchanged, {deletions} to delete",
            err=True,
        )
        return
    moved = sum(a.size for a in outcome.done if a.kind in ("upload", "download"))
    transfers = sum(1 for a in outcome.done if a.kind in ("upload", "download"))
    deleted = sum(1 for a in outcome.done if a.kind.startswith("delete"))
    summary = f"{transfers} copied ({moved} bytes), {plan.unchanged} unchanged, {deleted} deleted"
    if outcome.failed:
        action, exc = outcome.failed[0]
        more = f" and {len(outcome.failed) - 1} more" if len(outcome.failed) > 1 else ""
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise click.ClickException(
            f"{action.kind} {action.rel} failed{more}: {text} ({summary}; nothing deleted; "
            "run again to retry)"
        )
    click.echo(f"rescat: {summary}", err=True)


# -- commands -------------------------------------------------------------------------
def put_tree(
    ctx: Context, env: str, prefix: str, directory: str, *, jobs: int, dry_run: bool, delete: bool
) -> None:
    check_env(env)
    root = Path(directory)
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise LocalFileError(f"{directory}: {what}; nothing copied or deleted")
    local = local_entries(root)
    remote = remote_entries(ctx, env, prefix)
    if not local and delete:  # an empty directory must never empty the folder
        raise LocalFileError(f"{directory}: no files to copy; nothing copied or deleted")
    plan = plan_upload(local, remote, root, prefix, delete=delete)
    outcome = execute(
        ctx, plan, env=env, prefix=prefix, root=root, jobs=jobs, dry_run=dry_run, label="put"
    )
    report(outcome, plan, dry_run)


def get_tree(
    ctx: Context, env: str, prefix: str, directory: str, *, jobs: int, dry_run: bool, delete: bool
) -> None:
    check_env(env)
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise LocalFileError(f"{directory}: exists and is not a directory")
    remote = remote_entries(ctx, env, prefix)
    if not remote:
        prefix, remote = _one_file(ctx, env, prefix, delete=delete)
    local = local_entries(root, destination=True) if root.is_dir() else {}
    plan = plan_download(remote, local, root, env, delete=delete)
    if not dry_run and plan.actions:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalFileError(f"cannot create {directory}: {exc.strerror or exc}") from None
    outcome = execute(
        ctx, plan, env=env, prefix=prefix, root=root, jobs=jobs, dry_run=dry_run, label="get"
    )
    report(outcome, plan, dry_run)


def folder_hint(
    ctx: Context, env: str, path: str, exc: NotFoundError, *, advice: str = "use -r"
) -> NotFoundError:
    """`rm ENV dir` or `get ENV dir` where dir is a folder: say so, and what takes it."""
    try:
        query = folder(path)
        client = ctx.http
        if client is not None:
            under = bool(client.list_page(env, query, limit=1)["items"])
        else:
            under = next(iter(ctx.managed.iter_paths(env, query).limit(1)), None) is not None
    except CatalogError:
        return exc
    if not under:
        return exc
    return NotFoundError(f"{exc}; {path!r} is a folder: {advice}", path=exc.path)


def _one_file(ctx: Context, env: str, prefix: str, *, delete: bool) -> tuple[str, dict[str, Entry]]:
    """A PREFIX with nothing under it that names a path: that one file, by its name.

    As `aws s3 cp --recursive` takes the key as a prefix, `get -r ENV dir/a.txt
    DIR` copies dir/a.txt to DIR/a.txt. Otherwise (a typo in PREFIX) the command
    stops before anything changes: an empty source must never empty the
    directory with --delete.
    """
    stripped = prefix.rstrip("/")
    info: Any = None
    if stripped:
        try:
            client = ctx.http
            if client is not None:
                info = client.stat(env, stripped)
            else:
                found = ctx.managed.stat_for_environment(env, stripped)
                info = {"hash": found.hash, "length": found.length}
        except NotFoundError:
            info = None
    if info is None:
        raise NotFoundError(f"{_nothing_under(env, prefix)}; nothing copied or deleted")
    if delete:
        raise CatalogError(
            f"{env}: {stripped!r} is a file, not a folder: sync --delete takes a folder "
            f"(copy one file with rescat get {env} {stripped} -o FILE); nothing copied or deleted"
        )
    parent, _, name = stripped.rpartition("/")
    return parent, {name: Entry(name, int(info["length"]), str(info["hash"]))}


def _nothing_under(env: str, prefix: str) -> str:
    """What an empty source says: the folder (or the whole environment) has no paths."""
    stripped = prefix.rstrip("/")
    if not stripped:
        return f"{env}: no paths in the environment"
    return f"{env}: nothing at or under {stripped!r}"


# Paths per transaction of `rm -r` (the service's bulk delete takes up to 1,000).
RM_BATCH = 1000


def remove_tree(ctx: Context, env: str, prefix: str, *, dry_run: bool) -> int:
    """Remove PREFIX and every path under it; how many went.

    `PREFIX/` (a trailing slash) is the folder alone: a path named PREFIX
    stays, as `aws s3 rm --recursive s3://b/PREFIX/` keeps the key PREFIX.
    """
    check_env(env)
    stripped = prefix.rstrip("/")
    if not stripped:
        raise click.UsageError(
            "rm -r needs a PREFIX (a folder such as charms/); it never empties a whole environment"
        )
    query = folder(stripped)
    paths = [str(doc["path"]) for doc in _iter_paths(ctx, env, query)]
    client = ctx.http
    folder_only = prefix.endswith("/")
    if not folder_only:  # PREFIX itself too, when it is a path
        try:
            if client is not None:
                client.stat(env, stripped)
            else:
                ctx.managed.stat_for_environment(env, stripped)
            paths.insert(0, stripped)
        except NotFoundError:
            pass
    if not paths:
        where = f"under {query!r}" if folder_only else f"at or under {stripped!r}"
        raise NotFoundError(f"{env}: nothing {where}")
    if dry_run:
        for path in paths:
            click.echo(f"(dry run) delete: {env}:{path}")
        return 0
    removed = 0
    for start in range(0, len(paths), RM_BATCH):  # one transaction (and request) per batch
        batch = paths[start : start + RM_BATCH]
        if client is not None:
            gone = client.remove_many(env, batch)["deleted"]
        else:
            gone = ctx.managed.delete_paths(env, batch)
        for path in gone:  # missing ones were removed concurrently: the end state is the same
            click.echo(f"delete: {env}:{path}")
        removed += len(gone)
    return removed


def parse_location(spec: str) -> tuple[str, str] | None:
    """`ENV:PREFIX` -> (env, prefix); a local path -> None.

    A name that exists locally is local even if it looks like ENV:PREFIX;
    write ./a:b for a local name that does not exist yet.
    """
    match = _REMOTE_RE.fullmatch(spec)
    if match is None or os.path.exists(spec):
        return None
    return match.group(1), match.group(2)


def jobs_option(fn: Any) -> Any:
    return click.option(
        "-j",
        "--jobs",
        type=click.IntRange(1, 64),
        default=DEFAULT_JOBS,
        show_default=True,
        help="Files transferred in parallel.",
    )(fn)


@cli.command(cls=click.Command)
@click.argument("src")
@click.argument("dst")
@click.option(
    "--dry-run", is_flag=True, help="Print what would be copied or deleted; change nothing."
)
@click.option("--delete", is_flag=True, help="Also delete what DST has and SRC does not.")
@jobs_option
@server_options
@pass_ctx
def sync(ctx: Context, src: str, dst: str, dry_run: bool, delete: bool, jobs: int) -> None:
    """Make DST hold what SRC holds: a local directory and ENV:PREFIX, either way.

    Files equal by BLAKE3 on both sides are skipped, so a second run copies
    nothing. --delete removes what DST has beyond SRC, and only once every
    copy succeeded. ENV:PREFIX names a folder (`team-a:charms/`, or `team-a:`
    for the whole environment; `:charms/` uses the profile's environment).
    With --server, files the service has already are proved, not sent.

    \b
    Example:
      rescat sync ./charms team-a:charms/
      rescat sync team-a:charms/ ./charms --delete --dry-run
    """
    source, target = parse_location(src), parse_location(dst)
    if (source is None) == (target is None):
        raise click.UsageError(
            "give one local directory and one ENV:PREFIX (e.g. rescat sync ./dir team-a:dir/)"
        )
    remote = source or target
    assert remote is not None
    env, prefix = remote
    if not env:
        if ctx.default_env is None:
            raise click.UsageError(
                f"{src if source else dst}: no ENV before ':' and no env in the profile"
            )
        env = ctx.default_env
    if source is None:
        put_tree(ctx, env, prefix, src, jobs=jobs, dry_run=dry_run, delete=delete)
    else:
        get_tree(ctx, env, prefix, dst, jobs=jobs, dry_run=dry_run, delete=delete)
