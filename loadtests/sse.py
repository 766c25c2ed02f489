"""Reading a streamed chat completion (SSE) at the client, with the times the tokens arrived.

A "token" here is a `data:` event whose first choice carries non-empty `delta.content`: what a shopper
sees appear. Time to first token runs from the moment the request was sent to the first such event;
the inter-token gaps are the times between consecutive ones. The usage event (`stream_options.
include_usage`) and an error event (`data: {"error": {...}}`, see ARCHITECTURE.md) are kept too. No
locust import: the locustfile feeds this from its HTTP client, the tests from plain bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


@dataclass
class StreamOutcome:
    """What one streamed answer showed the client; times in seconds on the caller's clock."""

    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    usage: dict[str, int] | None = None
    error_type: str | None = None
    done: bool = False
    """`data: [DONE]` arrived: the stream ended as the protocol says, not by a cut connection."""


class EventSplitter:
    """Turns byte chunks, cut anywhere, into the `data:` payloads of complete SSE events."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[str]:
        """The data payloads completed by `chunk` (several `data:` lines of one event are joined by \\n)."""
        # Normalise the whole buffer, not the chunk: a \r\n may be cut between two chunks.
        self._buffer = (self._buffer + chunk).replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        payloads = []
        for event in events:
            lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                payloads.append(b"\n".join(lines).decode("utf-8", "replace"))
        return payloads


def error_type(body: object) -> str | None:
    """The `type` (else `code`) of an OpenAI error object `{"error": {...}}`; None when `body` is not one."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if not isinstance(error, dict):
        return None
    kind = error.get("type") or error.get("code")
    return str(kind) if kind else "unknown"


def read_stream(chunks: Iterable[bytes], sent_at: float, clock: Callable[[], float]) -> StreamOutcome:
    """Consume an SSE body, stamping each token event with `clock()` as it is parsed; `sent_at` is on the
    same clock. Malformed JSON in an event counts as the error type "bad_event"."""
    outcome = StreamOutcome()
    splitter = EventSplitter()
    last: float | None = None
    for chunk in chunks:
        for payload in splitter.feed(chunk):
            now = clock()
            if payload.strip() == "[DONE]":
                outcome.done = True
                continue
            try:
                event = json.loads(payload)
            except json.JSONDecodeError:
                outcome.error_type = outcome.error_type or "bad_event"
                continue
            kind = error_type(event)
            if kind is not None:
                outcome.error_type = kind
                continue
            usage = event.get("usage") if isinstance(event, dict) else None
            if isinstance(usage, dict):
                outcome.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
            if _has_content(event):
                if last is None:
                    outcome.ttft_s = now - sent_at
                else:
                    outcome.gaps_s.append(now - last)
                last = now
    return outcome


def _has_content(event: object) -> bool:
    if not isinstance(event, dict):
        return False
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return False
    delta = choices[0].get("delta")
    return isinstance(delta, dict) and bool(delta.get("content"))
