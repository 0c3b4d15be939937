"""Errors raised by every rescat layer.

Every public one is importable from here (the root and the errors the byte
store raises are defined in `storage.errors`, the bottom layer, and
re-exported), so that storage, catalog, service and CLI speak the same
language: the HTTP service maps each class to a status and code, and the
client maps the code back to the class, so a caller sees the same exception
whether it talks to MongoDB directly or over HTTP.
"""

from __future__ import annotations

# The root and the errors the byte store raises live in storage (the bottom layer).
from storage.errors import CatalogError, LengthMismatchError, NotFoundError


class UploadPendingError(CatalogError):
    """The content is being uploaded and is not readable yet."""

    code = "upload_pending"


class AlreadyExistsError(CatalogError):
    """A path is already recorded for the resource."""

    code = "already_exists"


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


__all__ = [
    "AlreadyExistsError",
    "BadRequestError",
    "CatalogError",
    "ForbiddenError",
    "HashMismatchError",
    "InvalidPathError",
    "LengthMismatchError",
    "NotFoundError",
    "PreconditionFailedError",
    "RequestExpiredError",
    "ResourceDeletedError",
    "ResponseMismatchError",
    "TooLargeError",
    "UnauthorizedError",
    "UploadPendingError",
]
