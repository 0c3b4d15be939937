"""Group commit: writes that many threads ask for at once go as one command.

Why: on a busy server each small write pays a round trip, the parsing of a
command and its own wait for a majority of the replica set; when a few
hundred small puts a second arrive from many threads, most of a put's cost is
that overhead, not the document. Writes batched into one command pay it once.

No thread is started and a lone caller waits for nobody: the caller that
finds room for another batch in flight runs, as its leader, the batch of
everything queued at that moment (its own item first); the others wait for
their result. At most `max_inflight` batches run at once, so under load the
queue fills while they run and the next batch is larger.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pymongo.errors import BulkWriteError

I = TypeVar("I")  # noqa: E741 - an item, as in the typing docs' Generic examples
R = TypeVar("R")


@dataclass(eq=False)  # slots are compared by identity: items may be equal
class _Slot(Generic[I, R]):
    item: I
    queued: bool = True
    done: bool = False
    result: R | None = None
    error: BaseException | None = None


@dataclass
class GroupStats:
    """How batching went: the mean batch is items / batches."""

    batches: int = 0
    items: int = 0
    largest: int = 0

    def to_dict(self) -> dict[str, float]:
        mean = self.items / self.batches if self.batches else 0.0
        return {
            "batches": self.batches,
            "items": self.items,
            "largest": self.largest,
            "mean": round(mean, 2),
        }


@dataclass
class GroupCommit(Generic[I, R]):
    """submit(item) runs `run_batch` on a batch holding item; returns item's result.

    run_batch(items) returns one result per item, in order; if it raises,
    every caller in that batch gets the exception (it must then have changed
    nothing it could not explain: see ResourceCatalog.take_refs).
    """

    run_batch: Callable[[Sequence[I]], list[R]]
    max_batch: int = 64
    max_inflight: int = 2
    stats: GroupStats = field(default_factory=GroupStats)
    _queue: list[_Slot[I, R]] = field(default_factory=list, init=False)
    _inflight: int = field(default=0, init=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)

    def submit(self, item: I) -> R:
        slot: _Slot[I, R] = _Slot(item)
        with self._cond:
            self._queue.append(slot)
            while slot.queued and self._inflight >= self.max_inflight:
                self._cond.wait()
            if slot.queued:  # room for a batch: lead it
                batch = self._take(slot)
            else:  # a leader took it
                while not slot.done:
                    self._cond.wait()
                return self._outcome(slot)
        self._run(batch)
        return self._outcome(slot)

    def _take(self, own: _Slot[I, R]) -> list[_Slot[I, R]]:
        self._queue.remove(own)
        batch = [own, *self._queue[: self.max_batch - 1]]
        del self._queue[: self.max_batch - 1]
        for s in batch:
            s.queued = False
        self._inflight += 1
        self.stats.batches += 1
        self.stats.items += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        return batch

    def _run(self, batch: list[_Slot[I, R]]) -> None:
        try:
            results = self.run_batch([s.item for s in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} gave {len(results)} results")
        except BaseException as exc:  # every caller of the batch sees it
            with self._cond:
                for s in batch:
                    s.error, s.done = exc, True
                self._inflight -= 1
                self._cond.notify_all()
            return
        with self._cond:
            for s, result in zip(batch, results, strict=True):
                s.result, s.done = result, True
            self._inflight -= 1
            self._cond.notify_all()

    @staticmethod
    def _outcome(slot: _Slot[I, R]) -> R:
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]  # R may itself admit None


def insert_new(collection: Any, docs: Sequence[dict[str, Any]]) -> list[bool]:
    """A `run_batch` of inserts: all in one command; False for each refused as a duplicate.

    Any other error is every caller's, as if each had written alone (a network
    error leaves each insert's outcome unknown).
    """
    try:
        collection.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors") or []
        taken = {e["index"] for e in errors if e.get("code") == 11000}
        if exc.details.get("writeConcernErrors") or len(taken) != len(errors):
            raise
        return [i not in taken for i in range(len(docs))]
    return [True] * len(docs)
