"""Local files as sources and targets of transfers, with `cp`'s manners.

Shared by `rescat get -o`, `rescat download -o` (through the client) and the
directory commands. The rules, and why:

* A target that is not a regular file (`/dev/null`, a FIFO, a terminal) is
  written through, never replaced or deleted: it is not ours to replace.
* A symlink is followed, as `cp` and `curl -o` do: the link stays a link and
  the file it points at gets the content (created if the link dangles).
* A regular target is replaced atomically: the bytes go to a temporary file
  beside it, renamed over it only once complete and verified, so a failure
  leaves the old file (or no file) exactly as it was.
* A new file gets `0666 & ~umask`, a replaced one keeps its mode, as `cp` does.
* A source that is not a regular file (a pipe, `<(...)`, /dev/stdin) has no
  size up front: it is read to EOF, never trusted for its `st_size`.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from catalog.errors import CatalogError

_umask_lock = threading.Lock()
_umask: int | None = None


class LocalFileError(CatalogError):
    """A local file cannot be read or written (named in the message)."""

    code = "local_file"


def current_umask() -> int:
    """The process umask, read once.

    Reading it means setting it for a moment; doing that once, before the
    worker threads of a directory transfer create files, keeps them from ever
    seeing the temporary value.
    """
    global _umask
    with _umask_lock:
        if _umask is None:
            _umask = os.umask(0o022)
            os.umask(_umask)
        return _umask


def is_regular_source(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a regular file, whose size can be trusted before reading it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def regular_size(stream: BinaryIO) -> int | None:
    """Bytes left in an open stream if it is a regular file, else None (read to EOF)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        st = os.fstat(stream.fileno())
        if stat.S_ISREG(st.st_mode):
            return max(st.st_size - stream.tell(), 0)
    return None


def open_source(path: str) -> BinaryIO:
    """Open a file to upload, with the one-line message `put` gives when it cannot."""
    try:
        if os.path.isdir(path):
            raise LocalFileError(f"{path}: is a directory (`rescat put -r` stores one)")
        return open(path, "rb")
    except FileNotFoundError:
        raise LocalFileError(f"{path}: no such file") from None
    except PermissionError:
        raise LocalFileError(f"{path}: permission denied") from None
    except OSError as exc:
        raise LocalFileError(f"{path}: {exc.strerror or exc}") from None


def resolve_target(target: str | os.PathLike[str]) -> Path:
    """The file a write to `target` must land in: symlinks followed (dangling ones too).

    Only for regular or missing targets: /dev/stdout resolves to names like
    `/proc/self/fd/pipe:[123]` that are no place to create a file.
    """
    return Path(os.path.realpath(target))


def target_kind(target: str | os.PathLike[str]) -> str:
    """ "missing", "regular", "directory" or "special" (device, FIFO, socket, tty).

    Follows symlinks, as the write will.
    """
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise LocalFileError(f"{os.fspath(target)}: {exc.strerror or exc}") from None
    if stat.S_ISREG(mode):
        return "regular"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special"


class Output:
    """A write to a local target that is committed whole or leaves no trace.

    `file` is where the bytes go. `commit()` makes them the target's content;
    `abort()` (also on leaving a `with` block by an exception) removes only what
    this object created. Special files are written through and simply closed.
    """

    def __init__(self, target: str | os.PathLike[str], *, temp_name: str | None = None) -> None:
        self.shown = os.fspath(target)
        self.kind = target_kind(target)
        self.real = Path(target) if self.kind == "special" else resolve_target(target)
        self.temp: Path | None = None
        self.file: BinaryIO
        if self.kind == "directory":
            raise LocalFileError(f"{self.shown}: is a directory")
        try:
            if self.kind == "special":
                self.file = open(self.real, "wb")  # noqa: SIM115 - closed by commit/abort
                return
            if temp_name is not None:
                self.temp = self.real.parent / temp_name
                fd = os.open(self.temp, os.O_RDWR | os.O_CREAT, 0o600)
            else:
                fd, name = tempfile.mkstemp(
                    dir=self.real.parent, prefix=f".{self.real.name[:100]}.", suffix=".rescat-tmp"
                )
                self.temp = Path(name)
            self.file = os.fdopen(fd, "r+b")
        except FileNotFoundError:
            raise LocalFileError(f"cannot write {self.shown}: no such directory") from None
        except OSError as exc:
            raise LocalFileError(f"cannot write {self.shown}: {exc.strerror or exc}") from None

    @property
    def atomic(self) -> bool:
        return self.temp is not None

    def commit(self) -> None:
        """Flush, give the file its mode, and put it in place in one rename."""
        try:
            self.file.flush()
            if self.temp is None:
                self.file.close()
                return
            os.fsync(self.file.fileno())
            try:
                mode = stat.S_IMODE(os.stat(self.real).st_mode)
            except FileNotFoundError:
                mode = 0o666 & ~current_umask()
            if hasattr(os, "fchmod"):
                os.fchmod(self.file.fileno(), mode)
                self.file.close()
            else:  # pragma: no cover - Windows before Python 3.13
                self.file.close()
                os.chmod(self.temp, mode)
            os.replace(self.temp, self.real)
            self.temp = None
        except OSError as exc:
            self.abort()
            raise LocalFileError(f"cannot write {self.shown}: {exc.strerror or exc}") from None

    def abort(self, keep: bool = False) -> None:
        """Close, and delete the temporary file unless `keep` (a partial to resume)."""
        with contextlib.suppress(OSError):
            self.file.close()
        if self.temp is not None and not keep:
            with contextlib.suppress(OSError):
                self.temp.unlink()
        self.temp = None

    def __enter__(self) -> Output:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()
