"""Parse a chat-completions body once, at the edge, into the typed request the router works with.

The body itself is forwarded to the replica unchanged; this module only reads it, checks what the
router and the replicas rely on and the input limits (`limits.*`), takes the SHA-256 of every
image's decoded bytes and counts the image tokens from each image's header (router/images.py).

Codes of the InvalidRequest errors raised here, besides those of router/images.py:
    invalid_json            not JSON, not an object, NaN/Infinity, or nested deeper than MAX_JSON_DEPTH
    too_many_messages       more than limits.max_messages messages
    too_many_images         more than limits.max_images images (counted before any is decoded)
    unsupported_image_url   an image URL that is not a data URL (remote URLs: router/fetch.py)
    invalid_image_url       a malformed data URL
    image_too_large         an image over limits.max_image_bytes (judged from the base64 length)
    unsupported_content     a content part other than text or image_url
    max_tokens_too_large    max_tokens / max_completion_tokens over limits.max_tokens
    n_too_large             n over MAX_N
    invalid_stop            stop neither a string nor a list of at most MAX_STOP strings
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from qvl.dataurl import DataURLError, decode_image_data_url
from qvl.settings import LimitSettings
from router.errors import InvalidRequest, error_code
from router.images import inspect_image

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_DEFAULT_LIMITS = LimitSettings()
MAX_JSON_DEPTH = 128
"""Deepest nesting of arrays and objects accepted. orjson reads up to 1024 levels but writes at most
254, and the cache key re-serialises the body, so a deeper body would fail there instead of here."""
MAX_N = 8
MAX_STOP = 4


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
    image_tokens: int = 0
    """Prompt tokens Qwen3-VL spends on the request's images, from their headers (for image-token quotas)."""
    klass: str = "interactive"
    """The priority class (router/classes.py): interactive, flex or batch; set after parsing."""
    ticket: BatchTicket | None = field(default=None, compare=False, repr=False)
    """A batch line's ticket (router/batch/): the proxy notes where the line went."""
    version: str = ""
    """The model version the route chose (router/routes.py); empty: any replica of the model."""
    target: str = ""
    """The served name replicas are picked by: `MODEL@VERSION` when a version was chosen, else the model."""

    @property
    def served(self) -> str:
        """The name the proxy picks replicas by."""
        return self.target or self.model


@dataclass(eq=False, slots=True)
class BatchTicket:
    """What the batch runner and the proxy share about one line in flight."""

    floor: bool = False
    """Sent under the aging floor: it may take one slot on a replica without room."""
    wanted: str = ""
    """The replica the runner found room on and paced it for: the proxy sends it there while it has room."""
    replica: str = ""
    """The replica the proxy sent it to ("" until then)."""
    started: float = 0.0
    """time.monotonic() when the runner started it."""
    aborted: bool = False
    """The runner took it back (the replica ran out of room); it runs again later."""


