"""The OpenAPI document, generated from the route table (served at /openapi.json).

Every operation lists every status it can answer: its own successes, the
errors its handler declares, and the errors that follow from its declaration
(an invalid parameter, a missing or foreign token, a malformed JSON body, the
database being down). Each error answer carries the error body schema with
its codes narrowed to the ones that status can have on that route, so a
client (and schemathesis) can hold the service to them.

OpenAPI 3.0.3 rather than 3.1: the Swagger UI shipped for /docs (from the
`swagger-ui-bundle` wheel) renders 3.0; nothing here needs 3.1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter

from service.errors import STATUS_BY_CODE
from service.routing import Answer, Endpoint, Param
from service.schemas import ENV_RULE, HASH_RULE, PATH_RULE, PREFIX_RULE

# What each error code means, for the document.
ERROR_TEXT: dict[str, str] = {
    "invalid_path": "an invalid environment id, path or prefix (however encoded)",
    "bad_request": "a malformed JSON body, hash or header",
    "length_mismatch": "the body is not the length it declared",
    "unauthorized": "no token, or an unknown or revoked one",
    "forbidden": "the token is for another environment",
    "response_mismatch": "the checksum does not match the content",
    "not_found": "no such path, content or file",
    "request_timeout": "the body stalled past the read timeout",
    "upload_pending": "the content is still being uploaded",
    "request_expired": "unknown, malformed, used or expired request (or another environment's)",
    "resource_deleted": "the content was deleted since the request",
    "precondition_failed": "If-Match / If-None-Match did not hold",
    "too_large": "the body is larger than the service accepts",
    "range_not_satisfiable": "the range lies outside the content",
    "hash_mismatch": "the body does not hash to X-Content-Hash; nothing was stored",
    "unavailable": "the database does not answer",
    "already_exists": "the name exists already",
}
# Codes a client can see (internal_error is a bug, never an answer to input).
PUBLIC_CODES = sorted(code for code in STATUS_BY_CODE if code != "internal_error")

RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "ETag": {
        "description": 'The content\'s hash: `"blake3:<hex>"`',
        "schema": {"type": "string", "pattern": '^"blake3:[0-9a-f]{64}"$'},
    },
    "X-Revision": {
        "description": 'The path\'s revision: it grows on every change (`If-Match: "<n>"`)',
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "Content-Length": {"schema": {"type": "string", "pattern": "^[0-9]+$"}},
    "Last-Modified": {
        "description": "When the path last changed (an HTTP-date, whole seconds)",
        "schema": {"type": "string"},
    },
    "Accept-Ranges": {"schema": {"type": "string", "enum": ["bytes"]}},
    "Content-Range": {
        "description": "`bytes a-b/size` (206) or `bytes */size` (416)",
        "schema": {"type": "string", "pattern": r"^bytes (?:[0-9]+-[0-9]+|\*)/[0-9]+$"},
    },
    "WWW-Authenticate": {"schema": {"type": "string", "pattern": "^Bearer "}},
}


_BINARY = {"type": "string", "format": "binary"}


def openapi_document(
    routes: Sequence[Endpoint[Any]], *, auth: bool = True, max_size: int | None = None
) -> dict[str, Any]:
    """The document for a service with these routes, token checks on or off, and size limit."""
    components: dict[str, Any] = {"Error": _error_schema(PUBLIC_CODES)}
    errors: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in routes:
        item = paths.setdefault(endpoint.path_format, {})
        for method in endpoint.methods:
            op = _operation(endpoint, method, auth, max_size, components, errors)
            item[method.lower()] = op
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "rescat", "version": "1", "description": _INFO},
        "tags": [
            {"name": "resources", "description": "Paths of an environment and their bytes"},
            {"name": "proof of access", "description": "New paths to content without uploading"},
            {"name": "service", "description": "Health, metrics and documentation"},
        ],
        "paths": paths,
        "components": {"schemas": components, "responses": dict(sorted(errors.items()))},
    }
    if auth:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc


_INFO = f"""Content-addressed, reference-counted resource catalog.

* Environment ids: {ENV_RULE}.
* Paths: {PATH_RULE}. Each segment of the URL is percent-decoded on its own (`%2F` is a
  separator like `/`). Every invalid id or path answers 400 `invalid_path`, however encoded.
* Prefixes: {PREFIX_RULE}.
* Hashes: {HASH_RULE}; answers carry bare lowercase hex, ETags `"blake3:<hex>"`.
* Every `/v1` route needs `Authorization: Bearer <token>` unless the service runs with
  `--no-auth`; a token for one environment gets 403 `forbidden` on another.
