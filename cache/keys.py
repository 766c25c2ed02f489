"""Cache keys: a pure function of what can change an answer's content.

A key is the SHA-256 of a canonical JSON of the key-format version, the model, its revision, the
messages with every image replaced by the SHA-256 of its decoded bytes, and every other top-level
field of the body except the few in NON_OUTPUT_FIELDS. Fields are excluded by name rather than
included by name on purpose: any parameter that changes the output, known today (temperature,
top_p, top_k, min_p, max_tokens, seed, stop, response_format, tools, logprobs, n, ...) or added by a
future vLLM, is part of the key without anyone having to remember to add it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import orjson

KEY_VERSION = 1
"""Bump when the canonical form below changes, so old entries are never read with a new meaning."""

NON_OUTPUT_FIELDS = frozenset({"stream", "stream_options", "user", "metadata", "store", "service_tier"})
"""Top-level body fields left out of the key because they cannot change the answer's content:
how it is delivered (stream, stream_options: a stored answer is replayed either way), who asked
(user, metadata) and what the provider does with it (store, service_tier)."""


def cache_key(doc: Mapping[str, Any], image_digests: Sequence[str], revision: str) -> str:
    """Hex SHA-256 key of a validated chat-completions body.

    `image_digests` are the SHA-256 hex digests of the decoded images in order of appearance (as
    the edge computes them), so the base64 text, its line breaks and the data URL's parameters
    never reach the key. Raises ValueError if their number differs from the body's image parts.
    """
    digests = iter(image_digests)
    messages = [_message(message, digests) for message in doc.get("messages") or ()]
    if next(digests, None) is not None:
        raise ValueError("more image digests than image parts in the request")
    params = {name: _normalize(value) for name, value in doc.items() if name not in _NOT_PARAMS}
    canonical = {
        "version": KEY_VERSION,
        "model": doc["model"],
        "revision": revision,
        "messages": messages,
        "params": params,
    }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def image_parts(doc: Mapping[str, Any]) -> int:
    """How many `image_url` content parts the body's messages hold (what len(image_digests) must be)."""
    count = 0
    for message in doc.get("messages") or ():
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, Mapping) and part.get("type") == "image_url")
    return count


# `model` and `messages` have their own places in the canonical form.
_NOT_PARAMS = NON_OUTPUT_FIELDS | {"model", "messages"}


def _message(message: Any, digests: Iterator[str]) -> Any:
    if not isinstance(message, Mapping):
        return message
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    return {**message, "content": [_part(part, digests) for part in content]}


def _part(part: Any, digests: Iterator[str]) -> Any:
    if not isinstance(part, Mapping) or part.get("type") != "image_url":
        return part
    digest = next(digests, None)
    if digest is None:
        raise ValueError("fewer image digests than image parts in the request")
    image: dict[str, Any] = {"type": "image", "sha256": digest}
    source = part.get("image_url")
    # `detail` can change how the engine sizes the image, hence the answer ("auto" is the default, the
    # same as leaving it out); the URL itself must not count.
    if isinstance(source, Mapping) and source.get("detail") not in (None, "auto"):
        image["detail"] = source["detail"]
    return image


def _normalize(value: Any) -> Any:
    # 0 and 0.0 (or 1 and 1.0) mean the same to the engine; without this they would be two keys.
    # Only exactly representable integers: orjson cannot encode integers past 64 bits.
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    if isinstance(value, Mapping):
        return {k: _normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value
