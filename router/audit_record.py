"""The audit record: one JSON line per request, so that every request is attributable (MLPS level 3).

A line says who (`key_id`, never the key), when, which model, which images (SHA-256 of their bytes,
never the bytes), a digest of the text, how it was answered (cache, replica, status, error type,
latency, tokens) and, only when `audit.include_prompts` is on, the prompt's text. What a line holds
and how it is built from a request live here; router/audit.py writes the lines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One request. Serialised as one JSON object whose keys are these fields, in this order."""

    time: float
    """Unix seconds when the request arrived."""
    request_id: str
    key_id: str
    """The API key's id (never the key); "" when auth is off or the request had no valid key."""
    model: str
    image_digests: tuple[str, ...]
    """SHA-256 hex of each image's decoded bytes, in order of appearance."""
    prompt_digest: str
    """`prompt_digest(doc)`; "" when the body could not be parsed."""
    cache: str
    """hit, miss, coalesced, bypass or none."""
    replica: str
    status: int
    error_type: str
    latency_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    batch_id: str = ""
    """The batch this request was a line of ("" for a client's own request)."""
    prompt: str | None = None
    """`prompt_text(doc)`, only when `audit.include_prompts`; never image bytes."""
    version: str = ""
    """The model version that answered ("" when none was chosen or known)."""
    event: str = ""
    """"" for a request; `rollout:DECISION` for a rollout's decision (then `detail` holds its reason)."""
    detail: str = ""


def prompt_digest(doc: Mapping[str, Any]) -> str:
    """SHA-256 hex of the request's text and roles, so an auditor can match a prompt without storing it.

    The digest is over `orjson.dumps([[role, [text, ...]], ...])`: one pair per message, a string
    content counting as one text part, image parts left out (they are in `image_digests`). So
    `"content": "hi"` and `"content": [{"type": "text", "text": "hi"}]` have the same digest.
    """
    canonical = [[role, texts] for role, texts in _texts(doc)]
    return hashlib.sha256(orjson.dumps(canonical)).hexdigest()


def prompt_text(doc: Mapping[str, Any]) -> str:
    """The request's text as `role: text` lines, one per message with text; image parts are left out."""
    return "\n".join(f"{role}: {' '.join(texts)}" for role, texts in _texts(doc) if texts)


def audit_record(
    doc: Mapping[str, Any] | None,
    image_digests: Sequence[str],
    *,
    include_prompts: bool,
    time: float,
    request_id: str,
    key_id: str,
    model: str,
    cache: str,
    replica: str,
    status: int,
    error_type: str,
    latency_ms: float,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    batch_id: str = "",
    version: str = "",
) -> AuditRecord:
    """The record of one request from its parsed body (`None` when it could not be parsed).

    `prompt` is filled only with `include_prompts`; nothing of an image but its digest is kept.
    """
    return AuditRecord(
        time=time,
        request_id=request_id,
        key_id=key_id,
        model=model,
        image_digests=tuple(image_digests),
        prompt_digest=prompt_digest(doc) if doc is not None else "",
        cache=cache,
        replica=replica,
        status=status,
        error_type=error_type,
        latency_ms=latency_ms,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        batch_id=batch_id,
        prompt=prompt_text(doc) if include_prompts and doc is not None else None,
        version=version,
    )


def _texts(doc: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    # Tolerant of shapes the edge would reject: a record is written for rejected requests too.
    messages = doc.get("messages")
    out: list[tuple[str, list[str]]] = []
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, Mapping):
            continue
        role = message.get("role")
        content = message.get("content")
        if isinstance(content, str):
            texts = [content]
        elif isinstance(content, list):
            texts = [
                part["text"]
                for part in content
                if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ]
        else:
            texts = []
        out.append((role if isinstance(role, str) else "", texts))
    return out
