"""The router's OpenAPI document: FastAPI's generated one plus `POST /v1/chat/completions`.

The chat endpoint is a raw ASGI handler (router/app.py), so FastAPI does not know it; its request and
responses are written down here by hand, from what router/edge.py accepts and router/errors.py answers.
The request schema describes what the edge checks; everything else in the body (tools, logprobs, ...)
is allowed and forwarded to the replica unchanged, so objects stay open (`additionalProperties`).
"""

from __future__ import annotations

import copy
from typing import Any

from router.edge import MAX_N, MAX_STOP

CHAT_PATH = "/v1/chat/completions"
BEARER = "bearerAuth"
ERROR_SCHEMA = "ErrorResponse"
_ERROR_REF = {"$ref": f"#/components/schemas/{ERROR_SCHEMA}"}

# Each error status the chat endpoint answers, with the `type` (and `code`s) a client sees; router/errors.py.
_CHAT_ERRORS = {
    "400": "`invalid_request_error`: the body is not JSON, a field is missing or malformed, or an image is "
    "refused (`code`: invalid_json, invalid_image_url, unsupported_image_url, unsupported_content, "
    "too_many_messages, too_many_images, image_too_large, invalid_image, unsupported_image_format, "
    "image_too_many_pixels, max_tokens_too_large, n_too_large, invalid_stop, ...). A replica's own 4xx "
    "answer is passed through unchanged (vLLM's error object, whose `code` is the status number).",
    "401": "`authentication_error`: no API key, or not a valid one (`code`: missing_api_key, invalid_api_key).",
    "403": "`permission_denied`: the API key may not use this model (`code`: model_not_allowed).",
    "404": "`model_not_found`: no replica serves the model.",
    "413": "`request_too_large`: the body is over `router.max_request_bytes`.",
    "429": "`rate_limit_exceeded`: the API key's quota is spent; retry after `Retry-After` seconds.",
    "502": "`upstream_unavailable`: every attempt failed before a byte was sent (the request was not processed).",
    "503": "`overloaded` (every replica slot and the wait queue are full), `quota_unavailable` or "
    "`no_healthy_replica`; retry after `Retry-After` seconds where it is sent.",
    "504": "`upstream_timeout`: the replica took longer than `router.request_timeout_s`.",
}
# FastAPI routes that check the API key or can refuse (router/app.py): their error answers, added to FastAPI's.
_ROUTE_ERRORS = {
    "/ready": {"503": "`no_healthy_replica`: no replica is healthy."},
    "/v1/models": {"401": _CHAT_ERRORS["401"]},
    "/v1/cluster": {"401": _CHAT_ERRORS["401"]},
}
_AUTHENTICATED = ("/v1/models", "/v1/cluster")


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
    paths = schema.setdefault("paths", {})
    for path, errors in _ROUTE_ERRORS.items():
        operation = paths.get(path, {}).get("get")
        if operation is None:
            continue
        operation.setdefault("responses", {}).update(_error_responses(errors))
        if path in _AUTHENTICATED:
            operation["security"] = [{BEARER: []}, {}]
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
        if status in ("429", "503"):
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
