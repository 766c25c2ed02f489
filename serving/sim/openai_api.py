"""The OpenAI wire format as `vllm serve` writes it, for the simulator: parse a chat body, build replies.

Parsing is deliberately narrow and fast (no pydantic): it reads what the latency model needs (text
length, images, the output cap, the stream flags, the priority) and rejects what vLLM would reject with
a 400. The priority is vLLM's: the body's `priority` (default 0; an integer in int64's range, read as
pydantic's lax mode reads one, so `true`, `5.0` and `"5"` pass as vLLM lets them), unless an
`X-Vllm-Priority` header holds an integer, which wins (vLLM 0.32's `_get_priority`; a header that is no
integer is ignored). vLLM takes a non-zero priority under either scheduling policy (fcfs ignores it),
so the simulator does too.
Images must be base64 data URLs (qvl.dataurl); remote URLs are refused because the simulator never fetches.
Errors carry vLLM's shape: `{"error": {"message", "type", "param", "code"}}` with `code` the status.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from qvl.dataurl import DataURLError, decode_image_data_url
from qvl.images import ImageError, ImageTokenCounter
from serving.sim.engine import ImageInput, SimRequest

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

# Made-up output: a small vocabulary cycled deterministically per request.
WORDS = (
    "the", "red", "bag", "sits", "on", "a", "white", "table", "near", "window", "with", "soft",
    "light", "and", "two", "shoes", "beside", "it", "in", "photo", "product", "looks", "new", "clean",
)  # fmt: skip


class ApiError(Exception):
    """An error answered to the client; `status` and `type` follow vLLM's OpenAI server."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "InternalServerError"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def body(self) -> bytes:
        """The JSON error body."""
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        return orjson.dumps({"error": error})


class BadRequest(ApiError):
    status = 400
    type = "BadRequestError"


class ModelNotFound(ApiError):
    status = 404
    type = "NotFoundError"


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A parsed chat-completions request: the reply's shape and what the engine must simulate."""

    stream: bool
    include_usage: bool
    request: SimRequest
    model: str
    """The served name the request used (the reply's `model`, as vLLM echoes it): the main one if it named none."""


