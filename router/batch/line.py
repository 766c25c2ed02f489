"""How a batch line reaches the chat handler: as an in-process ASGI request whose scope carries a BatchLine
(the job's owner and id), so the line passes the same edge, quota, cache, proxy, metrics and audit as a
client's request, at batch priority. No HTTP client can set a scope key: the marker cannot be forged."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message

from router.auth import ApiKey
from router.edge import BatchTicket

BATCH_LINE = "qvl.batch_line"
"""The ASGI scope key of a batch line."""


@dataclass(frozen=True, slots=True)
class BatchLine:
    key: ApiKey
    """The key that created the batch: its models and quotas apply."""
    batch_id: str
    ticket: BatchTicket = field(default_factory=BatchTicket)
    versions: dict[str, str] = field(default_factory=dict)
    """Model -> the version the job was pinned to when it was created."""


@dataclass(slots=True)
class LineAnswer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


async def call_chat(chat: ASGIApp, line: BatchLine, body: bytes, request_id: str) -> LineAnswer:
    """POST `body` to the chat handler in this process; the whole (non-streamed) answer."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())],
        "client": None,
        "server": None,
        BATCH_LINE: line,
    }
    answer = LineAnswer()
    sent = False
    never = asyncio.Event()

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # nobody disconnects: the handler's watcher waits here until it is cancelled
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            answer.body += message.get("body", b"")

    await chat(scope, receive, send)
    return answer
