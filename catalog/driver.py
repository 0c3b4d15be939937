"""The registry storage driver (distribution's StorageDriver) over ManagedStorage.

Driver paths are absolute (`/a/b`) and map to the environment path `a/b`.
Directories are implicit: `/a` is a directory while some path starts with
`a/`, and every directory question is an indexed range query on the paths'
`(env, path)` index over `[a/, a0)` (`0` is the character after `/`), never a
scan of the environment. Writers are upload sessions (catalog/sessions.py):
nothing is visible until commit, and a closed writer is resumed from any process.

Walk order is depth first with each directory's entries sorted, a directory
before its contents: the order of the paths with `/` sorting before every
other character. The index sorts `-` and `.` (and, in paths outside
distribution's charset, a space and other punctuation) before `/`, so a
directory `a` can lie after its siblings `a-b` and `a.c` in the index; the walk reads one
cursor in index order and looks such a directory up (once per name) when a
sibling that sorts after it shows up first.

Every error names the driver in its text; NotFoundError carries the path as given.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import datetime
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from pymongo import ASCENDING
from pymongo.cursor import Cursor
from pymongo.errors import PyMongoError

from catalog.clock import aware, utcnow
from catalog.errors import (
    CatalogError,
    InvalidOffsetError,
    InvalidPathError,
    NotFoundError,
    PreconditionFailedError,
)
from catalog.names import check_env, check_path
from catalog.pathdocs import revision
from catalog.sessions import DRIVER, UPLOAD, SessionStore, SessionWriter

if TYPE_CHECKING:
    from catalog.managed import ManagedStorage, PathInfo

_PATH_RE = re.compile(r"(?:/[A-Za-z0-9._-]+)+")
# A subdirectory met in a listing is read through for this many entries before the
# listing seeks past it (one more query): small subdirectories cost no query.
_LIST_READ_THROUGH = 16
_FIELDS = {"path": 1, "length": 1, "updated_at": 1}
# Paths removed per transaction when a directory is deleted.
_DELETE_BATCH = 200


@dataclass(frozen=True)
class FileInfo:
    """A file or an implicit directory (size 0)."""

    path: str
    size: int
    mod_time: datetime.datetime
    is_dir: bool


_FILE = FileInfo("", 0, datetime.datetime.min, False)


class SkipDir(Exception):
    """Raised by a walk function: do not enter this directory."""


class FilledBuffer(Exception):
    """Raised by a walk function: stop the walk (walk returns normally)."""


class StorageDriver:
    """distribution's StorageDriver methods over one environment of a ManagedStorage."""

    def __init__(
        self,
        managed: ManagedStorage,
        env_uuid: str,
        *,
        name: str = "rescat",
        redirect: Any = None,
        strict_paths: bool = True,
    ) -> None:
        """strict_paths: only distribution's path charset (`[A-Za-z0-9._-]` per
        component), as a registry driver must; False admits every path the
        catalog does, for faces (fsspec) that must reach what the CLI or HTTP wrote.
        """
        self._name = name
        self._strict = strict_paths
        self.managed = managed
        with self._errors(""):
            self.env_uuid = check_env(env_uuid)
        self.redirect = redirect
        self._sessions: SessionStore | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def sessions(self) -> SessionStore:
        if self._sessions is None:
            self._sessions = SessionStore(self.managed)
        return self._sessions

    def __repr__(self) -> str:
        return f"StorageDriver({self._name!r}, env={self.env_uuid!r})"

    # -- content ------------------------------------------------------------------
    def get_content(self, path: str) -> bytes:
        rel = self._rel(path)
        with self._errors(path):
            reader, _ = self.managed.get_for_environment(self.env_uuid, rel)
            try:
                data = reader.read()
            finally:
                reader.close()
        return bytes(data)

    def put_content(self, path: str, content: bytes) -> None:
        """Replace the path's content atomically."""
        rel = self._rel(path)
        data = bytes(content or b"")
        with self._errors(path):
            existed = self._placed(path)
            info = self.managed.put_path(self.env_uuid, rel, io.BytesIO(data), len(data))
            if not existed:
                self._settle_place(path, info.revision)

    def reader(self, path: str, offset: int = 0) -> BinaryIO:
        """A seekable stream of the content from `offset` (at or past the end: b"")."""
        rel = self._rel(path)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise InvalidOffsetError(
                f"{self._name}: invalid offset {offset!r} for {path}", path=path, offset=offset
            )
        with self._errors(path):
            reader, length = self.managed.get_for_environment(self.env_uuid, rel)
            reader.seek(min(offset, length))
        return reader

    def writer(self, path: str, append: bool = False) -> FileWriter:
        """A writer session of the path: invisible until commit(), resumable after close()."""
        rel = self._rel(path)
        env = self.env_uuid
        sessions = self.sessions
        with self._errors(path):
            self.check_file_place(path)
            if not append:
                session = sessions.create(env, rel, kind=DRIVER)
                return FileWriter(self, path, sessions.open(env, session.id))
            resumed = sessions.open_path(env, rel)
            if resumed is not None:
                if self._still_based(resumed):
                    return FileWriter(self, path, resumed)
                resumed.cancel()
            # Append to committed content: the session starts with a copy of it.
            reader, info = self.managed.open_path(env, rel)
            length = info.length
            try:
                session = sessions.create(env, rel, kind=DRIVER, base_rev=info.revision)
                writer = sessions.open(env, session.id)
                try:
                    writer.copy_from(reader, length)
                except BaseException:
                    with contextlib.suppress(CatalogError, PyMongoError):
                        writer.cancel()
                    raise
            finally:
                reader.close()
            return FileWriter(self, path, writer)

    def private_writer(self, path: str) -> FileWriter:
        """A writer of the path whose session no other writer shares: the last commit wins.

        writer() gives a path one session, which a later writer(path) starts
        over (the registry's contract: its uploads resume by path). A file
        system's open-for-write is not like that: two opens of one path write
        apart, as on S3 or a local disk, both closes succeed, and the path holds
        what the last one wrote. Not resumable by path (its session has an id).
        """
        rel = self._rel(path)
        with self._errors(path):
            self.check_file_place(path)
            session = self.sessions.create(self.env_uuid, rel, kind=UPLOAD)
            return FileWriter(self, path, self.sessions.open(self.env_uuid, session.id))

    def _still_based(self, writer: SessionWriter) -> bool:
        """May this append session resume: does its path still hold what it began with?

        A session that began as a copy of the path's bytes must not outlive them:
        once the path was deleted, moved away or replaced through any face (HTTP,
        the CLI, the KV store), resuming it would bring the old bytes back.
        """
        return writer.base_rev is None or writer.base_now() == writer.base_rev

    # -- namespace ------------------------------------------------------------------
    def stat(self, path: str) -> FileInfo:
        rel = self._rel(path, root_ok=True)
        if not rel:
            return FileInfo("/", 0, utcnow(), True)
        with self._errors(path):
            doc = self.managed.paths.find_one(self._exact(rel), _FIELDS)
            if doc is not None:
                return _file_info(doc)
            first = self._range(rel + "/").peek()
        if first is None:
            raise NotFoundError(f"{self._name}: no such file or directory {path}", path=path)
        return FileInfo(path, 0, aware(first["updated_at"]), True)

    def list(self, path: str) -> list[str]:
        """Absolute paths of the direct children of a directory, sorted."""
        return [info.path for info in self.children(path)]

    def children(self, path: str) -> builtins.list[FileInfo]:
        """The direct children of a directory with their FileInfo, sorted by path.

        A name that is both a file and a directory (possible in an environment,
        not in a file system) is given as the directory.
        """
        rel = self._rel(path, root_ok=True)
        prefix = rel + "/" if rel else ""
        found: dict[str, FileInfo] = {}
        with self._errors(path):
            cursor = self._range(prefix)
            current, seen_inside = "", 0
            while (doc := cursor.peek()) is not None:
                name, sep, _ = doc["path"][len(prefix) :].partition("/")
                if not sep:
                    found.setdefault(name, _file_info(doc))
                    cursor.advance()
                    continue
                if not found.get(name, _FILE).is_dir:
                    found[name] = FileInfo("/" + prefix + name, 0, aware(doc["updated_at"]), True)
                seen_inside = seen_inside + 1 if name == current else 1
                current = name
                if seen_inside > _LIST_READ_THROUGH:
                    cursor.seek(prefix + name + "0")
                else:
                    cursor.advance()
        if not found and rel:
            raise NotFoundError(f"{self._name}: no such directory {path}", path=path)
        return [found[name] for name in sorted(found)]

    def move(self, src: str, dst: str) -> None:
        """Point dst at src's content and remove src: no bytes copied, dst replaced atomically."""
        rel_src = self._rel(src)
        rel_dst = self._rel(dst)
        with self._errors(src):
            if rel_src != rel_dst:
                if self.managed.paths.find_one(self._exact(rel_src), {"_id": 1}) is None:
                    if self._range(rel_src + "/", limit=1).peek() is not None:
                        raise NotFoundError(
                            f"{self._name}: {src} is a directory; move takes a file", path=src
                        )
                    raise NotFoundError(f"{self._name}: no such file {src}", path=src)
                self.check_file_place(dst)
            self.managed.move_for_environment(self.env_uuid, rel_src, rel_dst)
            if rel_src != rel_dst:  # what was being appended to src must not bring it back
                self.sessions.discard_under(self.env_uuid, rel_src)

    def delete(self, path: str) -> None:
        """Remove the file, or everything under the directory (`/a/b` keeps `/a/bc`)."""
        rel = self._rel(path)
        removed = 0
        with self._errors(path):
            with contextlib.suppress(NotFoundError):
                self.managed.delete_path(self.env_uuid, rel)
                removed += 1
            while True:
                batch = [d["path"] for d in self._range(rel + "/", limit=_DELETE_BATCH).rest()]
                if not batch:
                    break
                removed += len(self.managed.delete_paths(self.env_uuid, batch))
            if removed:  # what was being written there goes with it
                self.sessions.discard_under(self.env_uuid, rel)
        if not removed:
            raise NotFoundError(f"{self._name}: no such file or directory {path}", path=path)

    def redirect_url(self, method: str, path: str) -> str:
        """A signed URL of the HTTP service serving the path (GET/HEAD); "" without a signer."""
        rel = self._rel(path)
        if self.redirect is None or str(method).upper() not in ("GET", "HEAD"):
            return ""
        with self._errors(path):
            return str(self.redirect.sign(str(method).upper(), self.env_uuid, rel))

    def walk(self, path: str, fn: Callable[[FileInfo], Any], *, start_after_hint: str = "") -> None:
        """Visit everything under `path`, depth first, sorted, a directory before its contents.

        fn may raise SkipDir (do not enter that directory) or FilledBuffer (stop);
        any other exception stops the walk and propagates unchanged.
        start_after_hint: skip every entry at or before it in the walk order.
        """
        rel = self._rel(path, root_ok=True)
        hint = self._rel(start_after_hint, root_ok=True) if start_after_hint else ""
        prefix = rel + "/" if rel else ""
        with self._errors(path):
            cursor = self._range(prefix)
            empty = cursor.peek() is None
        if empty and rel:
            raise NotFoundError(f"{self._name}: no such directory {path}", path=path)
        walk = _Walk(self, fn, hint)
        try:
            walk.directory(cursor, prefix)
        except FilledBuffer:
            return

    # -- internals ------------------------------------------------------------------
    def _rel(self, path: object, *, root_ok: bool = False) -> str:
        """The environment path of a driver path ("" for "/" where allowed)."""
        if root_ok and path == "/":
            return ""
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidPathError(f"{self._name}: invalid path {path!r}")
        if self._strict and not _PATH_RE.fullmatch(path):
            raise InvalidPathError(f"{self._name}: invalid path {path!r}")
        rel = path[1:]
        try:
            return check_path(rel)
        except InvalidPathError as exc:
            raise InvalidPathError(f"{self._name}: {exc}") from None

    def check_file_place(self, path: str) -> None:
        """InvalidPathError if a file at `path` would be a directory too, or lie below a file.

        An environment can hold both `a` and `a/b` (written through other
        faces); a file system cannot, and distribution's drivers refuse to
        make one (put or move onto a directory, or below a file). One query.
        """
        self._placed(path)

    def _placed(self, path: str) -> bool:
        """check_file_place, and whether the file is there already (the same one query)."""
        exists, clash = self._place(path)
        if clash is not None:
            if not clash:
                raise InvalidPathError(f"{self._name}: {path} is a directory")
            raise InvalidPathError(f"{self._name}: {path}: /{clash} is a file")
        return exists

    def file_place_clash(self, path: str) -> str | None:
        """What keeps a file from `path`: the file it would lie below, "" if `path` is a
        directory, None if nothing (see check_file_place)."""
        return self._place(path)[1]

    def _place(self, path: str) -> tuple[bool, str | None]:
        """Is there a file at `path`, and what keeps one from it (see file_place_clash)?"""
        rel = self._rel(path)
        query = _clash_query(self.env_uuid, rel)
        query["$or"].append({"path": rel})
        docs = list(self.managed.paths.find(query, {"path": 1}, limit=2))
        exists = any(d["path"] == rel for d in docs)
        clash = next((str(d["path"]) for d in docs if d["path"] != rel), None)
        if clash is not None and clash.startswith(rel + "/"):
            clash = ""
        return exists, clash

    def _settle_place(self, path: str, rev: int) -> None:
        """After the write (at revision `rev`) that made `path`: if a racing writer made
        a clash, the later of the two undoes its own.

        check_file_place is a read before the write: two writers of `/a` and
        `/a/b`, neither there yet, both pass it and both write. So a writer
        that made a new file looks again after its write; the write with the
        later revision (then the larger path) deletes what it wrote, and only
        that (if it is still there: `if_match`), and raises; the earlier one
        stands. A file that was there already is never undone: the other
        writer's check saw it (or it came through a face that allows both).
        """
        rel = self._rel(path)
        query = _clash_query(self.env_uuid, rel)
        others = list(self.managed.paths.find(query, {"path": 1, "rev": 1}, limit=16))
        if all((revision(d.get("rev")), d["path"]) > (rev, rel) for d in others):
            return  # no clash, or ours came first: theirs undo
        with contextlib.suppress(NotFoundError, PreconditionFailedError):
            self.managed.delete_path(self.env_uuid, rel, if_match=rev)
        raise InvalidPathError(
            f"{self._name}: {path}: a file or directory was made there at the same time"
        )

    def _exact(self, rel: str) -> dict[str, Any]:
        return {"env": self.env_uuid, "path": rel, "expires_at": {"$not": {"$lte": utcnow()}}}

    def _range(self, prefix: str, *, limit: int = 0) -> _Range:
        return _Range(self, prefix, limit)

    @contextlib.contextmanager
    def _errors(self, path: str) -> Iterator[None]:
        """Re-raise catalog and MongoDB errors with the driver's name in their text."""
        try:
            yield
        except CatalogError as exc:
            raise self._named(exc, path) from exc
        except PyMongoError as exc:
            raise CatalogError(f"{self._name}: {path}: {type(exc).__name__}: {exc}") from exc

    def _named(self, exc: CatalogError, path: str) -> CatalogError:
        text = str(exc)
        if text.startswith(f"{self._name}:") and (
            not isinstance(exc, NotFoundError) or exc.path == path
        ):
            return exc
        named = copy.copy(exc)
        named.args = (text if text.startswith(f"{self._name}:") else f"{self._name}: {text}",)
        if isinstance(named, NotFoundError) and path:
            named.path = path
        return named


