"""catalog: hashes, references, environments and proofs of access.

Bytes are the storage layer's business; this package decides which bytes a
path means, how many paths share them, and who may claim them.
"""

from catalog.connect import connect
from catalog.environment import Environment
from catalog.errors import (
    AlreadyExistsError,
    BadRequestError,
    CannotLockError,
    CatalogError,
    FailedPreconditionError,
    ForbiddenError,
    HashMismatchError,
    InvalidArgumentError,
    InvalidOffsetError,
    InvalidPathError,
    KeyModifiedError,
    LengthMismatchError,
    NotFoundError,
    NoTransactionError,
    PreconditionFailedError,
    RequestExpiredError,
    ResourceDeletedError,
    ResponseMismatchError,
    TooLargeError,
    UnauthorizedError,
    UploadPendingError,
    WriteConflictError,
)
from catalog.managed import ManagedStorage, PathInfo
from catalog.proof import PutResponse, RequestResponse, new_put_response
from catalog.resources import Resource, ResourceCatalog

__all__ = [
    "AlreadyExistsError",
    "BadRequestError",
    "CannotLockError",
    "CatalogError",
    "Environment",
    "FailedPreconditionError",
    "ForbiddenError",
    "HashMismatchError",
    "InvalidArgumentError",
    "InvalidOffsetError",
    "InvalidPathError",
    "KeyModifiedError",
    "LengthMismatchError",
    "ManagedStorage",
    "NoTransactionError",
    "NotFoundError",
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
    "WriteConflictError",
    "connect",
    "new_put_response",
]
