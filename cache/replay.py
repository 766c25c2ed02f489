"""Converting between the stored form of an answer and streams: pure functions, no I/O.

The stored form is a non-streamed `chat.completion` JSON body. A streamed answer is recorded into
that form (StreamRecorder) and a stored one is replayed as the SSE stream vLLM would have sent
(completion_to_sse), so one entry serves both `"stream": true` and `false`.

Only plain text answers take part: each choice's message carries role and content and nothing else
that is set (no tool calls, no reasoning, no refusal), its `logprobs` are null and its finish_reason
is "stop" or "length". Anything else is not cacheable, because replaying it faithfully in both
shapes would need much more than this module does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

CACHEABLE_FINISH_REASONS = frozenset({"stop", "length"})

_DONE = b"[DONE]"
# Choice fields allowed to carry a value; any other must be null or empty.
_CHOICE_FIELDS = frozenset({"index", "message", "finish_reason", "logprobs", "stop_reason"})


def completion_is_cacheable(body: bytes) -> bool:
    """True for a complete plain-text chat.completion body (see the module docstring); never raises."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(doc, dict) or doc.get("object") != "chat.completion" or not isinstance(doc.get("id"), str):
        return False
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    return all(_choice_cacheable(choice) for choice in choices)


def completion_to_sse(body: bytes, include_usage: bool) -> bytes:
    """The whole SSE byte stream (`data: {chunk}` events, then `data: [DONE]`) replaying a stored completion.

    Per choice: a role event, one content event (when there is content), an event with an empty
    delta and the finish_reason; then, if include_usage and the body has usage, one event with no
    choices and the usage. `body` must satisfy completion_is_cacheable; raises ValueError otherwise.
    """
    if not completion_is_cacheable(body):
        raise ValueError("not a cacheable chat.completion body")
    doc = orjson.loads(body)
    head: dict[str, Any] = {
        "id": doc["id"],
        "object": "chat.completion.chunk",
        "created": doc.get("created", 0),
        "model": doc.get("model", ""),
    }
    if doc.get("system_fingerprint") is not None:
        head["system_fingerprint"] = doc["system_fingerprint"]
    out = bytearray()
    for choice in doc["choices"]:
        index = choice.get("index", 0)
        content = choice["message"].get("content") or ""
        deltas: list[tuple[dict[str, Any], str | None]] = [({"role": "assistant", "content": ""}, None)]
        if content:
            deltas.append(({"content": content}, None))
        deltas.append(({}, choice["finish_reason"]))
        for delta, finish_reason in deltas:
            event = {
                **head,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            out += _event(orjson.dumps(event))
    if include_usage and doc.get("usage") is not None:
        out += _event(orjson.dumps({**head, "choices": [], "usage": doc["usage"]}))
    out += _event(_DONE)
    return bytes(out)


@dataclass
class _Choice:
    content: list[str] = field(default_factory=list)
    finish_reason: str | None = None


class StreamRecorder:
    """Rebuilds the chat.completion body of an SSE chat stream, fed in arbitrary byte pieces.

    `completion()` is None unless the stream was complete and clean: it ended with `[DONE]`, carried
    no error event, every choice finished with "stop" or "length", and every delta held only role and
    content (see the module docstring). `max_bytes` caps what is kept (pending bytes plus content);
    past it the recorder stops recording and `completion()` is None, so an answer too large to store
    costs no memory.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self._max_bytes = max_bytes
        self._pending = bytearray()
        self._data: list[bytes] = []
        self._failed = False
        self._done = False
        self._head: dict[str, Any] | None = None
        self._choices: dict[int, _Choice] = {}
        self._content_bytes = 0
        self._usage: Any = None

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the stream (events may be split anywhere, including inside a line)."""
        if self._failed:
            return
        self._pending += chunk
        start = 0
        while not self._failed:
            end = self._pending.find(b"\n", start)
            if end < 0:
                break
            self._line(bytes(self._pending[start:end]).removesuffix(b"\r"))
            start = end + 1
        del self._pending[:start]
        if self._max_bytes is not None and len(self._pending) + self._content_bytes > self._max_bytes:
            self._fail()

    @property
    def has_usage(self) -> bool:
        """Whether the stream carried usage (the client asked for stream_options.include_usage)."""
        return self._usage is not None

    def completion(self) -> bytes | None:
        """The equivalent chat.completion body, or None if the stream is not complete and clean."""
        if self._failed or not self._done or self._head is None or not self._choices or self._pending.strip():
            return None
        choices = []
        for index in sorted(self._choices):
            choice = self._choices[index]
            if choice.finish_reason not in CACHEABLE_FINISH_REASONS:
                return None
            message = {"role": "assistant", "content": "".join(choice.content)}
            choices.append(
                {"index": index, "message": message, "logprobs": None, "finish_reason": choice.finish_reason}
            )
        doc: dict[str, Any] = {**self._head, "object": "chat.completion", "choices": choices}
        if self._usage is not None:
            doc["usage"] = self._usage
        return orjson.dumps(doc)

    def _fail(self) -> None:
        self._failed = True
        self._pending.clear()
        self._data.clear()
        self._choices.clear()

    def _line(self, line: bytes) -> None:
        # SSE: `field: value` lines, an empty line ends an event, lines starting with ":" are comments.
        if not line:
            if self._data:
                data, self._data = b"\n".join(self._data), []
                self._event(data)
            return
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            self._data.append(value)
        elif name == b"event" and value != b"message":
            self._fail()  # vLLM sends none; a named event (an error, say) is not part of an answer
        # `id` and `retry` do not change the answer.

    def _event(self, data: bytes) -> None:
        if self._done:
            self._fail()  # nothing may follow [DONE]
            return
        if data == _DONE:
            self._done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._fail()
            return
        if not isinstance(chunk, dict) or "error" in chunk or chunk.get("object") != "chat.completion.chunk":
            self._fail()
            return
        if self._head is None:
            if not isinstance(chunk.get("id"), str):
                self._fail()
                return
            self._head = {"id": chunk["id"], "created": chunk.get("created", 0), "model": chunk.get("model", "")}
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not all(self._choice(choice) for choice in choices):
            self._fail()

    def _choice(self, part: Any) -> bool:
        """Apply one choice of a chunk; False if the stream can no longer be cached."""
        if not isinstance(part, dict) or not isinstance(part.get("index"), int) or part.get("logprobs") is not None:
            return False
        choice = self._choices.setdefault(part["index"], _Choice())
        delta = part.get("delta")
        if not isinstance(delta, dict):
            return False
        for name, value in delta.items():
            if name == "role":
                if value not in (None, "assistant"):
                    return False
            elif name == "content":
                if value is None:
                    continue
                if not isinstance(value, str) or (value and choice.finish_reason is not None):
                    return False
                choice.content.append(value)
                self._content_bytes += len(value.encode())
            elif not _empty(value):
                return False
        finish_reason = part.get("finish_reason")
        if finish_reason is not None:
            if choice.finish_reason is not None or not isinstance(finish_reason, str):
                return False
            choice.finish_reason = finish_reason
        return True


def _choice_cacheable(choice: Any) -> bool:
    if not isinstance(choice, dict) or choice.get("finish_reason") not in CACHEABLE_FINISH_REASONS:
        return False
    if choice.get("logprobs") is not None or not isinstance(choice.get("index", 0), int):
        return False
    if any(not _empty(value) for name, value in choice.items() if name not in _CHOICE_FIELDS):
        return False
    message = choice.get("message")
    if not isinstance(message, Mapping) or message.get("role", "assistant") != "assistant":
        return False
    if not isinstance(message.get("content"), str | None):
        return False
    return all(_empty(value) for name, value in message.items() if name not in ("role", "content"))


def _empty(value: Any) -> bool:
    # vLLM fills unused message fields with null or [] (tool_calls); those carry nothing to replay.
    return value is None or value == [] or value == "" or value == {}


def _event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"
