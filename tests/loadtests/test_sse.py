"""SSE reading with client-side token times: events cut anywhere, TTFT and gaps, usage, error events."""

from __future__ import annotations

import json
from collections.abc import Iterator

from loadtests.sse import EventSplitter, error_type, read_stream


def event(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def token(text: str) -> bytes:
    return event({"choices": [{"index": 0, "delta": {"content": text}}]})


class Ticks:
    """A clock that advances by the next step each time it is read."""

    def __init__(self, *steps: float) -> None:
        self.now = 0.0
        self.steps = list(steps)

    def __call__(self) -> float:
        self.now += self.steps.pop(0) if self.steps else 0.0
        return self.now


def test_splitter_joins_events_cut_anywhere() -> None:
    raw = token("a") + b"data: [DONE]\r\n\r\n"
    splitter = EventSplitter()
    payloads = [p for i in range(len(raw)) for p in splitter.feed(raw[i : i + 1])]
    assert payloads == [json.dumps({"choices": [{"index": 0, "delta": {"content": "a"}}]}), "[DONE]"]


def test_ttft_and_gaps_come_from_content_events_only() -> None:
    role = event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    usage = event({"choices": [], "usage": {"prompt_tokens": 300, "completion_tokens": 3, "total_tokens": 303}})
    chunks = [role, token("a"), token("b") + token("c"), usage, b"data: [DONE]\n\n"]
    # clock reads: role event, a, b, c, usage, DONE
    clock = Ticks(0.5, 0.25, 0.125, 0.0, 1.0, 1.0)
    outcome = read_stream(iter(chunks), sent_at=0.0, clock=clock)
    assert outcome.ttft_s == 0.75
    assert outcome.gaps_s == [0.125, 0.0]
    assert outcome.usage == {"prompt_tokens": 300, "completion_tokens": 3, "total_tokens": 303}
    assert outcome.done and outcome.error_type is None


def test_error_event_sets_the_error_type() -> None:
    error = {"error": {"message": "replica lost", "type": "upstream_error", "code": "replica_failed"}}
    outcome = read_stream(iter([token("a"), event(error), b"data: [DONE]\n\n"]), 0.0, Ticks(0.1))
    assert outcome.error_type == "upstream_error" and outcome.ttft_s == 0.1 and outcome.done


def test_cut_stream_is_not_done_and_bad_json_is_an_error() -> None:
    outcome = read_stream(iter([token("a"), b"data: {not json\n\n"]), 0.0, Ticks())
    assert not outcome.done and outcome.error_type == "bad_event"


def test_error_type_reads_openai_errors_only() -> None:
    assert error_type({"error": {"type": "rate_limit_exceeded", "message": "m"}}) == "rate_limit_exceeded"
    assert error_type({"error": {"code": "bad_image"}}) == "bad_image"
    assert error_type({"error": {}}) == "unknown"
    assert error_type({"choices": []}) is None
    assert error_type([1]) is None


def chunks_of(raw: bytes, size: int) -> Iterator[bytes]:
    return (raw[i : i + size] for i in range(0, len(raw), size))


def test_many_tokens_in_small_chunks() -> None:
    raw = b"".join(token(str(i)) for i in range(50)) + b"data: [DONE]\n\n"
    outcome = read_stream(chunks_of(raw, 7), 0.0, Ticks(*([0.01] * 60)))
    assert outcome.ttft_s is not None and len(outcome.gaps_s) == 49 and outcome.done
