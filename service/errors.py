"""Error codes <-> HTTP statuses <-> `catalog.errors` classes, both ways.

The server turns an exception into `{"error": {"code", "message"}}` with the
status below; the client turns the code back into the same class, so callers
see the same exception over HTTP as in-process.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import catalog.errors as errors
from catalog.errors import CatalogError

# code -> status. Codes not in catalog.errors are the service's own.
STATUS_BY_CODE: dict[str, int] = {
    "bad_request": 400,
    "invalid_path": 400,
    "length_mismatch": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "response_mismatch": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "upload_pending": 409,
    "already_exists": 409,
    "request_expired": 410,
    "resource_deleted": 410,
    "precondition_failed": 412,
    "too_large": 413,
    "unsupported_encoding": 415,
    "range_not_satisfiable": 416,
    "too_many_requests": 429,
    "hash_mismatch": 422,
    "internal_error": 500,
    "corrupt_file": 500,  # stored bytes are damaged: the server's problem (fsck, gc repair)
    "unavailable": 503,
    "not_durable": 503,  # a failover rolled back bytes just written: try again
    "invalid_argument": 400,
    "invalid_offset": 400,
    "offset_mismatch": 409,
    "no_transaction": 400,
    "key_modified": 409,
    "cannot_lock": 409,
    "failed_precondition": 409,
    "write_conflict": 409,
}


def _subclasses(cls: type[CatalogError]) -> list[type[CatalogError]]:
    out: list[type[CatalogError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def error_classes() -> dict[str, type[CatalogError]]:
    """code -> class, for every error class in catalog.errors."""
    table: dict[str, type[CatalogError]] = {}
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, CatalogError):
            table.setdefault(cls.code, cls)
    return table


class ServiceError(CatalogError):
    """An HTTP error whose code has no class of its own (or a non-JSON error)."""

    code = "service_error"

    def __init__(self, message: str, *, status: int = 0, code: str = "service_error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class MethodNotAllowedError(CatalogError):
    code = "method_not_allowed"


class RequestTimeoutError(CatalogError):
    code = "request_timeout"


class RangeNotSatisfiableError(CatalogError):
    code = "range_not_satisfiable"


class UnsupportedEncodingError(CatalogError):
    """A body in a content coding the service would store as if it were the content (415)."""

    code = "unsupported_encoding"


class UnavailableError(CatalogError):
    """The database does not answer (503): nothing the client sent is at fault."""

    code = "unavailable"


class InternalError(CatalogError):
    """A bug (500); logged with its traceback, never caused by what a client sends."""

    code = "internal_error"


E = TypeVar("E", bound=CatalogError)


def with_headers(exc: E, headers: dict[str, str]) -> E:
    """Attach response headers to an error (Allow, WWW-Authenticate, Content-Range)."""
    exc.headers = headers  # type: ignore[attr-defined]
    return exc


def headers_of(exc: CatalogError) -> dict[str, str]:
    return dict(getattr(exc, "headers", {}))


def status_for(exc: CatalogError) -> int:
    return STATUS_BY_CODE.get(exc.code, 500 if not isinstance(exc, ValueError) else 400)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def exception_from(status: int, body: bytes, fallback: str = "") -> CatalogError:
    """The exception for an HTTP error response (client side)."""
    code, message = "", ""
    try:
        doc: Any = json.loads(body)
        code = str(doc["error"]["code"])
        message = str(doc["error"].get("message", ""))
    except (ValueError, KeyError, TypeError):
        pass
    message = message or fallback or f"HTTP {status}"
    cls = error_classes().get(code)
    if cls is not None:
        return cls(message)
    return ServiceError(message, status=status, code=code or "service_error")
