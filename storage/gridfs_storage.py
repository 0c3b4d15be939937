"""GridFS-compatible byte store that streams, hashes and cleans up after itself.

Why not pymongo's GridFSBucket: since pymongo 4.7 `upload_from_stream` buffers
up to 48 MB per insert, waits for the journal on every batch and does not hash.
This writer reads and hashes a batch while the previous batch is being
inserted on a worker thread (chunks at w=1), then writes the files document at
w="majority": the files document is the commit point, so a reader either sees
a whole file or none. Every failure path deletes the chunks it wrote.

The layout is standard GridFS (`<ns>.files`, `<ns>.chunks`, the standard
indexes), so any GridFS client can read what this writes.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

import blake3
from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, WriteConcern
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import OperationFailure
from pymongo.read_concern import ReadConcern

from storage.errors import LengthMismatchError, NotFoundError, StaleWriteError
from storage.reader import CorruptFileError, GridFSReader, NotDurableError

DEFAULT_CHUNK_SIZE = 1024 * 1024
DEFAULT_BATCH_BYTES = 4 * 1024 * 1024
DEFAULT_WRITERS = 2


@dataclass(frozen=True)
class StoredFile:
    """What the store knows of one file: enough for gc and fsck."""

    file_id: Any
    path: str
    length: int
    chunk_size: int
    upload_date: datetime.datetime
    blake3: str | None


def read_exact(reader: BinaryIO, size: int) -> bytes:
    """Read `size` bytes, looping over short reads; fewer only at EOF."""
    data = reader.read(size)
    if data is None:
        data = b""
    if len(data) >= size or not data:
        return bytes(data)
    parts = [bytes(data)]
    got = len(data)
    while got < size:
        more = reader.read(size - got)
        if not more:
            break
        parts.append(bytes(more))
        got += len(more)
    return b"".join(parts)


class GridFSStorage:
    """A ResourceStorage on GridFS, under its own namespace (bucket name)."""

    def __init__(
        self,
        db: Database[Any],
        namespace: str = "resources",
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        writers: int = DEFAULT_WRITERS,
    ) -> None:
        if not namespace or "$" in namespace or "\0" in namespace:
            raise ValueError(f"invalid namespace: {namespace!r}")
        self.db = db
        self.namespace = namespace
        self.chunk_size = chunk_size
        self.batch_bytes = max(batch_bytes, chunk_size)
        self.writers = max(1, writers)
        files: Collection[Any] = db[f"{namespace}.files"]
        chunks: Collection[Any] = db[f"{namespace}.chunks"]
        self.files = files.with_options(write_concern=WriteConcern("majority"))
        self.chunks = chunks.with_options(write_concern=WriteConcern("majority"))
        self._fast_chunks = chunks.with_options(write_concern=WriteConcern(w=1))
        self._majority_chunks = chunks.with_options(read_concern=_majority_read(db))
        self.chunks.create_index([("files_id", ASCENDING), ("n", ASCENDING)], unique=True)
        self.files.create_index([("filename", ASCENDING), ("uploadDate", ASCENDING)])

    # -- ResourceStorage ------------------------------------------------------
    def put(self, path: str, reader: BinaryIO, length: int = -1) -> str:
        """Store `length` bytes (< 0: to EOF) at `path`, replacing what was there."""
        return self.put_file(path, reader, length).blake3 or ""

    def get(self, path: str) -> GridFSReader:
        doc = self._newest(path)
        if doc is None:
            raise NotFoundError(f"no stored file at {path!r}")
        return GridFSReader(self.chunks, doc)

    def remove(self, path: str) -> None:
        docs = list(self.files.find({"filename": path}, {"_id": 1}))
        if not docs:
            raise NotFoundError(f"no stored file at {path!r}")
        for doc in docs:
            self.remove_file(doc["_id"])

    # -- beyond the protocol -------------------------------------------------
    def put_file(self, path: str, reader: BinaryIO, length: int = -1) -> StoredFile:
        """Like put, but return the stored file's description."""
        file_id = ObjectId()
        try:
            digest, total = self._write_chunks(file_id, reader, length)
            expected = -(-total // self.chunk_size)
            upload_date = datetime.datetime.now(datetime.timezone.utc)
            self.files.insert_one(
                {
                    "_id": file_id,
                    "length": total,
                    "chunkSize": self.chunk_size,
                    "uploadDate": upload_date,
                    "filename": path,
                    "metadata": {"blake3": digest},
                }
            )
            # The chunks went at w=1 and the files document at w="majority". If the
            # primary died in between, the driver retried the files document on a new
            # primary that never got the chunks: the write is acknowledged, the chunks
            # are gone. A majority read after the commit point sees exactly what
            # survives a failover, so the file is only returned once it is whole there
            # (and a gc that cut a long upload's chunks is caught the same way).
            found = self._majority_chunks.count_documents({"files_id": file_id})
            if found != expected:
                raise NotDurableError(
                    f"{path!r}: {found} of {expected} chunks are durable after the upload"
                )
        except BaseException:
            self.files.delete_one({"_id": file_id})
            self._delete_chunks(file_id)
            raise
        for old in self.files.find({"filename": path, "_id": {"$ne": file_id}}, {"_id": 1}):
            self.remove_file(old["_id"])
        return StoredFile(file_id, path, total, self.chunk_size, upload_date, digest)

    def stat(self, path: str) -> StoredFile:
        doc = self._newest(path)
        if doc is None:
            raise NotFoundError(f"no stored file at {path!r}")
        return _stored(doc)

    def exists(self, path: str) -> bool:
        return self.files.find_one({"filename": path}, {"_id": 1}) is not None

    def iter_files(self) -> Iterator[StoredFile]:
        """Every stored file, in no particular order (unsorted: no server memory limit)."""
        projection = {"length": 1, "chunkSize": 1, "uploadDate": 1, "filename": 1, "metadata": 1}
        for doc in self.files.find({}, projection):
            yield _stored(doc)

    def file_exists(self, file_id: Any) -> bool:
        return self.files.find_one({"_id": file_id}, {"_id": 1}) is not None

    def totals(self) -> tuple[int, int]:
        """(files, bytes) stored."""
        pipeline = [{"$group": {"_id": None, "n": {"$sum": 1}, "bytes": {"$sum": "$length"}}}]
        for doc in self.files.aggregate(pipeline):
            return int(doc["n"]), int(doc["bytes"])
        return 0, 0

    def remove_file(self, file_id: Any) -> None:
        """Delete one file: the files document first, so it vanishes at once.

        Also removes chunks that have no files document (an interrupted upload).
        """
        self.files.delete_one({"_id": file_id})
        self._delete_chunks(file_id)

    def orphan_chunk_file_ids(self) -> list[Any]:
        """files_id values of chunks whose files document does not exist (files read first)."""
        known = set(self.files.distinct("_id"))
        return [fid for fid in self.chunks.distinct("files_id") if fid not in known]

    def last_write(self, file_id: Any) -> datetime.datetime | None:
        """When chunks of `file_id` were last written; None if unknown.

        Chunks are inserted in `n` order with client-generated ObjectIds, so the
        highest-numbered chunk carries the time of the last batch written.
        """
        times = [_oid_time(file_id)]
        last = self.chunks.find_one({"files_id": file_id}, {"_id": 1}, sort=[("n", -1)])
        if last is not None:
            times.append(_oid_time(last["_id"]))
        known = [t for t in times if t is not None]
        return max(known) if known else None

    def chunk_usage(self, file_id: Any) -> tuple[int, int]:
        """(chunks, bytes) stored for `file_id`."""
        pipeline: list[dict[str, Any]] = [
            {"$match": {"files_id": file_id}},
            {
                "$group": {
                    "_id": None,
                    "n": {"$sum": 1},
                    "bytes": {"$sum": {"$binarySize": "$data"}},
                }
            },
        ]
        try:
            for doc in self.chunks.aggregate(pipeline):
                return int(doc["n"]), int(doc["bytes"])
            return 0, 0
        except OperationFailure:  # no $binarySize (mongomock): count on this side
            sizes = [len(d["data"]) for d in self.chunks.find({"files_id": file_id})]
            return len(sizes), sum(sizes)

    def chunk_problems(self, stored: StoredFile) -> list[str]:
        """What is wrong with a file's chunks (count, indexes, sizes); [] when sound."""
        pipeline = [
            {"$match": {"files_id": stored.file_id}},
            {"$project": {"n": 1, "size": {"$binarySize": "$data"}}},
            {"$sort": {"n": 1}},
        ]
        try:
            sizes = [(int(d["n"]), int(d["size"])) for d in self.chunks.aggregate(pipeline)]
        except OperationFailure:  # no $binarySize (mongomock): measure on this side
            found = self.chunks.find({"files_id": stored.file_id}, sort=[("n", 1)])
            sizes = [(int(d["n"]), len(d["data"])) for d in found]
        return _chunk_problems(stored, sizes)

    # -- internals ------------------------------------------------------------
    def _newest(self, path: str) -> dict[str, Any] | None:
        return self.files.find_one(
            {"filename": path, "metadata.doomed": {"$ne": True}},
            sort=[("uploadDate", DESCENDING), ("_id", DESCENDING)],
        )

    def is_doomed(self, path: str) -> bool:
        return (
            self.files.find_one({"filename": path, "metadata.doomed": True}, {"_id": 1}) is not None
        )

    def mark_doomed(self, path: str) -> bool:
        """Hide a file from new readers before it is deleted; False if there is none.

        Readers that opened it before keep reading; whoever deletes it waits for them.
        """
        done = self.files.update_many({"filename": path}, {"$set": {"metadata.doomed": True}})
        return bool(done.matched_count)

    def _delete_chunks(self, file_id: Any) -> None:
        self.chunks.delete_many({"files_id": file_id})

    def _write_chunks(self, file_id: Any, reader: BinaryIO, length: int) -> tuple[str, int]:
        """Read, hash and insert chunks; up to `writers` batches are in flight at once."""
        hasher = blake3.blake3()
        total = 0
        n = 0
        batch: list[dict[str, Any]] = []
        batch_size = 0
        in_flight: deque[Future[Any]] = deque()
        with ThreadPoolExecutor(self.writers, thread_name_prefix="gridfs-put") as pool:
            try:
                while True:
                    want = self.chunk_size if length < 0 else min(self.chunk_size, length - total)
                    if want <= 0:
                        break
                    data = read_exact(reader, want)
                    if not data:
                        break
                    hasher.update(data)
                    total += len(data)
                    batch.append({"files_id": file_id, "n": n, "data": data})
                    batch_size += len(data)
                    n += 1
                    if batch_size >= self.batch_bytes:
                        if len(in_flight) >= self.writers:
                            in_flight.popleft().result()
                        in_flight.append(pool.submit(self._fast_chunks.insert_many, batch))
                        batch, batch_size = [], 0
                    if len(data) < want:
                        break
                if length >= 0 and total != length:
                    raise LengthMismatchError(
                        f"expected {length} bytes, the input ended after {total}"
                    )
                if batch:
                    in_flight.append(pool.submit(self._fast_chunks.insert_many, batch))
                while in_flight:
                    in_flight.popleft().result()
            finally:
                for future in in_flight:
                    future.exception()  # wait, so cleanup sees every chunk written
        return hasher.hexdigest(), total

    # -- session files: chunks written piecewise, committed later ---------------
    # An upload session (catalog/sessions.py) owns a files_id whose chunks are
    # written as its bytes arrive, possibly by several processes one after the
    # other, and gets its files document only at commit: no second copy.
    def write_session_chunks(
        self,
        file_id: Any,
        first_n: int,
        chunks: list[bytes],
        *,
        replace_first: bool = False,
        expect_first: bytes | None = None,
    ) -> None:
        """Store chunks `first_n`, `first_n + 1`, ... of a session file (w=1).

        replace_first: chunk `first_n` exists already (a partial tail written at an
        earlier checkpoint) and is overwritten. expect_first: what that chunk must
        still hold to be overwritten (StaleWriteError otherwise), so that a writer
        another one has taken over cannot change bytes it no longer owns, even
        when it stalls between checking its claim and writing.
        """
        if not chunks:
            return
        docs = [
            {"files_id": file_id, "n": first_n + i, "data": data} for i, data in enumerate(chunks)
        ]
        if replace_first:
            first = docs.pop(0)
            where: dict[str, Any] = {"files_id": file_id, "n": first_n}
            if expect_first is None:
                self._fast_chunks.replace_one(where, first, upsert=True)
            else:
                stored = {**where, "data": expect_first}
                if not self._fast_chunks.replace_one(stored, first).matched_count:
                    raise StaleWriteError(
                        f"session file {file_id}: chunk {first_n} changed since it was stored"
                    )
        if docs:
            self._fast_chunks.insert_many(docs, ordered=True)

    def truncate_session_chunks(self, file_id: Any, length: int, *, tidy: bool = False) -> bytes:
        """Cut a session file back to `length` bytes; return its partial tail chunk.

        Chunks past `length` (written after the last checkpoint by a writer that
        died) are deleted; the chunk holding the tail is cut to size. tidy: the
        last checkpoint found exactly `length` bytes and nobody wrote since, so
        only the tail is read. Writes at w=1: the next checkpoint confirms them.
        """
        tail_n, tail_len = divmod(length, self.chunk_size)
        if not tidy:
            self._fast_chunks.delete_many(
                {"files_id": file_id, "n": {"$gte": tail_n if tail_len == 0 else tail_n + 1}}
            )
        if tail_len == 0:
            return b""
        doc = self.chunks.find_one({"files_id": file_id, "n": tail_n})
        data = bytes(doc["data"]) if doc is not None else b""
        if len(data) < tail_len:
            raise CorruptFileError(
                f"session file {file_id}: chunk {tail_n} has {len(data)} bytes, "
                f"expected at least {tail_len}"
            )
        if len(data) != tail_len:
            data = data[:tail_len]
            self._fast_chunks.update_one(
                {"files_id": file_id, "n": tail_n}, {"$set": {"data": data}}
            )
        return data

    def session_chunks_durable(self, file_id: Any, length: int, *, since: int = 0) -> bool:
        """Whether a majority read sees exactly the chunks of `length` bytes.

        Call after a majority write that follows the chunk writes (the session
        checkpoint), as put_file does after its files document. since: bytes
        confirmed by an earlier check; only the chunks after them are counted.
        """
        expected = -(-length // self.chunk_size)
        first = min(since // self.chunk_size, expected)
        want = length - (expected - 1) * self.chunk_size if expected else 0
        if expected - first <= 16:
            # The few chunks since the last check (just written: in cache): their sizes.
            sizes = self._chunk_sizes({"files_id": file_id, "n": {"$gte": first}})
            return sizes == {
                n: want if n == expected - 1 else self.chunk_size for n in range(first, expected)
            }
        # Index-only count, then one chunk's size (never the other chunks' data).
        found = self._majority_chunks.count_documents({"files_id": file_id, "n": {"$gte": first}})
        if found != expected - first:
            return False
        last = self._chunk_sizes({"files_id": file_id, "n": expected - 1})
        return last == {expected - 1: want}

    def _chunk_sizes(self, query: dict[str, Any]) -> dict[int, int]:
        """n -> size of the chunks matching `query`, read at majority, without their data."""
        try:
            found = self._majority_chunks.find(
                query, {"_id": 0, "n": 1, "size": {"$binarySize": "$data"}}
            )
            return {int(doc["n"]): int(doc["size"]) for doc in found}
        except (OperationFailure, ValueError):  # no $binarySize (mongomock): measure here
            found = self._majority_chunks.find(query, {"_id": 0, "n": 1, "data": 1})
            return {int(doc["n"]): len(doc["data"]) for doc in found}

    def iter_session_chunks(self, file_id: Any) -> Iterator[bytes]:
        """The chunks of a session file in order, read at majority."""
        cursor = self._majority_chunks.find(
            {"files_id": file_id}, {"data": 1, "n": 1}, sort=[("n", 1)]
        )
        for expected, doc in enumerate(cursor):
            if doc["n"] != expected:
                raise CorruptFileError(f"session file {file_id}: chunk {expected} is missing")
            yield bytes(doc["data"])

    def commit_session_file(self, file_id: Any, path: str, length: int, digest: str) -> StoredFile:
        """Give a session's chunks their files document at `path`: the file is then stored.

        Same rule as put_file: the files document at w="majority", then a majority
        read must find every chunk, else the files document goes and this raises
        (the chunks stay with their session).
        """
        upload_date = datetime.datetime.now(datetime.timezone.utc)
        self.files.insert_one(
            {
                "_id": file_id,
                "length": length,
                "chunkSize": self.chunk_size,
                "uploadDate": upload_date,
                "filename": path,
                "metadata": {"blake3": digest},
            }
        )
        if not self.session_chunks_durable(file_id, length):
            self.files.delete_one({"_id": file_id})
            raise NotDurableError(f"{path!r}: the session's chunks are not all durable")
        return StoredFile(file_id, path, length, self.chunk_size, upload_date, digest)

    def session_file(self, file_id: Any) -> StoredFile | None:
        """The stored file a session's chunks became (commit_session_file), if they did."""
        doc = self.files.find_one({"_id": file_id})
        return None if doc is None else self._stored(doc)

    def session_files(self, file_ids: list[Any]) -> list[StoredFile]:
        """`session_file` of many sessions: those whose chunks became stored files."""
        return [self._stored(doc) for doc in self.files.find({"_id": {"$in": file_ids}})]

    def _stored(self, doc: dict[str, Any]) -> StoredFile:
        return StoredFile(
            doc["_id"],
            str(doc.get("filename", "")),
            int(doc["length"]),
            int(doc.get("chunkSize", self.chunk_size)),
            doc.get("uploadDate") or datetime.datetime.now(datetime.timezone.utc),
            (doc.get("metadata") or {}).get("blake3"),
        )

    def discard_session_chunks(self, file_id: Any) -> None:
        """Delete a session's chunks, unless they became a stored file meanwhile."""
        if not self.file_exists(file_id):
            self._delete_chunks(file_id)


def _majority_read(db: Database[Any]) -> ReadConcern:
    """Majority reads where the server has them (mongomock has no read concerns)."""
    if type(db.client).__module__.startswith("mongomock"):
        return ReadConcern()
    return ReadConcern("majority")


def _oid_time(value: Any) -> datetime.datetime | None:
    if isinstance(value, ObjectId):
        return value.generation_time
    return None


def _chunk_problems(stored: StoredFile, sizes: list[tuple[int, int]]) -> list[str]:
    """Check (n, size) pairs, in n order, against a file's length and chunk size."""
    expected_n = -(-stored.length // stored.chunk_size) if stored.length else 0
    problems: list[str] = []
    seen = 0
    for n, size in sizes:
        last = n == expected_n - 1
        want = stored.length - n * stored.chunk_size if last else stored.chunk_size
        if n != seen:
            problems.append(f"chunk {seen} missing")
            seen = n
        if n >= expected_n:
            problems.append(f"unexpected chunk {n}")
        elif size != want:
            problems.append(f"chunk {n} has {size} bytes, expected {want}")
        seen += 1
    if seen < expected_n:
        problems.append(f"chunks {seen}..{expected_n - 1} missing")
    return problems


def _stored(doc: dict[str, Any]) -> StoredFile:
    upload_date = doc.get("uploadDate") or datetime.datetime.fromtimestamp(0, datetime.timezone.utc)
    if upload_date.tzinfo is None:
        upload_date = upload_date.replace(tzinfo=datetime.timezone.utc)
    return StoredFile(
        doc["_id"],
        doc.get("filename", ""),
        int(doc.get("length", 0)),
        int(doc.get("chunkSize", 0) or 0),
        upload_date,
        (doc.get("metadata") or {}).get("blake3"),
    )
