"""The simulated engine's scheduler and latency model: no HTTP, no GPU, just asyncio and arithmetic.

Latency model (every term in `SimSettings`, milliseconds):

    TTFT = queueing + ttft_base + ttft_per_prompt_token * text tokens
                    + ttft_per_image_token * image tokens of every image not in the mm cache
    ITL  = itl_base + itl_per_running * (running - 1)      (read afresh before every token)

At most `max_running` requests run at once; the rest wait in a FIFO queue. The mm cache is an LRU
of `mm_cache_items` image digests, consulted when a request is scheduled; a hit skips that image's
encode cost and counts as an mm-cache hit and as prefix-cache hits of its image tokens.

Streaming convention: `engine.submit(request)` checks the request and returns a `Generation`; use it
as an async context manager (entering waits for a slot, exiting frees it, whatever happened in
between) and iterate `generation.tokens()` for the index of each output token as it is produced.
Cancelling the task that holds the generation, queued or running, frees its place immediately.
With every latency term at zero nothing sleeps: a request with a free slot never yields.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType

from qvl.settings import SimSettings
from serving.sim.metrics import SimMetrics


class RequestRejected(ValueError):
    """The engine cannot take the request (it does not fit the context); the message is for the client."""


@dataclass(frozen=True, slots=True)
class ImageInput:
    """One image of a prompt: the SHA-256 of its decoded bytes and the tokens it costs."""

    digest: bytes
    tokens: int


@dataclass(frozen=True, slots=True)
class SimRequest:
    """What the engine needs of a chat request: prompt size, images, and the requested output cap."""

    text_tokens: int
    images: Sequence[ImageInput] = ()
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """The latency terms in seconds; `zero` when every term is zero (the no-sleep path)."""

    ttft_base: float
    ttft_per_prompt_token: float
    ttft_per_image_token: float
    itl_base: float
    itl_per_running: float

    @classmethod
    def from_settings(cls, settings: SimSettings) -> LatencyModel:
        return cls(
            ttft_base=settings.ttft_base_ms / 1000,
            ttft_per_prompt_token=settings.ttft_per_prompt_token_ms / 1000,
            ttft_per_image_token=settings.ttft_per_image_token_ms / 1000,
            itl_base=settings.itl_base_ms / 1000,
            itl_per_running=settings.itl_per_running_ms / 1000,
        )

    @property
    def zero(self) -> bool:
        return not (
            self.ttft_base
            or self.ttft_per_prompt_token
            or self.ttft_per_image_token
            or self.itl_base
            or self.itl_per_running
        )

    def prefill(self, text_tokens: int, uncached_image_tokens: int) -> float:
        """Seconds from scheduling to the first token."""
        return (
            self.ttft_base
            + self.ttft_per_prompt_token * text_tokens
            + self.ttft_per_image_token * uncached_image_tokens
        )

    def inter_token(self, running: int) -> float:
        """Seconds between two tokens while `running` requests decode together."""
        return self.itl_base + self.itl_per_running * max(running - 1, 0)


class SimEngine:
    """One simulated replica: slots, a FIFO queue, the mm-cache LRU and the metrics they feed."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.latency = LatencyModel.from_settings(settings)
        self.metrics = SimMetrics(settings.model, self)
        self._max_running = settings.max_running
        self._running = 0
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._mm_cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def max_running(self) -> int:
        return self._max_running

    def has_free_slot(self) -> bool:
        """Whether a request submitted now would start without queueing."""
        return self._running < self._max_running and not self._queue

    def submit(self, request: SimRequest) -> Generation:
        """A generation for `request`, not yet admitted; raises RequestRejected if it cannot fit."""
        max_len = self.settings.max_model_len
        prompt = request.text_tokens + sum(image.tokens for image in request.images)
        if prompt >= max_len:
            raise RequestRejected(
                f"This model's maximum context length is {max_len} tokens. However, your request has "
                f"{prompt} input tokens. Please reduce the length of the input messages."
            )
        wanted = request.max_tokens
        if wanted is not None and prompt + wanted > max_len:
            raise RequestRejected(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{prompt + wanted} tokens ({prompt} in the messages, {wanted} in the completion). "
                "Please reduce the length of the messages or completion."
            )
        # The simulated model "decides" to stop after output_tokens; a smaller cap, or the end of
        # the context, cuts it short.
        natural = self.settings.output_tokens
        if wanted is not None and wanted <= natural:
            return Generation(self, request, prompt, wanted, "length")
        if natural > max_len - prompt:
            return Generation(self, request, prompt, max_len - prompt, "length")
        return Generation(self, request, prompt, natural, "stop")

    async def _acquire(self) -> None:
        if self._running < self._max_running and not self._queue:
            self._running += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._queue.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just before the cancellation landed: pass it on.
                self._release()
            elif waiter in self._queue:
                # _release may already have skipped past it (cancelled futures count as done).
                self._queue.remove(waiter)
            raise

    def _release(self) -> None:
        # Hand the slot straight to the oldest waiter, so `running` never dips and FIFO holds.
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._running -= 1

    def _lookup_images(self, images: Sequence[ImageInput]) -> tuple[int, int]:
        """(cache hits, image tokens still to encode); inserts every digest, most recent last."""
        hits = uncached = 0
        capacity = self.settings.mm_cache_items
        cache = self._mm_cache
        for image in images:
            if image.digest in cache:
                cache.move_to_end(image.digest)
                hits += 1
                continue
            uncached += image.tokens
            if capacity:
                cache[image.digest] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
        return hits, uncached


