"""Batch input files for tests, waiting for a batch to end, and the type of the `openai_client` fixture."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import openai
from openai.types import Batch

OpenAIClient = Callable[..., openai.OpenAI]
"""`openai_client(url, key="unused")` (tests/conftest.py): an official client closed when the test ends."""

END = ("completed", "failed", "expired", "cancelled")


def batch_lines(model: str, n: int, *, image_url: str | None = None, max_tokens: int = 4, prefix: str = "req") -> bytes:
    """`n` valid lines (custom_id `<prefix>-<i>`), each a chat request, with the image when given."""
    lines = []
    for i in range(n):
        content: list[dict] = [{"type": "text", "text": f"Describe product {i}."}]
        if image_url is not None:
            content.append({"type": "image_url", "image_url": {"url": image_url}})
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        lines.append(
            json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    return ("\n".join(lines) + "\n").encode()


def wait_batch(client: openai.OpenAI, batch_id: str, timeout: float, until: tuple[str, ...] = END) -> Batch:
    """Poll until the batch's status is one of `until`; fails the test after `timeout` seconds."""
    started = time.monotonic()
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() - started < timeout, f"batch {batch_id} still {batch.status} ({batch.request_counts})"
        time.sleep(0.1)


def jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]