* Errors are JSON: `{{"error": {{"code", "message"}}}}`, with the code also in the
  `X-Rescat-Error` header (for HEAD). An unknown route is 404 `not_found`, a method a
  route does not have 405 `method_not_allowed` (with `Allow`).
"""


def _operation(
    endpoint: Endpoint[Any],
    method: str,
    auth: bool,
    max_size: int | None,
    components: dict[str, Any],
    errors: dict[str, Any],
) -> dict[str, Any]:
    head = method == "HEAD"
    params = [*endpoint.path_params, *endpoint.query, *endpoint.headers]
    description = endpoint.description
    if endpoint.raw_body and max_size is not None:
        description = f"{description} The service accepts at most {max_size} bytes.".strip()
    op: dict[str, Any] = {
        "tags": [endpoint.tag],
        "summary": endpoint.summary + (" (headers only)" if head else ""),
        "operationId": endpoint.name + ("_head" if head else ""),
        "parameters": [_parameter(p) for p in params],
        "responses": {},
    }
    if description:
        op["description"] = description
    needs_token = auth and endpoint.auth
    if not needs_token:
        op["security"] = []
    if endpoint.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(endpoint.body, components)}},
        }
    elif endpoint.raw_body:
        op["requestBody"] = {  # optional: no body is empty content
            "description": endpoint.raw_body,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    responses: dict[str, Any] = op["responses"]
    for answer in endpoint.answers:
        responses[str(answer.status)] = _answer(answer, head, components)
    for status, codes in sorted(_error_codes(endpoint, params, needs_token).items()):
        # Shared by every operation with the same codes at that status.
        name = "-".join([str(status), *codes]) + ("-head" if head else "")
        errors.setdefault(name, _error_response(status, codes, head))
        responses[str(status)] = {"$ref": f"#/components/responses/{name}"}
    return op


def _error_codes(
    endpoint: Endpoint[Any], params: Sequence[Param], needs_token: bool
) -> dict[int, list[str]]:
    codes = set(endpoint.errors)
    codes.update(p.error for p in params if p.error)
    if needs_token:
        codes.add("unauthorized")
        if any(p.name == "env" for p in endpoint.path_params):
            codes.add("forbidden")
    if endpoint.body is not None:
        codes.update(("bad_request", "too_large"))
    if endpoint.database:
        codes.add("unavailable")
    by_status: dict[int, list[str]] = {}
    for code in sorted(codes):
        by_status.setdefault(STATUS_BY_CODE[code], []).append(code)
    return by_status


def _parameter(param: Param) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": param.name,
        "in": param.where,
        "description": param.description,
        "schema": param.schema,
    }
    if param.required or param.where == "path":
        out["required"] = True
    return out


def _answer(answer: Answer, head: bool, components: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": answer.description}
    if answer.headers:
        out["headers"] = {
            name: {**RESPONSE_HEADERS[name], "required": True} for name in answer.headers
        }
    if head:
        return out
    if answer.json is not None:
        out["content"] = {"application/json": {"schema": _ref(answer.json, components)}}
    elif answer.media:
        out["content"] = {media: {} for media in answer.media}
    return out


def _error_response(status: int, codes: list[str], head: bool) -> dict[str, Any]:
    text = "; ".join(f"`{code}`: {ERROR_TEXT.get(code, code)}" for code in codes)
    headers: dict[str, Any] = {
        "X-Rescat-Error": {
            "description": "The error code (also for HEAD, whose answers have no body)",
            "required": True,
            "schema": {"type": "string", "enum": codes},
        }
    }
    if status == 401:
        headers["WWW-Authenticate"] = {**RESPONSE_HEADERS["WWW-Authenticate"], "required": True}
    if status == 416:
        headers["Content-Range"] = {**RESPONSE_HEADERS["Content-Range"], "required": True}
    out: dict[str, Any] = {"description": text, "headers": headers}
    if not head:
        narrowed = {
            "type": "object",
            "properties": {"error": {"type": "object", "properties": {"code": {"enum": codes}}}},
        }
        schema = {"allOf": [{"$ref": "#/components/schemas/Error"}, narrowed]}
        out["content"] = {"application/json": {"schema": schema}}
    return out


def _error_schema(codes: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "description": 'Every error: `{"error": {"code", "message"}}`',
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": codes},
                    "message": {"type": "string"},
                },
            }
        },
    }


def _ref(model: Any, components: dict[str, Any]) -> dict[str, Any]:
    """Register the JSON schema of a model or TypedDict (and what it uses) as components."""
    schema = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")
    for name, sub in schema.pop("$defs", {}).items():
        components.setdefault(name, sub)
    name = schema.get("title", model.__name__)
    components.setdefault(name, schema)
    return {"$ref": f"#/components/schemas/{name}"}
