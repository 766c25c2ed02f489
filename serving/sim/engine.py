"""The simulated engine in real time: one `EngineCore` (serving/sim/core.py, the latency model) stepped
by the event loop's clock, and the per-request handles the HTTP layer streams from.

A stepper task (started on the running loop by the first request, idle on a future while the core is)
repeats: `plan()` the next step, sleep until the step's end, `finish()` it, then wake every running
request so it can pass on its new token. Step ends are deadlines on the loop's clock (each the last
one plus the step's duration), so the small lateness of every sleep does not add up over a stream.

Streaming convention: `engine.submit(request)` checks the request and returns a `Generation`; use it
as an async context manager (entering waits out the front-end delay, then until the core admits the
request, i.e. plans its prefill step; exiting removes it from the core if it has not finished) and
iterate `generation.tokens()` for the index of each output token once the engine has produced it.
Cancelling the task that holds the generation, queued or running, aborts it in the core at once.
The engine's own metrics (TTFT, inter-token, end-to-end) are taken when a step ends, as vLLM's are,
whatever pace the client reads at.

With every cost zero (`--zero-delay`, for throughput tests) nothing sleeps and nothing waits, and no
stepper task runs. A request's own task steps the core synchronously until the core admits it (a step
takes no time, so running one early changes nothing; when the batch is full, those steps run the
requests in it to their end); the core's queue, batch limits, mm cache and counts still apply. Its
tokens then pass without further steps, timed as the client takes them, and leaving takes it out of the
core (unless later admissions' steps already ran it to its end there). So a request never yields to the
loop, and costs a few core operations rather than one step per token: the router benchmarks measure
the router, not the simulator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

from qvl.settings import SimSettings
from serving.sim.core import CoreImage, CoreRequest, EngineCore, StepCosts
from serving.sim.metrics import SimMetrics

ImageInput = CoreImage
"""One image of a prompt: the SHA-256 of its decoded bytes and the tokens it costs (the core's type, so
a request's images reach the core without a copy)."""


class RequestRejected(ValueError):
    """The engine cannot take the request (it does not fit the context); the message is for the client."""


@dataclass(frozen=True, slots=True)
class SimRequest:
    """What the engine needs of a chat request: prompt size, images, and the requested output cap."""

    text_tokens: int
    images: Sequence[ImageInput] = ()
    max_tokens: int | None = None
    priority: int = 0
    """vLLM's request priority: under the `priority` policy lower values are admitted first."""


def step_costs(settings: SimSettings) -> StepCosts:
    """The core's step-time model from the settings' terms (milliseconds to seconds)."""
    return StepCosts(
        step_base=settings.step_base_ms / 1000,
        per_decode=settings.per_decode_ms / 1000,
        per_kv_ktoken=settings.per_kv_ktoken_ms / 1000,
        prefill_base=settings.prefill_base_ms / 1000,
        per_text_token=settings.per_text_token_ms / 1000,
        per_image_token=settings.per_image_token_ms / 1000,
        image_hit_discount=settings.image_hit_discount,
    )


class SimEngine:
    """One simulated replica: an engine core, the task that steps it in real time, and its metrics.

    `clock` times the metrics (seconds, any origin); a test on a virtual-time loop passes the loop's.
    """

    def __init__(self, settings: SimSettings, clock: Callable[[], float] = time.perf_counter) -> None:
        self.settings = settings
        self.costs = step_costs(settings)
        self.core = EngineCore(
            self.costs,
            settings.max_running,
            settings.max_batched_tokens,
            settings.mm_cache_items,
            settings.scheduling_policy,
        )
        self.metrics = SimMetrics(settings.model, self)
        self.clock = clock
        self._frontend_base = settings.frontend_base_ms / 1000
        self._frontend_per_image_token = settings.frontend_per_image_token_ms / 1000
        self.zero = self.costs.zero and not (self._frontend_base or self._frontend_per_image_token)
        """Whether nothing ever takes time: then no request sleeps, waits or yields to the loop."""
        self._planned = False  # a step is planned and not yet finished
        self._stepper: asyncio.Task[None] | None = None
        self._idle: asyncio.Future[None] | None = None  # what the stepper waits on while the core is idle
        # KV tokens of a pool holding max_running full contexts: the simulator never runs out of KV.
        self._kv_capacity = settings.max_running * settings.max_model_len

    @property
    def running(self) -> int:
        return len(self.core.running)

    @property
    def waiting(self) -> int:
        """Every submitted request not yet admitted."""
        return self.core.waiting

    @property
    def waiting_seen(self) -> int:
        """The waiting requests vLLM's gauge would show (see serving/sim/core.py)."""
        return self.core.waiting_seen

    @property
    def max_running(self) -> int:
        return self.core.max_running

    @property
    def kv_cache_usage(self) -> float:
        """KV tokens held by running requests, as a share of max_running full contexts."""
        return min(self.core.kv_tokens() / self._kv_capacity, 1.0)

    def has_free_slot(self) -> bool:
        """Whether a request submitted now would be admitted by the next step without queueing."""
        return len(self.core.running) < self.core.max_running and not self.core.waiting

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
            return Generation(self, request, wanted, "length")
        if natural > max_len - prompt:
            return Generation(self, request, max_len - prompt, "length")
        return Generation(self, request, natural, "stop")

    def frontend_seconds(self, request: SimRequest) -> float:
        """Time `request` spends before the engine sees it."""
        if not self._frontend_per_image_token:
            return self._frontend_base
        return self._frontend_base + self._frontend_per_image_token * sum(image.tokens for image in request.images)

    # The stepping itself: shared by the stepper task and the zero-cost path.

    def _add(self, generation: Generation) -> None:
        self.core.add(generation.core_request)

    def _plan(self) -> float | None:
        """Plan the next step (None when the core is idle) and account for the requests it admits."""
        duration = self.core.plan()
        if duration is None:
            return None
        self._planned = True
        metrics = self.metrics
        for core_request in self.core.admitting:
            generation: Generation = core_request.handle  # type: ignore[assignment]
            generation._admit(metrics)
        return duration

    def _finish(self) -> None:
        """Finish the planned step: time its tokens, retire the finished, wake every waiting generation."""
        self._planned = False
        outcome = self.core.finish()
        if self.zero:
            return  # each generation times its own tokens (see the module docstring)
        now = self.clock()
        step = outcome.index
        metrics = self.metrics
        for core_request in self.core.running:
            generation: Generation = core_request.handle  # type: ignore[assignment]
            generation._produced(metrics, now, step)
        for core_request in outcome.finished:
            generation = core_request.handle  # type: ignore[assignment]
            generation._produced(metrics, now, step)
            generation._finished(metrics, now)

    def _step_now(self) -> None:
        """The zero-cost path: run the next step at once (finishing the planned one, or planning one)."""
        if self._planned:
            self._finish()
        elif self._plan() is None:
            raise RuntimeError("the engine core is idle, yet a request waits for admission")

    def _ensure_stepper(self) -> None:
        loop = asyncio.get_running_loop()
        stepper = self._stepper
        # A new loop (a test calling asyncio.run again) ends the old loop's stepper: start one here.
        if stepper is None or stepper.done() or stepper.get_loop() is not loop:
            self._idle = None
            self._stepper = loop.create_task(self._step_forever(loop), name="sim-engine-stepper")
        elif self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def _step_forever(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if self._planned:
                self._finish()  # left planned by the stepper of a loop that has ended
            deadline = loop.time()
            while True:
                duration = self._plan()
                if duration is None:
                    self._idle = loop.create_future()
                    await self._idle
                    self._idle = None
                    deadline = loop.time()
                    continue
                now = loop.time()
                deadline += duration
                if deadline < now:
                    # Late by more than this whole step (the loop stalled): start the schedule afresh
                    # rather than rush through steps of no length to catch up.
                    deadline = now + duration
                # Always yield, so that even a step of no length lets the woken requests run.
                await asyncio.sleep(deadline - now)
                self._finish()
        finally:
            self._idle = None
            if self._planned and not loop.is_closed():
                self._finish()


class Generation:
    """One request inside the engine; an async context manager that keeps it in the core while entered."""

    __slots__ = (
        "_arrived",
        "_done",
        "_engine",
        "_last",
        "_request",
        "_sent",
        "_waiter",
        "completion_tokens",
        "core_request",
        "finish_reason",
        "prompt_tokens",
    )

    def __init__(self, engine: SimEngine, request: SimRequest, completion_tokens: int, reason: str) -> None:
        self._engine = engine
        self._request = request
        self._arrived = engine.clock()
        self._last = 0.0  # when the engine produced this request's latest token
        self._done = False  # the engine produced every token (or the request was aborted)
        self._sent = 0  # tokens passed on (kept by the zero-cost path only)
        self._waiter: asyncio.Future[None] | None = None
        self.core_request = CoreRequest(
            request.text_tokens, request.images, completion_tokens, handle=self, priority=request.priority
        )
        self.prompt_tokens = self.core_request.prompt_tokens
        self.completion_tokens = completion_tokens
        self.finish_reason = reason

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the mm cache (known once admitted)."""
        return self.core_request.hit_image_tokens

    @property
    def image_hits(self) -> int:
        """Images found in the mm cache (known once admitted)."""
        return self.core_request.image_hits

    @property
    def generated(self) -> int:
        """Tokens the engine has produced for this request so far."""
        return self.core_request.generated(self._engine.core.steps_done)

    async def __aenter__(self) -> Generation:
        engine = self._engine
        if engine.zero:
            engine._add(self)
            while not self.core_request.admitted:
                engine._step_now()
            return self
        frontend = engine.frontend_seconds(self._request)
        if frontend > 0:
            await asyncio.sleep(frontend)
        engine._add(self)
        engine._ensure_stepper()
        try:
            while not self.core_request.admitted:
                await self._wait_for_step()
        except asyncio.CancelledError:
            self._leave()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._leave()

    async def tokens(self) -> AsyncIterator[int]:
        """Yield 0, 1, ... completion_tokens - 1, each once the engine has produced it."""
        engine = self._engine
        if engine.zero:
            metrics, clock = engine.metrics, engine.clock
            last = clock()
            metrics.record_first_token(last - self._arrived)
            self._sent = 1
            yield 0
            for index in range(1, self.completion_tokens):
                now = clock()
                metrics.record_inter_token(now - last)
                last = now
                self._sent = index + 1
                yield index
            return
        core_request = self.core_request
        core = engine.core
        sent = 0
        total = self.completion_tokens
        while sent < total:
            ready = core_request.generated(core.steps_done)
            if ready > sent:
                for index in range(sent, ready):
                    yield index
                sent = ready
            elif core_request.aborted:
                return
            else:
                await self._wait_for_step()

    async def _wait_for_step(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _admit(self, metrics: SimMetrics) -> None:
        """The core planned this request's prefill step."""
        request = self.core_request
        metrics.record_prefill(request.prompt_tokens, request.hit_image_tokens, len(request.images), request.image_hits)
        self._wake()

    def _produced(self, metrics: SimMetrics, now: float, step: int) -> None:
        """A step that gave this request a token ended at `now`."""
        if self.core_request.first_step == step:
            metrics.record_first_token(now - self._arrived)
        else:
            metrics.record_inter_token(now - self._last)
        self._last = now
        self._wake()

    def _finished(self, metrics: SimMetrics, now: float) -> None:
        self._done = True
        metrics.record_finished(self.finish_reason, self.completion_tokens, now - self._arrived)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _leave(self) -> None:
        """Take the request out of the core unless it finished there; an admitted one counts as aborted."""
        if self._done:
            return
        self._done = True
        engine = self._engine
        request = self.core_request
        # At zero cost this also retires a request whose tokens all went out: no step has to run for it.
        engine.core.abort(request)
        if engine.zero:
            if self._sent == self.completion_tokens:
                engine.metrics.record_finished(self.finish_reason, self._sent, engine.clock() - self._arrived)
            else:
                engine.metrics.record_finished("abort", self._sent, None)
        elif request.admitted:
            engine.metrics.record_finished("abort", request.generated(engine.core.steps_done), None)
