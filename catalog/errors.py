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
    """A read or write offset that cannot be used (negative, or past the end)."""

    code = "invalid_offset"

    def __init__(self, *args: object, path: str = "", offset: int = 0) -> None:
        super().__init__(*args)
        self.path = path
        self.offset = offset


class OffsetMismatchError(CatalogError):
    """An upload session append at an offset other than the session's length so far."""

    code = "offset_mismatch"

    def __init__(self, *args: object, offset: int = 0, expected: int = 0) -> None:
        super().__init__(*args)
        self.offset = offset
        self.expected = expected


__all__ = [
    "AlreadyExistsError",
    "BadRequestError",
    "CatalogError",
    "ForbiddenError",
    "HashMismatchError",
    "InvalidOffsetError",
    "InvalidPathError",
    "LengthMismatchError",
    "NotFoundError",
    "OffsetMismatchError",
    "PreconditionFailedError",
    "RequestExpiredError",
    "ResourceDeletedError",
    "ResponseMismatchError",
    "TooLargeError",
    "UnauthorizedError",
    "UploadPendingError",
]
