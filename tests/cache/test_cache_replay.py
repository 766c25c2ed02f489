from __future__ import annotations

import random

import orjson
import pytest

from cache.replay import StreamRecorder, completion_is_cacheable, completion_to_sse

USAGE = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def completion(*contents: str, finish_reason: str = "stop", usage: dict | None = USAGE, **extra: object) -> bytes:
    """A chat.completion body shaped like vLLM's, with its null fields."""
    choices = [
        {
            "index": i,
            "message": {
                "role": "assistant",
                "content": content,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "tool_calls": [],
                "reasoning_content": None,
            },
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
        for i, content in enumerate(contents)
    ]
    doc = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "m", "choices": choices}
    if usage is not None:
        doc["usage"] = usage
    return orjson.dumps({**doc, **extra})


def events(sse: bytes) -> list[object]:
    assert sse.endswith(b"data: [DONE]\n\n")
    out: list[object] = []
    for block in sse.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: ")
        payload = block[len(b"data: ") :]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def record(sse: bytes, pieces: int | None = None, seed: int = 0) -> bytes | None:
    recorder = StreamRecorder()
    if pieces is None:
        recorder.feed(sse)
    else:
        cuts = sorted(random.Random(seed).sample(range(1, len(sse)), pieces - 1))
        for start, end in zip([0, *cuts], [*cuts, len(sse)], strict=True):
            recorder.feed(sse[start:end])
    return recorder.completion()


def vllm_stream(
    *deltas: dict, finish_reason: str | None = "stop", usage: dict | None = None, done: bool = True
) -> bytes:
    """An SSE stream as vLLM sends it: a role chunk, content chunks, the last one with the finish_reason."""
    head = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5, "model": "m"}
    chunks = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}]}]
    for i, delta in enumerate(deltas):
        last = i == len(deltas) - 1
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason if last else None}
        chunks.append({**head, "choices": [choice]})
    if usage is not None:
        chunks.append({**head, "choices": [], "usage": usage})
    body = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
    return body + (b"data: [DONE]\n\n" if done else b"")


def test_sse_has_the_openai_chunk_shape() -> None:
    evs = events(completion_to_sse(completion("A red mug."), include_usage=True))
    assert len(evs) == 5 and evs[-1] == "[DONE]"
    role, content, finish, usage = evs[:4]
    for chunk in (role, content, finish, usage):
        assert isinstance(chunk, dict)
        assert (chunk["id"], chunk["object"], chunk["created"], chunk["model"]) == (
            "chatcmpl-1",
            "chat.completion.chunk",
            1700000000,
            "m",
        )
    assert isinstance(role, dict) and role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert isinstance(content, dict) and content["choices"][0]["delta"] == {"content": "A red mug."}
    assert isinstance(finish, dict) and finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert isinstance(usage, dict) and usage["choices"] == [] and usage["usage"] == USAGE


def test_sse_without_usage_when_not_asked() -> None:
    evs = events(completion_to_sse(completion("hi"), include_usage=False))
    assert all("usage" not in e for e in evs if isinstance(e, dict))
    assert len(evs) == 4


def test_sse_of_empty_content_has_no_content_event() -> None:
    evs = events(completion_to_sse(completion("", finish_reason="length"), include_usage=False))
    assert len(evs) == 3


def test_sse_supports_several_choices() -> None:
    evs = events(completion_to_sse(completion("one", "two"), include_usage=False))
    contents = {
        e["choices"][0]["index"]: e["choices"][0]["delta"]["content"]
        for e in evs
        if isinstance(e, dict) and e["choices"][0]["delta"].get("content")
    }
    assert contents == {0: "one", 1: "two"}


def test_sse_refuses_an_uncacheable_body() -> None:
    with pytest.raises(ValueError):
        completion_to_sse(b"{}", include_usage=False)


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("pieces", [None, 2, 7, 50])
def test_round_trip(include_usage: bool, pieces: int | None) -> None:
    original = completion('Ein roter Becher \u2615 mit "Zitat".\nZweite Zeile.', "second choice")
    sse = completion_to_sse(original, include_usage)
    recorded = record(sse, pieces)
    assert recorded is not None
    assert completion_is_cacheable(recorded)
    got, want = orjson.loads(recorded), orjson.loads(original)
    for name in ("id", "object", "created", "model"):
        assert got[name] == want[name]
    assert got.get("usage") == (want["usage"] if include_usage else None)
    for g, w in zip(got["choices"], want["choices"], strict=True):
        assert g["index"] == w["index"]
        assert g["message"] == {"role": "assistant", "content": w["message"]["content"]}
        assert g["finish_reason"] == w["finish_reason"]
        assert g["logprobs"] is None
    # And once more: the recorded body replays to the same stream.
    assert completion_to_sse(recorded, include_usage) == completion_to_sse(original, include_usage)


