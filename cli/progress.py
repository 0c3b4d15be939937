"""Progress bars on stderr, shown only when stderr is a terminal.

tqdm with `disable=None` is silent when not on a tty, so `rescat get > file`
and scripts stay clean; click.progressbar would write to stdout.
"""

from __future__ import annotations

import io
from typing import Any, BinaryIO

from tqdm import tqdm


def bar(total: int | None, desc: str, unit: str = "B") -> tqdm[Any]:
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=None,
        leave=False,
        dynamic_ncols=True,
    )


class ProgressReader:
    """A reader that advances a progress bar and stays seekable when its source is.

    Staying seekable matters: ManagedStorage hashes a seekable reader first and
    then writes nothing at all when the content is stored already. The bar
    restarts, relabelled "upload", when the reader is rewound for the upload pass.
    """

    def __init__(self, inner: BinaryIO, progress: tqdm[Any]) -> None:
        self._inner = inner
        self._bar = progress

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if data:
            self._bar.update(len(data))
        return data or b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        try:
            return bool(self._inner.seekable())
        except (AttributeError, OSError, ValueError):
            return False

    def tell(self) -> int:
        return self._inner.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        pos = self._inner.seek(offset, whence)
        self._bar.reset(total=self._bar.total)
        self._bar.set_description("upload")
        self._bar.update(pos)
        return pos
