"""catalog: hashes, references, environments and proofs of access.

Bytes are the storage layer's business; this package decides which bytes a
path means, how many paths share them, and who may claim them.
"""

from catalog.connect import connect
from catalog.environment import Environment
from catalog.errors import (
    AlreadyExistsError,
    BadRequestError,
    CatalogError,
    ForbiddenError,
    HashMismatchError,
    InvalidOffsetError,
    InvalidPathError,
    LengthMismatchError,
    NotFoundError,
    OffsetMismatchError,
    PreconditionFailedError,
    RequestExpiredError,
    ResourceDeletedError,
    ResponseMismatchError,
    TooLargeError,
    UnauthorizedError,
    UploadPendingError,
)
from catalog.managed import ManagedStorage, PathInfo
from catalog.proof import PutResponse, RequestResponse, new_put_response
from catalog.resources import Resource, ResourceCatalog

__all__ = [
    "AlreadyExistsError",
    "BadRequestError",
    "CatalogError",
    "Environment",
    "ForbiddenError",
    "HashMismatchError",
    "InvalidOffsetError",
    "InvalidPathError",
    "LengthMismatchError",
    "ManagedStorage",
    "NotFoundError",
    "OffsetMismatchError",
    "PathInfo",
    "PreconditionFailedError",
    "PutResponse",
    "RequestExpiredError",
    "RequestResponse",
    "Resource",
    "ResourceCatalog",
    "ResourceDeletedError",
    "ResponseMismatchError",
    "TooLargeError",
    "UnauthorizedError",
    "UploadPendingError",
    "connect",
    "new_put_response",
]
