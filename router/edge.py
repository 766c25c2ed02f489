"""Parse a chat-completions body once, at the edge, into the typed request the router works with.

The body itself is forwarded to the replica unchanged; this module only reads it, checks what the
router and the replicas rely on, and takes the SHA-256 of every image's decoded bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from qvl.dataurl import DataURLError, decode_image_data_url
from router.errors import InvalidRequest

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the router needs to know of a request; `body` is forwarded verbatim."""

    model: str
    stream: bool
    sampling: SamplingParams
    image_digests: tuple[str, ...]
    session_id: str | None
    body: bytes
    doc: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The parsed body (for the cache key); read-only by convention."""


def image_digest(data_url: str) -> str:
    """SHA-256 (hex) of the image bytes in a base64 data URL; raises InvalidRequest if it is not one."""
    return hashlib.sha256(decode_data_url(data_url)).hexdigest()


def decode_data_url(data_url: str) -> bytes:
    """The decoded bytes of `data:image/<type>;base64,<payload>`; raises InvalidRequest otherwise."""
    try:
        return decode_image_data_url(data_url)
    except DataURLError as exc:
        raise InvalidRequest(str(exc), code=exc.code, param="messages") from None


def parse_chat_request(body: bytes, session_id: str | None = None) -> ChatRequest:
    """Validate a /v1/chat/completions body; raises InvalidRequest naming the offending field."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")

    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("`model` is required and must be a non-empty string", param="model")
    stream = doc.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("`stream` must be a boolean", param="stream")
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest("`stream_options` must be an object", param="stream_options")

    digests = _image_digests(doc.get("messages"))
    return ChatRequest(
        model=model,
        stream=stream,
        sampling=_sampling(doc),
        image_digests=digests,
        session_id=session_id or None,
        body=body,
        doc=doc,
    )


def _image_digests(messages: Any) -> tuple[str, ...]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("`messages` must be a non-empty array", param="messages")
    digests: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}", param="messages")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"messages[{i}].content must be a string or an array", param="messages")
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"{where}.text must be a string", param="messages")
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else None
                if not isinstance(url, str):
                    raise InvalidRequest(f"{where}.image_url.url must be a string", param="messages")
                digests.append(image_digest(url))
            else:
                raise InvalidRequest(
                    f"{where}.type must be 'text' or 'image_url'",
                    code="unsupported_content",
                    param="messages",
                )
    return tuple(digests)


def _sampling(doc: dict[str, Any]) -> SamplingParams:
    max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
    return SamplingParams(
        max_tokens=_int(max_tokens, "max_tokens", minimum=1),
        temperature=_number(doc.get("temperature"), "temperature", 0.0, 2.0),
        top_p=_number(doc.get("top_p"), "top_p", 0.0, 1.0),
        n=_int(doc.get("n"), "n", minimum=1) or 1,
        seed=_int(doc.get("seed"), "seed", minimum=None),
    )


def _int(value: Any, name: str, minimum: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"`{name}` must be an integer", param=name)
    if minimum is not None and value < minimum:
        raise InvalidRequest(f"`{name}` must be at least {minimum}", param=name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"`{name}` must be a number", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"`{name}` must be between {low:g} and {high:g}", param=name)
    return float(value)