def test_recorder_byte_by_byte_with_crlf_and_comments() -> None:
    sse = vllm_stream({"content": "Hel"}, {"content": "lo"}, usage=USAGE).replace(b"\n", b"\r\n")
    sse = b": keep-alive\r\n\r\n" + sse
    recorder = StreamRecorder()
    for i in range(len(sse)):
        recorder.feed(sse[i : i + 1])
    body = recorder.completion()
    assert body is not None
    doc = orjson.loads(body)
    assert doc["choices"][0]["message"]["content"] == "Hello"
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"] == USAGE
    assert doc["id"] == "chatcmpl-9" and doc["object"] == "chat.completion"


def test_recorder_accepts_finish_reason_length_and_null_extras() -> None:
    sse = vllm_stream({"content": "x", "reasoning_content": None, "tool_calls": []}, finish_reason="length")
    body = record(sse)
    assert body is not None and orjson.loads(body)["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "sse",
    [
        pytest.param(vllm_stream({"content": "x"}, done=False), id="no-done"),
        pytest.param(vllm_stream({"content": "x"}, finish_reason=None), id="no-finish-reason"),
        pytest.param(vllm_stream({"content": "x"}, finish_reason="abort"), id="aborted"),
        pytest.param(vllm_stream({"content": "x"}, finish_reason="tool_calls"), id="tool-calls-finish"),
        pytest.param(
            vllm_stream({"content": "x"})[: -len(b"data: [DONE]\n\n")]
            + b'data: {"error": {"message": "boom", "type": "stream_interrupted"}}\n\n'
            + b"data: [DONE]\n\n",
            id="error-event",
        ),
        pytest.param(b"data: {not json\n\n" + vllm_stream({"content": "x"}), id="unparsable"),
        pytest.param(vllm_stream({"content": "x"}) + vllm_stream({"content": "y"}), id="data-after-done"),
        pytest.param(vllm_stream({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f"}}]}), id="tools"),
        pytest.param(vllm_stream({"content": "x", "reasoning_content": "hmm"}), id="reasoning"),
        pytest.param(b"event: error\n" + vllm_stream({"content": "x"}), id="named-event"),
        pytest.param(b"data: [DONE]\n\n", id="empty"),
        pytest.param(vllm_stream({"content": "x"}).replace(b'"logprobs":null', b'"logprobs":{"content":[]}'), id="lp"),
    ],
)
def test_recorder_refuses_incomplete_or_unclean_streams(sse: bytes) -> None:
    assert record(sse) is None
    assert record(sse, pieces=5) is None


def test_recorder_refuses_content_after_finish() -> None:
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks = [
        {**head, "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "b"}, "finish_reason": None}]},
    ]
    sse = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    assert record(sse) is None


def test_recorder_gives_up_past_max_bytes() -> None:
    sse = vllm_stream({"content": "x" * 100}, {"content": "y" * 100})
    small = StreamRecorder(max_bytes=150)
    small.feed(sse)
    assert small.completion() is None
    large = StreamRecorder(max_bytes=10_000)
    large.feed(sse)
    assert large.completion() is not None


@pytest.mark.parametrize(
    ("body", "cacheable"),
    [
        (completion("hi"), True),
        (completion("hi", finish_reason="length"), True),
        (completion("hi", "there"), True),
        (completion("hi", usage=None), True),
        (completion("hi", finish_reason="abort"), False),
        (completion("hi", finish_reason="tool_calls"), False),
        (completion("hi", object="chat.completion.chunk"), False),
        (completion("hi", choices=[]), False),
        (b'{"error": {"message": "no"}}', False),
        (b"not json", False),
        (b"[]", False),
    ],
)
def test_completion_is_cacheable(body: bytes, cacheable: bool) -> None:
    assert completion_is_cacheable(body) is cacheable


def test_tool_calls_reasoning_and_logprobs_are_not_cacheable() -> None:
    doc = orjson.loads(completion("hi"))
    tool = orjson.loads(orjson.dumps(doc))
    tool["choices"][0]["message"]["tool_calls"] = [{"id": "c", "type": "function", "function": {"name": "f"}}]
    reasoning = orjson.loads(orjson.dumps(doc))
    reasoning["choices"][0]["message"]["reasoning_content"] = "hmm"
    logprobs = orjson.loads(orjson.dumps(doc))
    logprobs["choices"][0]["logprobs"] = {"content": []}
    for variant in (tool, reasoning, logprobs):
        assert not completion_is_cacheable(orjson.dumps(variant))


@pytest.mark.parametrize("include_usage", [True, False])
def test_recorder_says_whether_the_stream_carried_usage(include_usage: bool) -> None:
    recorder = StreamRecorder()
    recorder.feed(completion_to_sse(completion("a red mug"), include_usage=include_usage))
    assert recorder.has_usage is include_usage
    assert recorder.completion() is not None
