"""Errors raised by every rescat layer.

They live in one module so that storage, catalog, service and CLI speak the
same language: the HTTP service maps each class to a status and code, and the
client maps the code back to the class, so a caller sees the same exception
whether it talks to MongoDB directly or over HTTP.
"""

from __future__ import annotations


class CatalogError(Exception):
    """Base of every rescat error."""

    code = "catalog_error"


class NotFoundError(CatalogError, KeyError):
    """No such resource, path, hash or stored file."""

    code = "not_found"

    def __init__(self, *args: object, path: str = "") -> None:
        super().__init__(*args)
        self.path = path

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else "not found"


class UploadPendingError(CatalogError):
    """The content is being uploaded and is not readable yet."""

    code = "upload_pending"


class AlreadyExistsError(CatalogError):
    """A path is already recorded for the resource."""

    code = "already_exists"


class LengthMismatchError(CatalogError):
    """The content is not the length that was declared."""

    code = "length_mismatch"


class HashMismatchError(CatalogError):
    """The content does not hash to the value that was declared."""

    code = "hash_mismatch"


class InvalidPathError(CatalogError, ValueError):
    """An environment id, path or hash is malformed."""

    code = "invalid_path"


class RequestExpiredError(CatalogError):
    """A proof-of-access request is unknown, malformed, used or expired."""

    code = "request_expired"


class ResponseMismatchError(CatalogError):
    """A proof-of-access checksum is wrong."""

    code = "response_mismatch"


class ResourceDeletedError(CatalogError):
    """The content a request was made for has been deleted since."""

    code = "resource_deleted"


class BadRequestError(CatalogError, ValueError):
    """A malformed hash, header, body or argument (not a path)."""

    code = "bad_request"


class UnauthorizedError(CatalogError):
    """No valid token was presented."""

    code = "unauthorized"


class ForbiddenError(CatalogError):
    """The token does not grant access to this environment."""

    code = "forbidden"


class TooLargeError(CatalogError):
    """The content is larger than the service accepts."""

    code = "too_large"


class PreconditionFailedError(CatalogError):
    """A conditional request's precondition did not hold."""

    code = "precondition_failed"


class InvalidOffsetError(CatalogError, ValueError):
    """A read or write offset is negative or past the end of the file."""

    code = "invalid_offset"

    def __init__(self, *args: object, path: str = "", offset: int = 0) -> None:
        # Both InvalidOffsetError(path, offset) and InvalidOffsetError(message,
        # path=..., offset=...) work: the HTTP client rebuilds errors from a
        # message alone, so a single positional argument must stay valid.
        if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], int):
            path, offset = args[0], args[1]
            args = (f"invalid offset {offset} for {path!r}",)
        super().__init__(*args)
        self.path = path
        self.offset = offset


class KeyModifiedError(CatalogError):
    """A compare-and-swap lost: the key changed (or went away) since it was read."""

    code = "key_modified"


class CannotLockError(CatalogError):
    """A lock is held by someone else, or a lock we held has been lost."""

    code = "cannot_lock"


class FailedPreconditionError(CatalogError):
    """The target is in the wrong state for the call (e.g. committed, not active)."""

    code = "failed_precondition"


class InvalidArgumentError(CatalogError, ValueError):
    """An argument is malformed or names something of the wrong kind."""

    code = "invalid_argument"


class NoTransactionError(CatalogError):
    """The call needs an open (and, for writes, writable) transaction."""

    code = "no_transaction"


class WriteConflictError(CatalogError):
    """A concurrent transaction won a write conflict; this one changed nothing.

    Retrying the whole transaction from its start is safe.
    """

    code = "write_conflict"


__all__ = [
    "AlreadyExistsError",
    "BadRequestError",
    "CannotLockError",
    "CatalogError",
    "FailedPreconditionError",
    "ForbiddenError",
    "HashMismatchError",
    "InvalidArgumentError",
    "InvalidOffsetError",
    "InvalidPathError",
    "KeyModifiedError",
    "LengthMismatchError",
    "NoTransactionError",
    "NotFoundError",
    "PreconditionFailedError",
    "RequestExpiredError",
    "ResourceDeletedError",
    "ResponseMismatchError",
    "TooLargeError",
    "UnauthorizedError",
    "UploadPendingError",
    "WriteConflictError",
]
