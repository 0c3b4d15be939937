"""Progress bars on stderr, shown only when stderr is a terminal.

tqdm with `disable=None` is silent when not on a tty, so `rescat get > file`
and scripts stay clean; click.progressbar would write to stdout.
"""

from __future__ import annotations

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
    """Wraps a binary reader and advances a progress bar as bytes are read."""

    def __init__(self, inner: BinaryIO, progress: tqdm[Any]) -> None:
        self._inner = inner
        self._bar = progress

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if data:
            self._bar.update(len(data))
        return data

    def readable(self) -> bool:
        return True
