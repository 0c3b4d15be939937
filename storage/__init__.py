"""storage: bytes only. Knows nothing of hashes as identities, references or environments."""

from storage.gridfs_storage import GridFSStorage, StoredFile
from storage.protocol import ResourceStorage
from storage.reader import CorruptFileError, GridFSReader

__all__ = ["CorruptFileError", "GridFSReader", "GridFSStorage", "ResourceStorage", "StoredFile"]