def parse_chat(
    body: bytes,
    served_model: str,
    counter: ImageTokenCounter,
    chars_per_token: float = 4.0,
    template_tokens: int = 0,
    priority_header: bytes | None = None,
    aliases: frozenset[str] = frozenset(),
) -> ChatCall:
    """Read a /v1/chat/completions body; raises BadRequest (400) or ModelNotFound (404). Text tokens are
    template_tokens + characters / chars_per_token (rounded up), as a capacity profile counts them.
    `priority_header` is the request's X-Vllm-Priority header, if any; `aliases` are the names served
    beside `served_model`."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    model = doc.get("model")
    # vLLM serves its main name when the field is left out.
    if model is None:
        model = served_model
    elif model != served_model and (not isinstance(model, str) or model not in aliases):
        raise ModelNotFound(f"The model `{model}` does not exist.")
    stream = doc.get("stream") or False
    if not isinstance(stream, bool):
        raise BadRequest("`stream` must be a boolean", param="stream")
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("`stream_options` must be an object", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    max_tokens = doc.get("max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = doc.get("max_tokens"), "max_tokens"
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise BadRequest(f"`{name}` must be a positive integer", param=name)
    priority = _body_priority(doc.get("priority", 0))
    if priority_header is not None:
        priority = _header_priority(priority_header, priority)
    chars, images = _read_messages(doc.get("messages"), counter)
    text_tokens = template_tokens + math.ceil(chars / chars_per_token)
    request = SimRequest(text_tokens=text_tokens, images=images, max_tokens=max_tokens, priority=priority)
    return ChatCall(stream=stream, include_usage=include_usage, request=request, model=model)


def _body_priority(value: Any) -> int:
    """The body's priority as vLLM's pydantic model reads it (lax mode); BadRequest where it refuses."""
    number: int | None = None
    # bool is an int here: pydantic reads true as 1, and 5.0 as 5.
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        number = int(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = int(value.strip())
    if number is None or not _INT64_MIN <= number <= _INT64_MAX:
        raise BadRequest("`priority` must be an integer in int64's range", param="priority")
    return number


def _header_priority(header: bytes, body_priority: int) -> int:
    """vLLM's rule: the header's value when Python's int() reads it, else the body's priority."""
    try:
        return int(header.decode("latin-1"))
    except ValueError:
        return body_priority


def _read_messages(messages: Any, counter: ImageTokenCounter) -> tuple[int, tuple[ImageInput, ...]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty array", param="messages")
    chars = 0
    images: list[ImageInput] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object", param="messages")
        content = message.get("content")
        if content is None:
            continue
        if isinstance(content, str):
            chars += len(content)
            continue
        if not isinstance(content, list):
            raise BadRequest(f"messages[{i}].content must be a string or an array", param="messages")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadRequest(f"messages[{i}].content[{j}].text must be a string", param="messages")
                chars += len(text)
            elif kind == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else image
                if not isinstance(url, str):
                    raise BadRequest(f"messages[{i}].content[{j}].image_url.url must be a string", param="messages")
                images.append(_image(url, counter))
            else:
                raise BadRequest(f"messages[{i}].content[{j}].type must be 'text' or 'image_url'", param="messages")
    return chars, tuple(images)


def _image(url: str, counter: ImageTokenCounter) -> ImageInput:
    try:
        raw = decode_image_data_url(url)
    except DataURLError as exc:
        raise BadRequest(str(exc), param="messages") from None
    digest = hashlib.sha256(raw).digest()
    try:
        tokens = counter.count(digest, raw)
    except ImageError as exc:
        raise BadRequest(f"invalid image: {exc}", param="messages") from None
    return ImageInput(digest=digest, tokens=tokens)


def completion_id() -> str:
    """A fresh `chatcmpl-...` id, as vLLM makes them (32 hex digits)."""
    return "chatcmpl-" + os.urandom(16).hex()


def token_text(index: int, seed: int) -> str:
    """The text of output token `index`: a word, space-led after the first."""
    word = WORDS[(seed + index * 7) % len(WORDS)]
    return word if index == 0 else " " + word


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def completion_body(
    call_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
) -> bytes:
    """A non-streamed `chat.completion` object."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "tool_calls": []},
        "logprobs": None,
        "finish_reason": finish_reason,
        "stop_reason": None,
    }
    return orjson.dumps(
        {
            "id": call_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens),
        }
    )


class ChunkWriter:
    """The `data: ...` SSE events of one streamed completion, in vLLM's order and shape."""

    __slots__ = ("_head",)

    def __init__(self, call_id: str, model: str) -> None:
        self._head = {
            "id": call_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }

    def _event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**self._head, "choices": choices, **extra}) + b"\n\n"

    def role(self) -> bytes:
        """The first event: the assistant role and empty content."""
        delta = {"role": "assistant", "content": ""}
        return self._event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def token(self, text: str, finish_reason: str | None = None) -> bytes:
        """One token's event; the last one carries the finish reason, as vLLM sends it."""
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None}
        choice["finish_reason"] = finish_reason
        if finish_reason is not None:
            choice["stop_reason"] = None
        return self._event([choice])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The trailing usage event sent when `stream_options.include_usage` is true."""
        return self._event([], usage=usage(prompt_tokens, completion_tokens))

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"


def models_body(model: str, max_model_len: int, created: int, aliases: Sequence[str] = ()) -> bytes:
    """The /v1/models list in vLLM's shape: one card for `model`, then one for each alias (all of the one
    model: `root` is `model`)."""
    cards = [_model_card(name, model, max_model_len, created) for name in dict.fromkeys((model, *aliases))]
    return orjson.dumps({"object": "list", "data": cards})


def _model_card(name: str, model: str, max_model_len: int, created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": "modelperm-" + os.urandom(16).hex(),
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }
