"""The OpenAPI 3.1 document served at /openapi.json (written by hand, kept small)."""

from __future__ import annotations

from typing import Any

_ERROR_CODES = [
    "not_found",
    "upload_pending",
    "hash_mismatch",
    "invalid_path",
    "bad_request",
    "request_expired",
    "resource_deleted",
    "response_mismatch",
    "forbidden",
    "unauthorized",
    "too_large",
    "precondition_failed",
    "method_not_allowed",
    "range_not_satisfiable",
    "request_timeout",
    "length_mismatch",
]


def _err(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json(description: str, ref: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


_ENV = {
    "name": "env",
    "in": "path",
    "required": True,
    "description": "Environment id: 1-128 chars of [A-Za-z0-9._-], not '.' or '..'.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
}
_PATH = {
    "name": "path",
    "in": "path",
    "required": True,
    "description": "Resource path: 1-1024 bytes of UTF-8, '/'-separated, no empty, '.' or "
    "'..' segment, no control characters. Each segment percent-encoded.",
    "schema": {"type": "string"},
}
_COMMON = {
    "400": _err("invalid_path or bad_request"),
    "401": _err("unauthorized: no or unknown token"),
    "403": _err("forbidden: the token is for another environment"),
}
_OBJECT_HEADERS = {
    "ETag": {"schema": {"type": "string"}, "description": '"blake3:<hex>"'},
    "Content-Length": {"schema": {"type": "integer"}},
    "Accept-Ranges": {"schema": {"type": "string", "const": "bytes"}},
}


def openapi_document(max_size: int | None = None) -> dict[str, Any]:
    limit = f" The service accepts at most {max_size} bytes." if max_size is not None else ""
    get_op = {
        "summary": "Read a resource's bytes (streamed)",
        "parameters": [
            _ENV,
            _PATH,
            {"name": "Range", "in": "header", "schema": {"type": "string"}},
            {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
            {"name": "If-Match", "in": "header", "schema": {"type": "string"}},
            {"name": "If-Range", "in": "header", "schema": {"type": "string"}},
        ],
        "responses": {
            "200": {
                "description": "The content",
                "headers": _OBJECT_HEADERS,
                "content": {"application/octet-stream": {}},
            },
            "206": {"description": "One byte range (Range: bytes=a-b, a-, -n)"},
            "304": {"description": "If-None-Match matched"},
            **_COMMON,
            "404": _err("not_found"),
            "412": _err("precondition_failed (If-Match)"),
            "416": _err("range_not_satisfiable; Content-Range: bytes */<size>"),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rescat",
            "version": "1",
            "description": "Content-addressed, reference-counted resource catalog. Every /v1 "
            "route needs `Authorization: Bearer <token>` unless the service runs with "
            '--no-auth. Errors are JSON: {"error": {"code", "message"}}.',
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string", "enum": _ERROR_CODES},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "Resource": {
                    "type": "object",
                    "required": ["path", "hash", "length"],
                    "properties": {
                        "path": {"type": "string"},
                        "hash": {"type": "string", "description": "BLAKE3 hex"},
                        "length": {"type": "integer", "minimum": 0},
                    },
                },
                "Listing": {
                    "type": "object",
                    "properties": {
                        "items": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Resource"},
                        }
                    },
                },
                "PutRequest": {
                    "type": "object",
                    "required": ["path", "hash"],
                    "properties": {
                        "path": {"type": "string"},
                        "hash": {"type": "string", "description": "hex or blake3:<hex>"},
                    },
                },
                "Challenge": {
                    "type": "object",
                    "properties": {
                        "request_id": {"type": "string"},
                        "ranges": {
                            "type": "array",
                            "description": "[start, length] pairs; answer with BLAKE3 of "
                            "their bytes concatenated in this order",
                            "items": {
                                "type": "array",
                                "items": {"type": "integer"},
                                "minItems": 2,
                                "maxItems": 2,
                            },
                        },
                        "expires_at": {"type": "string", "format": "date-time"},
                    },
                },
                "Answer": {
                    "type": "object",
                    "required": ["checksum"],
                    "properties": {"checksum": {"type": "string"}},
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {
                "get": {
                    "summary": "Liveness and database reachability (no auth)",
                    "security": [],
                    "responses": {"200": {"description": "ok"}, "503": _err("database down")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (no auth)",
                    "security": [],
                    "responses": {"200": {"description": "text exposition format"}},
                }
            },
            "/v1/environments/{env}/resources/{path}": {
                "put": {
                    "summary": "Store a resource (body streamed; Content-Length or chunked)."
                    + limit,
                    "parameters": [
                        _ENV,
                        _PATH,
                        {
                            "name": "X-Content-Hash",
                            "in": "header",
                            "description": "blake3:<hex>; 422 and nothing stored on mismatch",
                            "schema": {"type": "string"},
                        },
                        {"name": "If-Match", "in": "header", "schema": {"type": "string"}},
                        {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}},
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/octet-stream": {}},
                    },
                    "responses": {
                        "201": _json("Stored (also when it replaced the path)", "Resource"),
                        **_COMMON,
                        "412": _err("precondition_failed"),
                        "413": _err("too_large"),
                        "422": _err("hash_mismatch"),
                    },
                },
                "get": get_op,
                "head": {**get_op, "summary": "Headers of GET, no body"},
                "delete": {
                    "summary": "Remove a path (its content goes with its last reference)",
                    "parameters": [_ENV, _PATH],
                    "responses": {
                        "204": {"description": "Removed"},
                        **_COMMON,
                        "404": _err("not_found"),
                        "412": _err("precondition_failed (If-Match)"),
                    },
                },
            },
            "/v1/environments/{env}/resources": {
                "get": {
                    "summary": "List paths, sorted; prefix is a plain string prefix",
                    "parameters": [
                        _ENV,
                        {"name": "prefix", "in": "query", "schema": {"type": "string"}},
                    ],
                    "responses": {"200": _json("The paths", "Listing"), **_COMMON},
                }
            },
            "/v1/environments/{env}/put-requests": {
                "post": {
                    "summary": "Ask to create a path to content the service has (dedup)",
                    "parameters": [_ENV],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/PutRequest"}
                            }
                        },
                    },
                    "responses": {
                        "201": _json("A proof-of-access challenge", "Challenge"),
                        **_COMMON,
                        "404": _err("not_found: unknown content; upload it"),
                        "409": _err("upload_pending: the content is being uploaded"),
                    },
                }
            },
            "/v1/environments/{env}/put-requests/{request_id}/response": {
                "post": {
                    "summary": "Answer a challenge; any answer consumes the request",
                    "parameters": [
                        _ENV,
                        {
                            "name": "request_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Answer"}}
                        },
                    },
                    "responses": {
                        "201": _json("The path now points at the content", "Resource"),
                        **_COMMON,
                        "403": _err("response_mismatch or forbidden"),
                        "410": _err("request_expired or resource_deleted"),
                    },
                }
            },
        },
    }
