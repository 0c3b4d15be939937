"""storage: bytes only. Knows nothing of hashes as identities, references or environments."""

from storage.gridfs_storage import GridFSStorage, StoredFile
from storage.protocol import ResourceStorage
from storage.reader import CorruptFileError, GridFSReader, NotDurableError

__all__ = [
    "CorruptFileError",
    "GridFSReader",
    "GridFSStorage",
    "NotDurableError",
    "ResourceStorage",
    "StoredFile",
]