class FileWriter:
    """A driver writer: the session writer, with the driver's errors."""

    def __init__(self, driver: StorageDriver, path: str, writer: SessionWriter) -> None:
        self._driver = driver
        self.path = path
        self._writer = writer

    @property
    def session_id(self) -> str:
        return self._writer.session_id

    def write(self, data: bytes) -> int:
        with self._driver._errors(self.path):
            return self._writer.write(data)

    def size(self) -> int:
        return self._writer.size()

    def close(self) -> None:
        with self._driver._errors(self.path):
            self._writer.close()

    def cancel(self) -> None:
        with self._driver._errors(self.path):
            self._writer.cancel()

    def commit(self) -> PathInfo:
        with self._driver._errors(self.path):
            existed = self._driver._placed(self.path)
            info = self._writer.commit()
            if not existed:
                self._driver._settle_place(self.path, info.revision)
            return info

    def __enter__(self) -> FileWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Range:
    """A cursor over the paths under `prefix` in index order, that can seek forward."""

    def __init__(self, driver: StorageDriver, prefix: str, limit: int = 0) -> None:
        self._driver = driver
        self.prefix = prefix
        self._upper = prefix[:-1] + "0" if prefix else None
        self._lower = prefix
        self._limit = limit
        self._cursor: Cursor[Any] | None = None
        self._head: dict[str, Any] | None = None
        self._loaded = False

    def _open(self) -> None:
        bounds: dict[str, Any] = {"$gte": self._lower}
        if self._upper is not None:
            bounds["$lt"] = self._upper
        query = {
            "env": self._driver.env_uuid,
            "path": bounds,
            "expires_at": {"$not": {"$lte": utcnow()}},
        }
        self._cursor = self._driver.managed.paths.find(
            query, _FIELDS, sort=[("path", ASCENDING)], limit=self._limit
        )

    def peek(self) -> dict[str, Any] | None:
        if not self._loaded:
            if self._cursor is None:
                self._open()
            assert self._cursor is not None
            self._head = next(self._cursor, None)
            self._loaded = True
        return self._head

    def advance(self) -> None:
        self.peek()
        self._loaded = False

    def seek(self, lower: str) -> None:
        """Continue from the first path >= lower (a new query)."""
        if self._cursor is not None:
            self._cursor.close()
        self._cursor = None
        self._lower = lower
        self._loaded = False

    def rest(self) -> Iterator[dict[str, Any]]:
        while (doc := self.peek()) is not None:
            self.advance()
            yield doc


