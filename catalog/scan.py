"""What gc, fsck and stats share: progress bars, the byte store as they see it, batching.

The store view is the catalog's side of GridFS inspection: the inspection
itself (file listing, totals, chunk usage, last write, chunk checks) is
GridFSStorage's; this only checks that a storage has those methods and gives
them the types gc and fsck rely on.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar, cast

from pymongo.errors import OperationFailure

from catalog.clock import aware
from catalog.errors import CatalogError, NotFoundError
from catalog.managed import ManagedStorage
from catalog.resources import to_resource
from storage.gridfs_storage import StoredFile

BATCH = 500
READ_BLOCK = 1024 * 1024
# ObjectId timestamps are whole seconds, truncated: add one so an age is never overstated.
OID_SLACK = datetime.timedelta(seconds=1)

T = TypeVar("T")


# -- progress -----------------------------------------------------------------
class ProgressBar(Protocol):
    def update(self, n: float | None = 1) -> Any: ...

    def close(self) -> Any: ...


BarFactory = Callable[[int | None, str, str], ProgressBar]
"""(total, description, unit) -> a bar; `cli.progress.bar` has this signature."""


class NoBar:
    def update(self, n: float | None = 1) -> None:
        return None

    def close(self) -> None:
        return None


def no_bar(total: int | None, desc: str, unit: str) -> ProgressBar:
    return NoBar()


# -- the byte store, as gc and fsck see it --------------------------------------
FileInfo = StoredFile


class StoreView:
    """What gc and fsck need of a resource storage: GridFSStorage's inspection methods."""

    NEEDED = (
        "iter_files",
        "file_exists",
        "totals",
        "stat",
        "get",
        "remove_file",
        "orphan_chunk_file_ids",
        "last_write",
        "chunk_usage",
        "chunk_problems",
    )

    def __init__(self, storage: Any) -> None:
        missing = [name for name in self.NEEDED if not hasattr(storage, name)]
        if missing:
            raise CatalogError(
                f"gc and fsck need a GridFS resource storage ({type(storage).__name__} "
                f"lacks {', '.join(missing)})"
            )
        self.storage = storage

    def iter_files(self) -> Iterator[FileInfo]:
        return iter(self.storage.iter_files())

    def file_exists(self, file_id: Any) -> bool:
        return bool(self.storage.file_exists(file_id))

    def totals(self) -> tuple[int, int]:
        files, size = self.storage.totals()
        return int(files), int(size)

    def stat(self, path: str) -> FileInfo | None:
        try:
            return cast(FileInfo, self.storage.stat(path))
        except NotFoundError:
            return None

    def orphan_chunk_ids(self) -> list[Any]:
        return list(self.storage.orphan_chunk_file_ids())

    def last_activity(self, files_id: Any) -> datetime.datetime | None:
        """When chunks of `files_id` were last written, plus slack for clock granularity."""
        when = self.storage.last_write(files_id)
        return aware(when) + OID_SLACK if when is not None else None

    def chunk_usage(self, files_id: Any) -> tuple[int, int]:
        chunks, size = self.storage.chunk_usage(files_id)
        return int(chunks), int(size)

    def chunk_problems(self, info: FileInfo) -> list[str]:
        return list(self.storage.chunk_problems(info))

    def remove_file(self, file_id: Any) -> None:
        """Delete a files document and its chunks (also works for chunks alone)."""
        self.storage.remove_file(file_id)

    def content_hash(self, path: str, bar: ProgressBar) -> str:
        """BLAKE3 of the stored bytes at `path`, streamed."""
        import blake3

        hasher = blake3.blake3()
        reader = self.storage.get(path)
        try:
            if hasattr(reader, "iter_chunks"):
                pieces: Iterable[bytes] = reader.iter_chunks()
            else:
                pieces = iter(lambda: reader.read(READ_BLOCK), b"")
            for piece in pieces:
                hasher.update(piece)
                bar.update(len(piece))
        finally:
            reader.close()
        return str(hasher.hexdigest())


def maybe_store(managed: ManagedStorage) -> StoreView | None:
    try:
        return StoreView(managed.resource_storage)
    except CatalogError:
        return None


# -- scans shared by gc and fsck ----------------------------------------------------
def unreferenced_files(
    managed: ManagedStorage, store: StoreView, bar: ProgressBar
) -> Iterator[FileInfo]:
    """Stored files whose filename is no catalog entry's path (at the time of the scan)."""
    entries = managed.catalog.collection
    for batch in batches(store.iter_files(), BATCH):
        names = list({info.path for info in batch})
        known = {d["path"] for d in entries.find({"path": {"$in": names}}, {"path": 1})}
        for info in batch:
            bar.update(1)
            if info.path not in known:
                yield info


def live_pending(managed: ManagedStorage, digest: str | None) -> bool:
    """Is an upload of `digest` in progress under a live lease?"""
    if not digest:
        return False
    doc = managed.catalog.collection.find_one({"hash": digest})
    if doc is None:
        return False
    res = to_resource(doc)
    return res.pending and not res.lease_expired()


# -- helpers ----------------------------------------------------------------------
def path_counts(managed: ManagedStorage, oids: list[Any]) -> dict[Any, int]:
    pipeline: list[dict[str, Any]] = [
        {"$match": {"resource_id": {"$in": oids}}},
        {"$group": {"_id": "$resource_id", "n": {"$sum": 1}}},
    ]
    return {doc["_id"]: int(doc["n"]) for doc in aggregate(managed.paths, pipeline)}


def aggregate(collection: Any, pipeline: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    try:
        cursor = collection.aggregate(pipeline, allowDiskUse=True)
    except (OperationFailure, TypeError):
        cursor = collection.aggregate(pipeline)
    yield from cursor


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def iso(value: datetime.datetime | None) -> str:
    if value is None:
        return "?"
    return (
        value.astimezone(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    )