class Generation:
    """One request inside the engine; an async context manager that holds a slot while entered."""

    __slots__ = (
        "_admitted",
        "_arrived",
        "_engine",
        "_request",
        "cached_tokens",
        "completion_tokens",
        "finish_reason",
        "generated",
        "image_hits",
        "prompt_tokens",
        "uncached_image_tokens",
    )

    def __init__(
        self, engine: SimEngine, request: SimRequest, prompt_tokens: int, completion_tokens: int, reason: str
    ) -> None:
        self._engine = engine
        self._request = request
        self._arrived = time.perf_counter()
        self._admitted = False
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.finish_reason = reason
        self.generated = 0
        self.image_hits = 0
        self.cached_tokens = 0
        self.uncached_image_tokens = 0

    async def __aenter__(self) -> Generation:
        engine = self._engine
        await engine._acquire()
        self._admitted = True
        images = self._request.images
        if images:
            self.image_hits, self.uncached_image_tokens = engine._lookup_images(images)
            self.cached_tokens = sum(image.tokens for image in images) - self.uncached_image_tokens
        engine.metrics.record_prefill(self.prompt_tokens, self.cached_tokens, len(images), self.image_hits)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._admitted:
            return
        self._admitted = False
        engine = self._engine
        engine._release()
        if self.generated == self.completion_tokens:
            e2e = time.perf_counter() - self._arrived
            engine.metrics.record_finished(self.finish_reason, self.generated, e2e)
        else:
            engine.metrics.record_finished("abort", self.generated, None)

    async def tokens(self) -> AsyncIterator[int]:
        """Yield 0, 1, ... completion_tokens - 1, each when the latency model says it is produced."""
        engine = self._engine
        latency = engine.latency
        metrics = engine.metrics
        sleeps = not latency.zero
        if sleeps:
            delay = latency.prefill(self._request.text_tokens, self.uncached_image_tokens)
            if delay > 0:
                await asyncio.sleep(delay)
        last = time.perf_counter()
        metrics.record_first_token(last - self._arrived)
        self.generated = 1
        yield 0
        for index in range(1, self.completion_tokens):
            if sleeps:
                delay = latency.inter_token(engine.running)
                if delay > 0:
                    await asyncio.sleep(delay)
            now = time.perf_counter()
            metrics.record_inter_token(now - last)
            last = now
            self.generated = index + 1
            yield index