def _walk_key(rel: str) -> str:
    """Walk order: `/` before every other character."""
    return rel.replace("/", "\x00")


def _candidates(name: str) -> Iterator[str]:
    """Names that sort before `name` in walk order but whose subtree the index puts after it."""
    for i, ch in enumerate(name):
        if ch < "/" and i:  # "-" and "."; with strict_paths=False also " ", "!", "+", ...
            yield name[:i]


def _file_info(doc: dict[str, Any]) -> FileInfo:
    return FileInfo("/" + doc["path"], int(doc["length"]), aware(doc["updated_at"]), False)


class _Walk:
    """One walk: fn, the hint, and the recursion over directories."""

    def __init__(self, driver: StorageDriver, fn: Callable[[FileInfo], Any], hint: str) -> None:
        self.driver = driver
        self.fn = fn
        self.hint = hint
        self.hint_key = _walk_key(hint)

    def _after_hint(self, rel: str) -> bool:
        return not self.hint or _walk_key(rel) > self.hint_key

    def _peek(self, cursor: _Range) -> dict[str, Any] | None:
        with self.driver._errors(cursor.prefix):
            return cursor.peek()

    def directory(self, cursor: _Range, prefix: str) -> None:
        """Visit the entries of the directory `prefix` ("a/b/", or "" for the root)."""
        walked: set[str] = set()  # subdirectories visited through a lookup of their own
        looked_up: set[str] = set()
        while (doc := self._peek(cursor)) is not None:
            rel = doc["path"]
            if not rel.startswith(prefix):
                return
            name, sep, _ = rel[len(prefix) :].partition("/")
            if sep and name in walked:
                cursor.seek(prefix + name + "0")
                continue
            for before in _candidates(name):
                if before in looked_up:
                    continue
                looked_up.add(before)
                sub = self.driver._range(prefix + before + "/")
                first = self._peek(sub)
                if first is not None:
                    walked.add(before)
                    self.subdirectory(sub, prefix + before, first, shared=False)
            if not sep:
                cursor.advance()
                if self._after_hint(rel):
                    with contextlib.suppress(SkipDir):
                        self.fn(_file_info(doc))
                continue
            self.subdirectory(cursor, prefix + name, doc, shared=True)

    def subdirectory(self, cursor: _Range, rel: str, first: dict[str, Any], shared: bool) -> None:
        """Visit the directory `rel` and then its contents (the cursor is at its first path)."""
        enter = self._after_hint(rel) or self.hint == rel or self.hint.startswith(rel + "/")
        if self._after_hint(rel):
            try:
                self.fn(FileInfo("/" + rel, 0, aware(first["updated_at"]), True))
            except SkipDir:
                enter = False
        if enter:
            self.directory(cursor, rel + "/")
        elif shared:
            cursor.seek(rel + "0")


def _clash_query(env_uuid: str, rel: str) -> dict[str, Any]:
    """The live paths that keep a file from `rel`: files it would lie below, paths below it."""
    ancestors = [rel[:i] for i, ch in enumerate(rel) if ch == "/"]
    below = {"path": {"$gte": rel + "/", "$lt": rel + "0"}}
    return {
        "env": env_uuid,
        "$or": [{"path": {"$in": ancestors}}, below] if ancestors else [below],
        "expires_at": {"$not": {"$lte": utcnow()}},
    }
