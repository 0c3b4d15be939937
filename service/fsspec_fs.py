"""fsspec filesystem `rescat://ENV/path`, registered by the `fsspec.specs` entry point.

Two modes, one class:

* MongoDB (default): `fsspec.filesystem("rescat", mongo_uri=..., database=...)`, else
  $RESCAT_MONGO_URI, else the embedded mongod. Calls go to the StorageDriver of
  the URL's environment (directories are indexed range queries, `open(...,
  "wb")` is a writer session committed on close and cancelled when the `with`
  block raises), or to the catalog itself where they may cross environments
  (`mv`, `copy`) or carry a condition (`pipe_file(mode="create")`).
* HTTP: `fsspec.filesystem("rescat", server=URL, token=T)` talks to the service
  through `service.client.CatalogClient` with the routes it has: ranged GET, PUT,
  DELETE, move, copy and the list (writes are spooled to a temporary file and
  PUT on close).

In both, `mv` and `copy` (`cp_file`) repoint paths and copy no bytes, also
from one environment to another.

Paths are the catalog's (any path the CLI or HTTP takes, spaces and all), not
only a registry's. As in fsspec's own filesystems: a missing path raises
FileNotFoundError from info/ls/open and finds nothing in find/glob/du; an
environment exists while it holds a path; `rm` resolves every path and glob
before it deletes anything. A file open for reading reads the content the path
held at open, never a mix of two (see RescatFile). `checksum` is the content's
BLAKE3 as an int. `sign(path, expiration)` returns a signed GET URL of the service: over HTTP the
service signs it (POST /v1/environments/ENV/sign; no secret on the client); with
MongoDB it is signed here with `signing_secret=`, RESCAT_SIGNING_SECRET or the
database's own secret, for `base_url=` / $RESCAT_SERVER.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import io
import os
import tempfile
from collections.abc import Iterator
from glob import has_magic  # what fsspec's own glob and expand_path use
from typing import Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from catalog.driver import FileInfo, SkipDir, StorageDriver
from catalog.errors import CatalogError, NotFoundError, PreconditionFailedError
from catalog.managed import WriteOptions
from catalog.names import check_env
from catalog.stats import environments
from service.client import CatalogClient
from service.signing import SECRET_ENV, URLSigner

PROTOCOL = "rescat"
BLOCK = 4 * 1024 * 1024


class RescatFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """rescat's environments as a file system: `ENV/dir/file`."""

    protocol = PROTOCOL
    root_marker = ""

    def __init__(
        self,
        server: str | None = None,
        token: str | None = None,
        *,
        mongo_uri: str | None = None,
        database: str | None = None,
        base_url: str | None = None,
        signing_secret: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.server = server
        self._base_url = base_url or server or os.environ.get("RESCAT_SERVER") or None
        self._signing_secret = signing_secret
        self._drivers: dict[str, StorageDriver] = {}
        self.client: CatalogClient | None = None
        self.managed: Any = None
        if server:
            self.client = CatalogClient(server, token)
        else:
            from catalog.connect import connect

            name = database or os.environ.get("RESCAT_DATABASE") or "rescat"
            self.managed = connect(mongo_uri, name)

    # -- paths --------------------------------------------------------------------
    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]  # type: ignore[return-value]
        text = str(path)
        if text.startswith(PROTOCOL + "://"):
            text = text[len(PROTOCOL) + 3 :]
        elif text.startswith(PROTOCOL + ":"):
            text = text[len(PROTOCOL) + 1 :]
        return text.strip("/")

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        return {}

    def _split(self, path: str) -> tuple[str, str]:
        """(environment, path inside it) of a stripped path; rel is "" for the environment."""
        stripped = self._strip_protocol(path)
        env, _, rel = stripped.partition("/")
        if not env:
            raise FileNotFoundError(path)
        try:
            check_env(env)
        except CatalogError as exc:
            raise ValueError(str(exc)) from None
        return env, rel

    def _driver(self, env: str) -> StorageDriver:
        if env not in self._drivers:
            # Every path the catalog takes, not only a registry's: the CLI and HTTP write them.
            self._drivers[env] = StorageDriver(self.managed, env, name=PROTOCOL, strict_paths=False)
        return self._drivers[env]

    # -- reads --------------------------------------------------------------------
    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        stripped = self._strip_protocol(path)
        if not stripped:
            return {"name": "", "size": 0, "type": "directory"}
        env, rel = self._split(stripped)
        if not rel:
            if not self._env_exists(env):  # environments exist while they hold a path
                raise FileNotFoundError(path)
            return {"name": env, "size": 0, "type": "directory"}
        with _not_found(path):
            if self.client is not None:
                return self._http_info(env, rel)
            try:
                stat = self.managed.stat_for_environment(env, rel)
            except NotFoundError:
                fi = self._driver(env).stat("/" + rel)
                return _entry(env, fi)
            return {
                "name": f"{env}/{rel}",
                "size": stat.length,
                "type": "file",
                "mtime": stat.updated_at.timestamp(),
                "created": stat.created_at.timestamp(),
                "hash": stat.hash,
                "revision": stat.revision,
            }

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        stripped = self._strip_protocol(path)
        if not stripped:
            entries = [{"name": env, "size": 0, "type": "directory"} for env in self._envs()]
        else:
            env, rel = self._split(stripped)
            with _not_found(path):
                if self.client is not None:
                    entries = self._http_ls(env, rel)
                    if not rel and not entries:
                        raise FileNotFoundError(path)
                else:
                    try:
                        children = self._driver(env).children("/" + rel if rel else "/")
                    except NotFoundError:
                        info = self.info(stripped)  # a file lists as itself
                        return [info] if detail else [info["name"]]
                    if not rel and not children:
                        raise FileNotFoundError(path)
                    entries = [_entry(env, fi) for fi in children]
        return entries if detail else [e["name"] for e in entries]

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        env, rel = self._split(path)
        with _not_found(path):
            if self.client is not None:
                return self._http_range(env, rel, start, end)
            reader, length = self.managed.get_for_environment(env, rel)
            try:
                first, stop = _bounds(start, end, length)
                reader.seek(first)
                return bytes(reader.read(max(0, stop - first)))
            finally:
                reader.close()

    def find(
        self,
        path: str,
        maxdepth: int | None = None,
        withdirs: bool = False,
        detail: bool = False,
        **kwargs: Any,
    ) -> Any:
        """As fsspec's: a missing path finds nothing ([]), withdirs includes path itself."""
        stripped = self._strip_protocol(path)
        found: dict[str, dict[str, Any]] = {}
        roots = [e["name"] for e in self.ls("", detail=True)] if not stripped else [stripped]
        for root in roots:
            with contextlib.suppress(FileNotFoundError):
                under = self._find_under(root, maxdepth, withdirs)
                if withdirs and stripped and under and stripped not in under:
                    found[stripped] = {"name": stripped, "size": 0, "type": "directory"}
                found.update(under)
        names = sorted(found)
        return {n: found[n] for n in names} if detail else names

    def checksum(self, path: str) -> int:
        """A file's: its content's BLAKE3 digest as an int (equal content, equal checksum)."""
        info = self.info(path)
        if info["type"] != "file":
            return int(super().checksum(path))  # fsspec's: a token of the info
        return int(info["hash"], 16)

    def modified(self, path: str) -> datetime.datetime:
        return self._time(path, "mtime")

    def created(self, path: str) -> datetime.datetime:
        return self._time(path, "created")

    def _time(self, path: str, field: str) -> datetime.datetime:
        info = self.info(path)
        if info["type"] != "file":  # directories are implicit: they have no times
            raise IsADirectoryError(errno.EISDIR, "a directory has no times", path)
        if field not in info:  # a listing's entry: ask for the file's own
            info = self.info(info["name"])
        return datetime.datetime.fromtimestamp(info[field], datetime.timezone.utc)

    def sign(self, path: str, expiration: int = 100, **kwargs: Any) -> str:
        """A URL of the service that serves the path without a token for `expiration` s."""
        env, rel = self._split(path)
        if not rel:
            raise ValueError(f"{path}: only files can be signed")
        if self.client is not None:  # the service signs: no secret on this side
            return self.client.sign(env, rel, expires_in=expiration)
        if not self._base_url:
            raise NotImplementedError("signing needs the service's URL (server= or base_url=)")
        secret = self._signing_secret or os.environ.get(SECRET_ENV)
        if secret:
            signer = URLSigner(self._base_url, secret, ttl=float(expiration))
        elif self.managed is not None:
            signer = URLSigner.for_database(self.managed, self._base_url, ttl=float(expiration))
        else:
            raise NotImplementedError(
                f"signing over HTTP needs the service's secret (signing_secret= or {SECRET_ENV})"
            )
        return signer.sign("GET", env, rel)

    # -- writes -------------------------------------------------------------------
    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        """Set the file's bytes; mode="create" only if it does not exist (FileExistsError).

        The existence check of "create" is part of the write (If-None-Match),
        not a look before it: of racing creators exactly one succeeds.
        """
        if mode not in ("overwrite", "create"):
            raise ValueError(f"mode is 'overwrite' or 'create', not {mode!r}")
        env, rel = self._split(path)
        if not rel:
            raise IsADirectoryError(path)
        data, create = bytes(value), mode == "create"
        self._check_place(env, rel, path)
        try:
            if self.client is not None:
                self.client.put(env, rel, data, if_none_match=create)
            elif create:
                options = WriteOptions(if_none_match=True)
                self.managed.put_path(env, rel, io.BytesIO(data), len(data), options=options)
            else:
                self._driver(env).put_content("/" + rel, data)
        except PreconditionFailedError:
            raise FileExistsError(path) from None
        self.invalidate_cache(self._parent(path))

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> RescatFile:
        if mode not in ("rb", "wb"):
            raise ValueError(f"rescat files open as 'rb' or 'wb', not {mode!r}")
        return RescatFile(
            self,
            path,
            mode,
            block_size=block_size or BLOCK,
            autocommit=autocommit,
            cache_options=cache_options,
            **kwargs,
        )

    def mv(
        self,
        path1: str,
        path2: str,
        recursive: bool = False,
        maxdepth: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Repoint (no bytes copied), also across environments and over HTTP.

        A file moves atomically; a directory (recursive) moves file by file, as
        `aws s3 mv --recursive` does. Into path2 when it is a directory (or ends
        with `/`), as `mv` does.
        """
        root = self._strip_protocol(path1)
        dest = self._strip_protocol(path2)
        if str(path2).endswith("/") or (dest and self.isdir(dest)):
            dest = f"{dest}/{root.rsplit('/', 1)[-1]}"  # into the directory, as mv does
        if root == dest:
            return
        with _not_found(path1):
            if self.isfile(root):
                self._repoint(root, dest, move=True)
            elif self.isdir(root):
                if not recursive:
                    raise IsADirectoryError(f"{path1} is a directory: move it with recursive=True")
                if dest.startswith(root + "/"):
                    raise ValueError(f"cannot move {path1} into itself ({path2})")
                for name in self.find(root, maxdepth=maxdepth):
                    self._repoint(name, dest + name[len(root) :], move=True)
            else:
                raise FileNotFoundError(path1)
        self.invalidate_cache()

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """path2 holds what path1 holds: one more reference, no bytes copied.

        `copy` (also recursive, also across environments) calls this per file.
        """
        with _not_found(path1):
            self._repoint(path1, path2, move=False)
        self.invalidate_cache(self._parent(path2))

    def _repoint(self, path1: str, path2: str, *, move: bool) -> None:
        env1, rel1 = self._split(path1)
        env2, rel2 = self._split(path2)
        if not rel1:
            raise FileNotFoundError(path1)  # an environment is not a file (copy skips it)
        if not rel2:
            raise IsADirectoryError(path2)
        self._check_place(env2, rel2, path2)
        if self.client is not None:
            if move:
                self.client.move(env1, rel1, rel2, dst_env=env2)
            else:
                self.client.copy(env1, rel1, env2, rel2)
        else:
            if move:
                self.managed.move_path(env1, rel1, env2, rel2)
            else:
                self.managed.copy_path(env1, rel1, env2, rel2)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Delete files, globs and (recursive) directories: all or, if one is missing, none.

        Every path or glob is resolved first: a missing one (FileNotFoundError)
        or a directory without `recursive` (IsADirectoryError) stops it before
        anything is deleted. maxdepth: only files that many levels down.
        """
        if maxdepth is not None and maxdepth < 1:
            raise ValueError("maxdepth must be at least 1")
        targets: list[tuple[str, str]] = []
        for one in path if isinstance(path, (list, tuple)) else [path]:
            name = self._strip_protocol(one)
            if has_magic(name):
                matched = self.glob(name, detail=True)
                if not matched:
                    raise FileNotFoundError(one)
                targets += [(n, str(i["type"])) for n, i in sorted(matched.items())]
            else:
                targets.append((name, str(self.info(name)["type"])))
        if not recursive:
            for name, kind in targets:
                if kind == "directory":
                    raise IsADirectoryError(errno.EISDIR, "use recursive=True", name)
        for name, kind in targets:
            with contextlib.suppress(FileNotFoundError):  # gone with a directory before it
                if kind == "directory" and maxdepth is not None:
                    for file in self.find(name, maxdepth=maxdepth):
                        self._rm_one(file, False)
                else:
                    self._rm_one(name, recursive)
        self.invalidate_cache()

    def _rm_one(self, name: str, recursive: bool) -> None:
        env, rel = self._split(name)
        with _not_found(name):
            if self.client is not None:
                self._http_rm(env, rel, recursive)
            elif not rel:
                for child in self._driver(env).list("/"):
                    self._driver(env).delete(child)
            else:
                self._driver(env).delete("/" + rel)

    def _rm(self, path: str) -> None:
        self.rm(path)

    def rm_file(self, path: str) -> None:
        self.rm(path)

    # -- internals ------------------------------------------------------------------
    def _check_place(self, env: str, rel: str, path: str) -> None:
        """No file onto a directory or below a file, in either mode (as the driver refuses).

        An environment may hold both `a` and `a/b` (written through other
        faces); a file system cannot show them. IsADirectoryError or
        NotADirectoryError, as a local file system says it.
        """
        if self.client is None:
            clash = self._driver(env).file_place_clash("/" + rel)
        else:
            clash = None
            for i, ch in enumerate(rel):
                if ch == "/" and self._http_exists(env, rel[:i]):
                    clash = rel[:i]
                    break
            if clash is None and self.client.list_page(env, rel + "/", limit=1)["items"]:
                clash = ""
        if clash == "":
            raise IsADirectoryError(errno.EISDIR, "a directory is there", path)
        if clash is not None:
            raise NotADirectoryError(errno.ENOTDIR, f"{env}/{clash} is a file", path)

    def _http_exists(self, env: str, rel: str) -> bool:
        assert self.client is not None
        try:
            self.client.stat(env, rel)
        except NotFoundError:
            return False
        return True

    def _envs(self) -> list[str]:
        if self.client is not None:
            raise NotImplementedError("listing environments over HTTP")
        # As `rescat env ls` has them: not one whose every key has expired.
        return [summary.env for summary in environments(self.managed)]

    def _env_exists(self, env: str) -> bool:
        if self.client is not None:
            return bool(self.client.list_page(env, "", limit=1)["items"])
        return next(iter(self.managed.iter_paths(env, "")), None) is not None

    def _find_under(
        self, root: str, maxdepth: int | None, withdirs: bool
    ) -> dict[str, dict[str, Any]]:
        env, rel = self._split(root)
        out: dict[str, dict[str, Any]] = {}
        with _not_found(root):
            if self.client is not None:
                prefix = rel + "/" if rel else ""
                items = self.client.list(env, prefix)
                if rel and not items:
                    info = self._http_info(env, rel)
                    return {info["name"]: info}
                for item in items:
                    parts = item["path"][len(prefix) :].split("/")
                    if withdirs:  # the directories above it, also of a file too deep itself
                        for i in range(len(parts) - 1):
                            if maxdepth is not None and i + 1 > maxdepth:
                                break
                            d = f"{env}/{prefix}{'/'.join(parts[: i + 1])}"
                            out.setdefault(d, {"name": d, "size": 0, "type": "directory"})
                    if maxdepth is not None and len(parts) > maxdepth:
                        continue
                    name = f"{env}/{item['path']}"
                    out[name] = {"name": name, "size": int(item["length"]), "type": "file"}
                return out
            driver = self._driver(env)
            base_depth = rel.count("/") + 1 if rel else 0

            def visit(fi: FileInfo) -> None:
                depth = fi.path.count("/") - base_depth
                entry = _entry(env, fi)
                if not fi.is_dir or withdirs:
                    out[entry["name"]] = entry
                if fi.is_dir and maxdepth is not None and depth >= maxdepth:
                    raise SkipDir

            try:
                driver.walk("/" + rel if rel else "/", visit)
            except NotFoundError:
                if not rel:
                    return out
                fi = driver.stat("/" + rel)  # a file finds itself
                return {f"{env}/{rel}": _entry(env, fi)}
        return out

    def _http_info(self, env: str, rel: str) -> dict[str, Any]:
        assert self.client is not None
        try:
            stat = self.client.path_info(env, rel)
        except NotFoundError:
            if self.client.list_page(env, rel + "/", limit=1)["items"]:
                return {"name": f"{env}/{rel}", "size": 0, "type": "directory"}
            raise
        return {
            "name": f"{env}/{rel}",
            "size": int(stat["length"]),
            "type": "file",
            "mtime": _timestamp(stat["updated_at"]),
            "created": _timestamp(stat["created_at"]),
            "hash": stat["hash"],
            "revision": stat.get("revision"),
        }

    def _http_ls(self, env: str, rel: str) -> list[dict[str, Any]]:
        assert self.client is not None
        prefix = rel + "/" if rel else ""
        items = self.client.list(env, prefix)
        if rel and not items:
            return [self._http_info(env, rel)]
        found: dict[str, dict[str, Any]] = {}
        for item in items:
            name, sep, _ = item["path"][len(prefix) :].partition("/")
            full = f"{env}/{prefix}{name}"
            if sep:
                found[full] = {"name": full, "size": 0, "type": "directory"}
            else:
                found.setdefault(full, {"name": full, "size": int(item["length"]), "type": "file"})
        return [found[k] for k in sorted(found)]

    def _http_range(
        self, env: str, rel: str, start: int | None, end: int | None, *, etag: str = ""
    ) -> bytes:
        """A Range GET (the whole content when no range is asked for).

        etag: of the content the caller is reading; if the path holds another
        by now, OSError(ESTALE) instead of bytes of the other.
        """
        assert self.client is not None
        from service.client import _object_url, _raise_for

        if not start and end is None and not etag:
            return self.client.read(env, rel)
        stop: int | None
        if (start or 0) < 0 or (end is not None and end < 0):
            first, stop = _bounds(start, end, int(self.client.stat(env, rel)["length"]))
        else:
            first, stop = start or 0, end
        if stop is not None and stop <= first:
            return b""
        last = "" if stop is None else str(stop - 1)
        headers = {"range": f"bytes={first}-{last}", "accept-encoding": "identity"}
        if etag:
            headers["if-match"] = etag
        response = self.client._http.get(_object_url(env, rel), headers=headers)
        if response.status_code == 416:  # starts at or past the end
            return b""
        if response.status_code == 412:
            raise _changed(f"{env}/{rel}")
        _raise_for(response)
        if response.status_code == 200:  # the range was ignored
            return response.content[first:stop]
        return response.content

    def _http_rm(self, env: str, rel: str, recursive: bool) -> None:
        assert self.client is not None
        prefix = rel + "/" if rel else ""
        if rel:
            try:
                self.client.remove(env, rel)
                removed = True
            except NotFoundError:
                removed = False
            if not recursive:
                if not removed:
                    if self.client.list(env, prefix):
                        raise IsADirectoryError(f"{env}/{rel}")
                    raise FileNotFoundError(f"{env}/{rel}")
                return
        elif not recursive:
            raise IsADirectoryError(env)
        else:
            removed = False
        children = self.client.list(env, prefix)
        if not children and not removed:
            raise FileNotFoundError(f"{env}/{rel}")
        for item in children:
            self.client.remove(env, item["path"])


class RescatFile(AbstractBufferedFile):  # type: ignore[misc]
    """`rb`: ranged reads of the content the path held at open. `wb`: a writer
    session (MongoDB) or a spooled PUT.

    A path overwritten while it is read must not hand out a mix of two
    contents: with MongoDB the file holds one stream of the content it opened
    (its read lease keeps those bytes until close); over HTTP each range is
    asked for with If-Match on that content's ETag, and a change raises
    OSError(ESTALE).
    """

    fs: RescatFileSystem

    def __init__(self, fs: RescatFileSystem, path: str, mode: str = "rb", **kwargs: Any) -> None:
        self._reader: Any = None
        self._etag = ""
        if mode == "rb":
            env, rel = fs._split(path)
            if not rel:
                raise IsADirectoryError(errno.EISDIR, "an environment is a directory", path)
            try:
                if fs.client is not None:
                    info = fs.client.stat(env, rel)
                    self._etag, size = info["etag"], int(info["length"])
                else:
                    self._reader, opened = fs.managed.open_path(env, rel)
                    size = opened.length
            except NotFoundError:
                if fs.isdir(path):
                    raise IsADirectoryError(errno.EISDIR, "a directory", path) from None
                raise FileNotFoundError(path) from None
            kwargs["size"] = size
        try:
            super().__init__(fs, path, mode, **kwargs)
        except BaseException:
            self._close_reader()
            raise

    def _initiate_upload(self) -> None:
        env, rel = self.fs._split(self.path)
        if not rel:
            raise IsADirectoryError(self.path)
        self.fs._check_place(env, rel, self.path)
        if self.fs.client is not None:
            # closed by the final _upload_chunk or by discard
            self._spool: Any = tempfile.TemporaryFile()  # noqa: SIM115
            self._writer: Any = None
        else:
            self._spool = None
            # Its own session: another open of the path does not end this one (S3's way).
            self._writer = self.fs._driver(env).private_writer("/" + rel)

    def _upload_chunk(self, final: bool = False) -> bool:
        self.buffer.seek(0)
        data = self.buffer.getbuffer()
        if self._writer is not None:
            if len(data):
                self._writer.write(data)
        else:
            self._spool.write(data)
        del data
        if final and self.autocommit:
            self._publish()
        return True

    def commit(self) -> None:
        """Publish a file written with autocommit=False (fsspec's `transaction` does)."""
        self._publish()
        self.fs.invalidate_cache(self.path)
        self.fs.invalidate_cache(self.fs._parent(self.path))

    def _publish(self) -> None:
        """The written bytes become the path's content; on failure, nothing is kept.

        A writer session whose commit is refused (a file where a directory
        is, say) is discarded: the file is closed by then, and its caller has
        nothing left to cancel, while the session would hold the path's
        uploads and its lease would be renewed as long as the process lives.
        """
        if getattr(self, "_published", False):
            return
        writer, spool = self._writer, self._spool
        env, rel = self.fs._split(self.path)
        if writer is not None:
            try:
                self.fs._check_place(env, rel, self.path)  # again: it may have changed
                writer.commit()
            except BaseException:
                with contextlib.suppress(CatalogError):
                    writer.cancel()
                raise
        elif spool is not None:
            spool.seek(0)
            assert self.fs.client is not None
            try:
                self.fs._check_place(env, rel, self.path)  # again: it may have changed
                self.fs.client.put(env, rel, spool)
            finally:
                spool.close()
        self._published = True

    def _fetch_range(self, start: int, end: int) -> bytes:
        if self._reader is not None:
            self._reader.seek(start)
            return bytes(self._reader.read(max(0, end - start)))
        env, rel = self.fs._split(self.path)
        return self.fs._http_range(env, rel, start, end, etag=self._etag)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._close_reader()

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(Exception):
                reader.close()

    def discard(self) -> None:
        """Throw the upload away: nothing becomes visible (an aborted transaction)."""
        writer = getattr(self, "_writer", None)
        if writer is not None:
            with contextlib.suppress(CatalogError):
                writer.cancel()
        spool = getattr(self, "_spool", None)
        if spool is not None:
            spool.close()

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        closed: bool = getattr(self, "closed", False)
        if exc_type is not None and self.mode != "rb" and not closed:
            self.discard()
            self.closed = True
            return
        self.close()


def _entry(env: str, fi: FileInfo) -> dict[str, Any]:
    name = f"{env}{fi.path}"
    if fi.is_dir:
        return {"name": name, "size": 0, "type": "directory"}
    return {"name": name, "size": fi.size, "type": "file", "mtime": fi.mod_time.timestamp()}


def _bounds(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """fsspec's [start, end) with negatives counted from the end, clipped to the content."""
    first = 0 if start is None else (size + start if start < 0 else start)
    stop = size if end is None else (size + end if end < 0 else end)
    return max(0, min(first, size)), max(0, min(stop, size))


def _timestamp(rfc3339: str) -> float:
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _changed(path: str) -> OSError:
    return OSError(errno.ESTALE, "the path was overwritten while it was being read", path)


@contextlib.contextmanager
def _not_found(path: str) -> Iterator[None]:
    try:
        yield
    except NotFoundError as exc:
        raise FileNotFoundError(path) from exc
