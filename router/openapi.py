"""The router's OpenAPI document: FastAPI's generated one plus `POST /v1/chat/completions`.

The chat endpoint is a raw ASGI handler (router/app.py), so FastAPI does not know it; its request and
responses are written down here: the request by hand, from what router/edge.py accepts; the error
answers from router/errors.py's codes, so a new code is documented (and an unknown one cannot be).
The request schema describes what the edge checks; everything else in the body (tools, logprobs, ...)
is allowed and forwarded to the replica unchanged, so objects stay open (`additionalProperties`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from router.edge import MAX_N, MAX_STOP
from router.errors import (
    CODES,
    BatchStoreUnavailable,
    Conflict,
    ErrorCode,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NoHealthyReplica,
    NotFound,
    Overloaded,
    PermissionDenied,
    QuotaUnavailable,
    RateLimited,
    RequestTooLarge,
    RolloutStoreUnavailable,
    RouterError,
    StreamInterrupted,
    Unauthenticated,
    UpstreamTimeout,
    UpstreamUnavailable,
)

CHAT_PATH = "/v1/chat/completions"
BEARER = "bearerAuth"
ERROR_SCHEMA = "ErrorResponse"
_ERROR_REF = {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}

# What each error class means, as the document says it; the codes come from router/errors.py's CODES.
_MEANING: dict[type[RouterError], str] = {
    RouterError: "a bug in the router",
    InvalidRequest: "the body is not JSON, a field is missing or malformed, or an image is refused",
    Unauthenticated: "no API key, or not a valid one (the console: no valid session cookie)",
    PermissionDenied: "the API key may not use this model, or (the console) its role may not see this, or a write "
    "came without the session's CSRF token",
    NotFound: "no such path, or no such file or batch of this API key",
    ModelNotFound: "no replica serves the model",
    MethodNotAllowed: "the path does not take this method (the `Allow` header lists those it takes)",
    RequestTooLarge: "the body is over `router.max_request_bytes`",
    RateLimited: "the API key's quota is spent, or a `flex` request was shed because the cluster is busy",
    Overloaded: "every replica slot and the wait queue are full, or the wait ran out",
    QuotaUnavailable: "the shared quota store did not answer",
    BatchStoreUnavailable: "the batch job store (Redis) did not answer",
    Conflict: "a rollout of the model is already running or paused, or the rollout has ended",
    RolloutStoreUnavailable: "the rollout store (Redis: `router.rollout.store` or `registry.url`) did not answer",
    NoHealthyReplica: "no replica (of the model, on the chat endpoint) is healthy: all are ejected",
    UpstreamUnavailable: "every attempt failed before a byte was sent (the request was not processed)",
    UpstreamTimeout: "the replica took longer than `router.request_timeout_s`",
    StreamInterrupted: "the replica died after the stream started (an SSE error event; the answer is incomplete)",
}
_RETRY_AFTER = ("429", "503")
"""Statuses whose answers carry Retry-After."""
_PASSTHROUGH = (
    " A replica's own 4xx answer is passed through unchanged (vLLM's error object, whose `code` is the status number)."
)
BATCH_ONLY: tuple[ErrorCode, ...] = (
    "invalid_file",
    "invalid_purpose",
    "invalid_batch",
    "batch_not_cancellable",
    "file_not_found",
    "batch_not_found",
    "file_too_large",
    "batch_store_unavailable",
)
"""Codes only the files and batches endpoints answer with."""
ROLLOUT_ONLY: tuple[ErrorCode, ...] = (
    "invalid_rollout",
    "rollout_not_found",
    "rollout_active",
    "rollout_ended",
    "rollout_store_unavailable",
)
"""Codes only the rollout endpoints answer with."""
_NOT_CHAT: frozenset[ErrorCode] = frozenset(
    {
        "unknown_path",
        "method_not_allowed",
        "invalid_parameters",
        "internal_error",
        "operator_only",
        *BATCH_ONLY,
        *ROLLOUT_ONLY,
    }
)
"""Codes the chat operation does not document: FastAPI's routing and parameters (the chat endpoint parses its
own body and takes one path and method), a bug's 500, which no operation promises, and the console's role check."""


def error_descriptions(codes: Iterable[ErrorCode]) -> dict[str, str]:
    """Per status, the description of the answers with these codes: each `type`, its meaning and its `code`s."""
    by_class: dict[type[RouterError], list[ErrorCode]] = {}
    for code in codes:
        by_class.setdefault(CODES[code], []).append(code)
    by_status: dict[str, list[str]] = {}
    for cls, own in by_class.items():
        text = f"`{cls.type}`: {_MEANING[cls]} (`code`: {', '.join(own)})."
        by_status.setdefault(str(cls.status), []).append(text)
    described = {}
    for status in sorted(by_status):
        description = " ".join(by_status[status])
        if status in _RETRY_AFTER:
            description += " Retry after `Retry-After` seconds."
        described[status] = description
    return described


_CHAT_ERRORS = error_descriptions(code for code in CODES if code not in _NOT_CHAT)
_CONSOLE_SESSION: list[ErrorCode] = ["console_session_missing", "console_session_invalid", "console_session_expired"]
_CHAT_ERRORS["400"] += _PASSTHROUGH
# FastAPI routes that check the API key or can refuse (router/app.py): their error answers, added to FastAPI's.
_KEY: list[ErrorCode] = ["missing_api_key", "invalid_api_key"]
_BATCH_STORE: list[ErrorCode] = ["batch_store_unavailable"]
_ROLLOUT: list[ErrorCode] = [*_KEY, "rollout_store_unavailable"]
_ROLLOUT_WRITE: list[ErrorCode] = [*_ROLLOUT, "operator_only", "invalid_json", "invalid_rollout", "rollout_not_found"]
_ROUTE_ERRORS = {
    ("get", "/v1/rollouts"): error_descriptions(_ROLLOUT),
    ("get", "/v1/rollouts/{model}"): error_descriptions([*_ROLLOUT, "rollout_not_found"]),
    ("post", "/v1/rollouts/{action}"): error_descriptions([*_ROLLOUT_WRITE, "rollout_active", "rollout_ended"]),
    ("get", "/ready"): error_descriptions(["no_healthy_replica"]),
    ("get", "/v1/models"): error_descriptions(_KEY),
    ("get", "/v1/cluster"): error_descriptions(_KEY),
    ("get", "/console/api/session"): error_descriptions(_CONSOLE_SESSION),
    ("get", "/console/api/playground"): error_descriptions(_CONSOLE_SESSION),
    ("get", "/console/api/operations"): error_descriptions([*_CONSOLE_SESSION, "operator_only"]),
    ("post", "/console/api/batches/{batch_id}/cancel"): error_descriptions(
        [*_CONSOLE_SESSION, "operator_only", "csrf_token_invalid", "batch_not_found", "batch_not_cancellable"]
    ),
    ("post", "/console/api/rollouts/{action}"): error_descriptions(
        [
            *_CONSOLE_SESSION,
            "operator_only",
            "csrf_token_invalid",
            "invalid_json",
            "invalid_rollout",
            "rollout_not_found",
            "rollout_ended",
            "rollout_store_unavailable",
        ]
    ),
    ("post", "/v1/files"): error_descriptions([*_KEY, "invalid_purpose", "invalid_file", "file_too_large"]),
    ("get", "/v1/files/{file_id}"): error_descriptions([*_KEY, "file_not_found"]),
    ("get", "/v1/files/{file_id}/content"): error_descriptions([*_KEY, "file_not_found"]),
    ("delete", "/v1/files/{file_id}"): error_descriptions([*_KEY, "file_not_found"]),
    ("post", "/v1/batches"): error_descriptions(
        [*_KEY, "invalid_json", "invalid_batch", "file_not_found", *_BATCH_STORE]
    ),
    ("get", "/v1/batches"): error_descriptions([*_KEY, *_BATCH_STORE]),
    ("get", "/v1/batches/{batch_id}"): error_descriptions([*_KEY, "batch_not_found", *_BATCH_STORE]),
    ("post", "/v1/batches/{batch_id}/cancel"): error_descriptions(
        [*_KEY, "batch_not_found", "batch_not_cancellable", *_BATCH_STORE]
    ),
}
_AUTHENTICATED = ("/v1/models", "/v1/cluster", "/v1/files", "/v1/batches", "/v1/rollouts")
CONSOLE_SESSION = "ConsoleSession"
_VALIDATION_ERRORS = error_descriptions(["invalid_parameters"])
"""Replaces FastAPI's generated 422: a route's parameters that do not validate get a 400 (router/app.py)."""


def with_chat_completions(generated: dict[str, Any]) -> dict[str, Any]:
    """A copy of FastAPI's `generated` document with the chat endpoint, the error object and the bearer
    scheme added; the operation is optional-auth (`security` allows no key) because `auth.enabled` may be off."""
    schema = copy.deepcopy(generated)
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {}).update(_component_schemas())
    components.setdefault("headers", {}).update(_component_headers())
    components.setdefault("securitySchemes", {})[BEARER] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key from QVL_API_KEYS or auth.keys_file; not needed when auth.enabled is false.",
    }
    components["securitySchemes"][CONSOLE_SESSION] = {
        "type": "apiKey",
        "in": "cookie",
        "name": "qvl_console",
        "description": "The console's session cookie, set by signing in at /console/signin with an API key. "
        "POST /v1/chat/completions also takes it in place of the key, with the session's `x-csrf-token` header.",
    }
    paths = schema.setdefault("paths", {})
    for item in paths.values():
        for operation in item.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.update(_error_responses(_VALIDATION_ERRORS))
    for fastapi_own in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(fastapi_own, None)
    for (method, path), errors in _ROUTE_ERRORS.items():
        operation = paths.get(path, {}).get(method)
        if operation is None:
            continue
        operation.setdefault("responses", {}).update(_error_responses(errors))
        if path.startswith(_AUTHENTICATED):
            operation["security"] = [{BEARER: []}, {}]
        elif path.startswith("/console/"):
            operation["security"] = [{CONSOLE_SESSION: []}]
    paths[CHAT_PATH] = {"post": _chat_operation()}
    return schema


def _chat_operation() -> dict[str, Any]:
    ids = {"$ref": "#/components/headers/RequestId"}
    return {
        "summary": "Chat completions",
        "description": "OpenAI chat completions, answered as JSON or, with `stream`, as server-sent events. "
        "Images are base64 data URLs (`data:image/<type>;base64,...`); http(s) URLs only when `fetch.enabled`. "
        "The body is forwarded to a replica unchanged. An error after a stream has started arrives as one "
        "`data:` event carrying the error object, then `data: [DONE]`.",
        "operationId": "create_chat_completion",
        "security": [{BEARER: []}, {}],
        "parameters": [
            _header("x-request-id", "Echoed back when 1-128 characters of `A-Za-z0-9._:-`; otherwise a new id."),
            _header("x-session-id", "Session affinity key for the `session` policy (`router.session_header`)."),
            _header("cache-control", "`no-cache` skips the answer cache's read, `no-store` its write."),
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
        },
        "responses": {
            "200": {
                "description": "The answer: a `chat.completion` object, or with `stream` a `text/event-stream` of "
                "`chat.completion.chunk` events ending with `data: [DONE]`.",
                "headers": {
                    "x-request-id": ids,
                    "x-qvl-replica": {"$ref": "#/components/headers/Replica"},
                    "x-qvl-cache": {"$ref": "#/components/headers/Cache"},
                },
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                    # No schema: OpenAPI 3.1 has none for one event (3.2's `itemSchema`); the description says it.
                    "text/event-stream": {},
                },
            },
            **_error_responses(_CHAT_ERRORS),
        },
    }


def _header(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": {"type": "string"}}


def _error_responses(errors: dict[str, str]) -> dict[str, Any]:
    responses = {}
    for status, description in errors.items():
        response: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": _ERROR_REF}}}
        if status in _RETRY_AFTER:
            response["headers"] = {"Retry-After": {"$ref": "#/components/headers/RetryAfter"}}
        responses[status] = response
    return responses


def _component_headers() -> dict[str, Any]:
    def header(description: str, kind: str = "string") -> dict[str, Any]:
        return {"description": description, "schema": {"type": kind}}

    return {
        "RequestId": header("The request's id: the caller's `x-request-id` when valid, else a new one."),
        "Replica": header(
            "The replica's `host:port`, `cache` for an answer from the cache, `none` if none was reached."
        ),
        "Cache": header("`hit`, `miss`, `coalesced`, `bypass` (the answer cache), or `none`."),
        "RetryAfter": header("Whole seconds to wait before retrying.", "integer"),
    }


def _component_schemas() -> dict[str, Any]:
    text = {"type": "string"}
    return {
        ERROR_SCHEMA: {
            "type": "object",
            "description": "Every error the router answers; `type` is stable (clients match on it).",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type"],
                    "properties": {
                        "message": text,
                        "type": text,
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "integer", "null"]},
                    },
                }
            },
        },
        "ChatCompletionRequest": {
            "type": "object",
            "required": ["model", "messages"],
            "properties": {
                "model": {"type": "string", "minLength": 1, "description": "A model some replica serves."},
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"$ref": "#/components/schemas/ChatMessage"},
                    "description": "At most `limits.max_messages` messages and `limits.max_images` images.",
                },
                "stream": {"type": ["boolean", "null"]},
                "stream_options": {
                    "type": ["object", "null"],
                    "properties": {"include_usage": {"type": "boolean"}},
                },
                "max_tokens": {
                    "type": ["integer", "null"],
                    "minimum": 1,
                    "description": "At most `limits.max_tokens`.",
                },
                "max_completion_tokens": {
                    "type": ["integer", "null"],
                    "minimum": 1,
                    "description": "At most `limits.max_tokens`; wins over `max_tokens`.",
                },
                "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
                "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "n": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_N},
                "seed": {"type": ["integer", "null"]},
                "stop": {
                    "oneOf": [
                        {"type": "null"},
                        text,
                        {"type": "array", "maxItems": MAX_STOP, "items": text},
                    ]
                },
                "user": text,
            },
        },
        "ChatMessage": {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                "content": {
                    "oneOf": [
                        {"type": "null"},
                        text,
                        {"type": "array", "items": {"$ref": "#/components/schemas/ContentPart"}},
                    ]
                },
            },
        },
        "ContentPart": {
            "oneOf": [
                {
                    "type": "object",
                    "required": ["type", "text"],
                    "properties": {"type": {"const": "text"}, "text": text},
                },
                {
                    "type": "object",
                    "required": ["type", "image_url"],
                    "properties": {
                        "type": {"const": "image_url"},
                        "image_url": {
                            "type": "object",
                            "required": ["url"],
                            "properties": {
                                "url": {
                                    "type": "string",
                                    "description": "`data:image/<jpeg|png|webp|bmp>;base64,<payload>`",
                                },
                                "detail": {"enum": ["auto", "low", "high"]},
                            },
                        },
                    },
                },
            ]
        },
        "ChatCompletion": {
            "type": "object",
            "required": ["id", "object", "created", "model", "choices"],
            "properties": {
                "id": text,
                "object": {"const": "chat.completion"},
                "created": {"type": "integer"},
                "model": text,
                "choices": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "index": {"type": "integer"},
                            "message": {
                                "type": "object",
                                "properties": {"role": text, "content": {"type": ["string", "null"]}},
                            },
                            "finish_reason": {"type": ["string", "null"]},
                        },
                    },
                },
                "usage": {
                    "type": "object",
                    "properties": {
                        "prompt_tokens": {"type": "integer"},
                        "completion_tokens": {"type": "integer"},
                        "total_tokens": {"type": "integer"},
                    },
                },
            },
        },
    }
