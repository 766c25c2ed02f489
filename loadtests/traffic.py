"""Shop-shaped chat traffic for a running router, used by `make dashboards-preview` and the live
Prometheus test so that every panel has something to show.

The mix, per request: catalogue questions about a few popular product photos (greedy, so the answer
cache hits), the same streamed with usage, fresh customer uploads (sampled, so never cached), clients
that give up after the first streamed chunk, and a trickle of broken requests (unknown model,
malformed JSON, bad base64) such as real clients send.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from PIL import Image, ImageDraw

SIZES = ((640, 640), (800, 600), (512, 768))
QUESTIONS = (
    "What product is shown? Answer with a short title.",
    "What colour is the product?",
    "Is there any visible damage on this item?",
    "Write a one-sentence listing description.",
)


def product_photo(rng: random.Random) -> str:
    """A PNG data URL: a coloured product shape on a white background, in a typical listing size."""
    width, height = rng.choice(SIZES)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    box = (width // 5, height // 5, width * 4 // 5, height * 4 // 5)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        draw.rectangle(box, fill=colour)
    else:
        draw.ellipse(box, fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(model: str, image: str, question: str, **extra: object) -> dict[str, object]:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": image}}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 24, **extra}


@dataclass
class TrafficReport:
    """What the clients saw: HTTP statuses by request kind, transport errors, abandoned streams."""

    statuses: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    transport_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    abandoned: int = 0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + sum(self.transport_errors.values()) + self.abandoned


class ShopTraffic:
    """Closed-loop clients: each sends its next request as soon as the previous one is answered."""

    def __init__(self, url: str, model: str, *, seed: int = 0, products: int = 12) -> None:
        self._url = url
        self._model = model
        self._rng = random.Random(seed)
        self._catalogue = [product_photo(self._rng) for _ in range(products)]
        # Popularity falls off like a long-tailed catalogue: product i is asked about ~1/(i+1) as often.
        self._weights = [1 / (i + 1) for i in range(products)]
        self.report = TrafficReport()

    async def run(self, seconds: float, concurrency: int, tick: Callable[[float], None] | None = None) -> None:
        """Send traffic for `seconds`; `tick(elapsed)` is called about once a second (progress, faults)."""
        limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(base_url=self._url, timeout=60, limits=limits) as client:

            async def worker() -> None:
                while time.monotonic() < deadline:
                    await self._one(client)

            async def ticker() -> None:
                began = time.monotonic()
                while time.monotonic() < deadline:
                    await asyncio.sleep(1.0)
                    if tick is not None:
                        tick(time.monotonic() - began)

            await asyncio.gather(ticker(), *(worker() for _ in range(concurrency)))

    async def _one(self, client: httpx.AsyncClient) -> None:
        rng = self._rng
        roll = rng.random()
        question = rng.choice(QUESTIONS[:2])
        popular = rng.choices(self._catalogue, self._weights)[0]
        if roll < 0.40:
            await self._post(client, "catalogue", chat(self._model, popular, question, temperature=0))
        elif roll < 0.65:
            doc = chat(self._model, popular, question, temperature=0, stream=True)
            await self._stream(client, "catalogue-stream", {**doc, "stream_options": {"include_usage": True}})
        elif roll < 0.90:
            doc = chat(self._model, product_photo(rng), rng.choice(QUESTIONS), temperature=0.7)
            if rng.random() < 0.5:
                await self._post(client, "upload", doc)
            else:
                await self._stream(client, "upload-stream", {**doc, "stream": True})
        elif roll < 0.95:
            await self._stream(client, "abandoned", chat(self._model, popular, question, stream=True), give_up=True)
        else:
            await self._broken(client, rng.randrange(3), popular)

    async def _post(self, client: httpx.AsyncClient, kind: str, doc: dict[str, object]) -> None:
        try:
            response = await client.post("/v1/chat/completions", json=doc)
            self.report.statuses[kind, response.status_code] += 1
        except httpx.HTTPError as exc:
            self.report.transport_errors[type(exc).__name__] += 1

    async def _stream(
        self, client: httpx.AsyncClient, kind: str, doc: dict[str, object], give_up: bool = False
    ) -> None:
        try:
            async with client.stream("POST", "/v1/chat/completions", json=doc) as response:
                async for _ in response.aiter_bytes():
                    if give_up:
                        # Leaving the block closes the connection: the router sees the client go away.
                        self.report.abandoned += 1
                        return
            self.report.statuses[kind, response.status_code] += 1
        except httpx.HTTPError as exc:
            self.report.transport_errors[type(exc).__name__] += 1

    async def _broken(self, client: httpx.AsyncClient, which: int, image: str) -> None:
        if which == 0:
            await self._post(client, "unknown-model", chat("no-such-model", image, "What is this?"))
        elif which == 1:
            try:
                response = await client.post("/v1/chat/completions", content=b'{"model": "x", "messages": [')
                self.report.statuses["malformed-json", response.status_code] += 1
            except httpx.HTTPError as exc:
                self.report.transport_errors[type(exc).__name__] += 1
        else:
            await self._post(client, "bad-base64", chat(self._model, "data:image/png;base64,!!not-base64!!", "Hi"))