class ImagePart(NamedTuple):
    """An image content part: `messages[message].content[part].image_url.url` is `url`."""

    message: int
    part: int
    url: str

    @property
    def where(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"


def image_digest(data_url: str) -> str:
    """SHA-256 (hex) of the image bytes in a base64 data URL; raises InvalidRequest if it is not one."""
    return hashlib.sha256(decode_data_url(data_url)).hexdigest()


def decode_data_url(data_url: str, max_bytes: int | None = None) -> bytes:
    """The decoded bytes of `data:image/<type>;base64,<payload>`; raises InvalidRequest otherwise.

    With `max_bytes`, a larger image is refused (`image_too_large`) from its base64 length, undecoded.
    """
    try:
        return decode_image_data_url(data_url, max_bytes=max_bytes)
    except DataURLError as exc:
        raise InvalidRequest(str(exc), code=error_code(exc.code), param="messages") from None


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object; raises InvalidRequest (`invalid_json`) otherwise.

    parse_chat_request calls it; router/fetch.py's caller uses it to read the body before inlining.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        # orjson also refuses NaN and Infinity, and nesting past 1024 levels, without recursing.
        raise InvalidRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    if _too_deep(doc, MAX_JSON_DEPTH):
        raise InvalidRequest(f"request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    return doc


def parse_chat_request(
    body: bytes, session_id: str | None = None, limits: LimitSettings = _DEFAULT_LIMITS
) -> ChatRequest:
    """Validate a /v1/chat/completions body against `limits`; raises InvalidRequest naming the offending field."""
    doc = parse_json_object(body)

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

    sampling = _sampling(doc, limits)
    _check_stop(doc.get("stop"))
    digests: list[str] = []
    tokens = 0
    for part in image_parts(doc.get("messages"), limits):
        raw = decode_data_url(part.url, limits.max_image_bytes)
        tokens += inspect_image(raw, limits, part.where).tokens
        digests.append(hashlib.sha256(raw).hexdigest())
    return ChatRequest(
        model=model,
        stream=stream,
        sampling=sampling,
        image_digests=tuple(digests),
        session_id=session_id or None,
        body=body,
        doc=doc,
        image_tokens=tokens,
    )


def image_parts(messages: Any, limits: LimitSettings) -> list[ImagePart]:
    """Every image part of `messages`, in order, after checking the messages' shape and counts.

    Decodes nothing; raises InvalidRequest (too_many_messages, too_many_images, ...).
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("`messages` must be a non-empty array", param="messages")
    if len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"`messages` holds {len(messages)} messages, over the limit of {limits.max_messages}",
            code="too_many_messages",
            param="messages",
        )
    parts: list[ImagePart] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
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
                parts.append(ImagePart(i, j, url))
            else:
                raise InvalidRequest(
                    f"{where}.type must be 'text' or 'image_url'",
                    code="unsupported_content",
                    param="messages",
                )
    if len(parts) > limits.max_images:
        raise InvalidRequest(
            f"the request holds {len(parts)} images, over the limit of {limits.max_images}",
            code="too_many_images",
            param="messages",
        )
    return parts


def _too_deep(doc: dict[str, Any], limit: int) -> bool:
    # Iterative, and only containers are pushed: a large string or a long array of numbers costs a type check.
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        for child in node.values() if type(node) is dict else node:
            if type(child) is dict or type(child) is list:
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _sampling(doc: dict[str, Any], limits: LimitSettings) -> SamplingParams:
    max_tokens = _max_tokens(doc, "max_tokens", limits)
    max_completion_tokens = _max_tokens(doc, "max_completion_tokens", limits)
    n = _int(doc.get("n"), "n", minimum=1) or 1
    if n > MAX_N:
        raise InvalidRequest(f"`n` must be at most {MAX_N}", code="n_too_large", param="n")
    return SamplingParams(
        max_tokens=max_completion_tokens if max_completion_tokens is not None else max_tokens,
        temperature=_number(doc.get("temperature"), "temperature", 0.0, 2.0),
        top_p=_number(doc.get("top_p"), "top_p", 0.0, 1.0),
        n=n,
        seed=_int(doc.get("seed"), "seed", minimum=None),
    )


def _max_tokens(doc: dict[str, Any], name: str, limits: LimitSettings) -> int | None:
    # Both names are reported as param `max_tokens`, as before; the message names the field sent.
    value = _int(doc.get(name), name, minimum=1, param="max_tokens")
    if value is not None and value > limits.max_tokens:
        raise InvalidRequest(
            f"`{name}` must be at most {limits.max_tokens}", code="max_tokens_too_large", param="max_tokens"
        )
    return value


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest(
            f"`stop` must be a string or an array of at most {MAX_STOP} strings", code="invalid_stop", param="stop"
        )


def _int(value: Any, name: str, minimum: int | None, param: str | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"`{name}` must be an integer", param=param or name)
    if minimum is not None and value < minimum:
        raise InvalidRequest(f"`{name}` must be at least {minimum}", param=param or name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"`{name}` must be a number", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"`{name}` must be between {low:g} and {high:g}", param=name)
    return float(value)
