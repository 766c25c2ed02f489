"""The simulated engine in real time: request checks, step timing, FIFO queueing, the mm cache, cancellation,
and the zero-cost path that never yields.

Timing is checked on an event loop with a virtual clock: it never waits, it moves its clock to the next
timer instead, so every time the engine reads is exactly what the latency model says, however busy the
machine running the tests is.
"""

from __future__ import annotations

import asyncio
import itertools
import selectors
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from qvl.settings import SimSettings
from serving.sim.engine import Generation, ImageInput, RequestRejected, SimEngine, SimRequest, step_costs

T = TypeVar("T")
ZERO = SimSettings(model="m").zero_delay()


def settings(**fields: Any) -> SimSettings:
    return ZERO.model_copy(update=fields)


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Selector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Polls without blocking; when nothing is ready, moves the clock by the time the loop would wait."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("deadlock: nothing is scheduled and nothing can arrive")
        self.clock.now += timeout
        return ready


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(_Selector(clock))
        self.clock = clock

    def time(self) -> float:
        return self.clock.now


def run_virtual(clock: VirtualClock, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=lambda: VirtualLoop(clock)) as runner:
        return runner.run(main())


async def generate(engine: SimEngine, request: SimRequest, times: list[float] | None = None) -> list[int]:
    """The tokens of one request; with `times`, the engine clock's reading as each token arrives."""
    async with engine.submit(request) as generation:
        tokens = []
        async for index in generation.tokens():
            tokens.append(index)
            if times is not None:
                times.append(engine.clock())
        return tokens


def test_output_length_and_finish_reason() -> None:
    engine = SimEngine(settings(output_tokens=24, max_model_len=1000))
    plain = engine.submit(SimRequest(text_tokens=10))
    assert (plain.completion_tokens, plain.finish_reason, plain.prompt_tokens) == (24, "stop", 10)
    capped = engine.submit(SimRequest(text_tokens=10, max_tokens=5))
    assert (capped.completion_tokens, capped.finish_reason) == (5, "length")
    generous = engine.submit(SimRequest(text_tokens=10, max_tokens=500))
    assert (generous.completion_tokens, generous.finish_reason) == (24, "stop")
    with_image = engine.submit(SimRequest(text_tokens=10, images=(ImageInput(b"d", 70),)))
    assert with_image.prompt_tokens == 80
    near_the_end = engine.submit(SimRequest(text_tokens=990))
    assert (near_the_end.completion_tokens, near_the_end.finish_reason) == (10, "length")
    with pytest.raises(RequestRejected, match="maximum context length is 1000"):
        engine.submit(SimRequest(text_tokens=10, images=(ImageInput(b"d", 990),)))
    with pytest.raises(RequestRejected, match="990 in the completion"):
        engine.submit(SimRequest(text_tokens=20, max_tokens=990))


def test_settings_become_the_cores_costs_in_seconds() -> None:
    costs = step_costs(
        settings(
            step_base_ms=10,
            per_decode_ms=1,
            per_kv_ktoken_ms=2,
            prefill_base_ms=20,
            per_text_token_ms=0.5,
            per_image_token_ms=0.1,
            image_hit_discount=0.25,
        )
    )
    assert costs.coefficients() == pytest.approx((0.010, 0.001, 0.002, 0.020, 0.0005, 0.0001, 0.0001 * 0.75))
    assert step_costs(ZERO).zero and SimEngine(ZERO).zero
    assert not SimEngine(settings(frontend_base_ms=1)).zero  # a front-end delay sleeps too


def test_lone_request_timing_follows_the_step_model() -> None:
    clock = VirtualClock()
    engine = SimEngine(
        settings(
            step_base_ms=10,
            per_decode_ms=1,
            per_kv_ktoken_ms=2,
            prefill_base_ms=20,
            per_text_token_ms=0.5,
            per_image_token_ms=0.1,
            frontend_base_ms=5,
            frontend_per_image_token_ms=0.01,
            output_tokens=4,
        ),
        clock=clock,
    )
    times: list[float] = []
    request = SimRequest(text_tokens=100, images=(ImageInput(b"photo", 1000),))
    assert run_virtual(clock, lambda: generate(engine, request, times)) == [0, 1, 2, 3]
    frontend = 0.005 + 0.00001 * 1000
    prefill = 0.010 + 0.020 + 0.0005 * 100 + 0.0001 * 1000
    # Decode step k holds the 1100 prompt tokens and the k tokens generated so far.
    decodes = [0.010 + 0.001 + 0.002 * (1100 + k) / 1000 for k in (1, 2, 3)]
    assert times[0] == pytest.approx(frontend + prefill)
    assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx(decodes)
    # The engine's own histograms saw the same times.
    metrics = engine.metrics
    assert metrics._ttft.total == pytest.approx(frontend + prefill)
    assert metrics._itl.total == pytest.approx(sum(decodes))
    assert metrics._e2e.total == pytest.approx(times[-1])
    assert (metrics.finished["stop"], metrics.generation_tokens, metrics.prompt_tokens) == (1, 4, 1100)


def test_a_prefill_slows_the_decodes_that_share_its_step() -> None:
    clock = VirtualClock()
    engine = SimEngine(settings(step_base_ms=10, prefill_base_ms=30, output_tokens=5), clock=clock)
    first: list[float] = []
    second: list[float] = []

    async def scenario() -> None:
        one = asyncio.create_task(generate(engine, SimRequest(text_tokens=1), first))
        await asyncio.sleep(0.045)  # mid-way through the first decode step (40 to 50 ms)
        await generate(engine, SimRequest(text_tokens=1), second)
        await one

    run_virtual(clock, scenario)
    # Steps: prefill 40, decode 10, then the second's prefill step (40 ms) carries the first's decode.
    assert first == pytest.approx([0.040, 0.050, 0.090, 0.100, 0.110])
    assert second == pytest.approx([0.090, 0.100, 0.110, 0.120, 0.130])
    assert engine.metrics._ttft.total == pytest.approx(0.040 + (0.090 - 0.045))


def test_step_ends_are_deadlines_so_lateness_does_not_add_up() -> None:
    clock = VirtualClock()
    engine = SimEngine(settings(step_base_ms=10, output_tokens=6), clock=clock)

    def token_times(stall_at: float, stall: float) -> list[float]:
        clock.now = 0.0
        times: list[float] = []

        async def scenario() -> None:
            task = asyncio.create_task(generate(engine, SimRequest(text_tokens=1), times))
            await asyncio.sleep(stall_at)
            clock.now += stall  # a callback that held the loop this long
            await task

        run_virtual(clock, scenario)
        return times

    # The step ending at 30 ms is seen at 33; the next still ends at 40, as planned.
    assert token_times(0.025, 0.008) == pytest.approx([0.010, 0.020, 0.033, 0.040, 0.050, 0.060])
    # Late by more than a whole step: the schedule starts afresh rather than rush through zero-length steps.
    assert token_times(0.025, 0.022) == pytest.approx([0.010, 0.020, 0.047, 0.057, 0.067, 0.077])


def test_max_running_queues_the_rest_in_order() -> None:
    clock = VirtualClock()
    engine = SimEngine(settings(max_running=2, step_base_ms=20, output_tokens=3), clock=clock)
    admitted: list[tuple[int, float]] = []

    async def one(number: int) -> None:
        async with engine.submit(SimRequest(text_tokens=1)) as generation:
            admitted.append((number, clock.now))
            async for _ in generation.tokens():
                pass

    async def scenario() -> None:
        tasks = [asyncio.create_task(one(n)) for n in range(5)]
        await asyncio.sleep(0.010)
        assert (engine.running, engine.waiting) == (2, 3)
        assert not engine.has_free_slot()
        await asyncio.gather(*tasks)
        assert (engine.running, engine.waiting) == (0, 0)
        assert engine.has_free_slot()

    run_virtual(clock, scenario)
    # Each pair needs 3 steps of 20 ms; the next pair is admitted by the step after that.
    assert [number for number, _ in admitted] == [0, 1, 2, 3, 4]
    assert [at for _, at in admitted] == pytest.approx([0.0, 0.0, 0.060, 0.060, 0.120])
    assert engine.metrics.finished["stop"] == 5


def test_cached_image_skips_encode_cost() -> None:
    clock = VirtualClock()
    engine = SimEngine(settings(per_image_token_ms=1, output_tokens=1, mm_cache_items=8), clock=clock)
    photo = ImageInput(b"photo", 100)  # 100 ms to encode

    def first_token_time() -> float:
        clock.now = 0.0
        times: list[float] = []
        run_virtual(clock, lambda: generate(engine, SimRequest(text_tokens=5, images=(photo,)), times))
        return times[0]

    assert first_token_time() == pytest.approx(0.100)
    # A second loop: the engine starts a new stepper there. The cached image costs nothing to encode
    # (image_hit_discount 1), so the step takes no time at all.
    assert first_token_time() == 0.0
    metrics = engine.metrics
    assert (metrics.mm_queries, metrics.mm_hits) == (2, 1)
    assert (metrics.prefix_queries, metrics.prefix_hits) == (210, 100)


def test_partial_hit_discount() -> None:
    clock = VirtualClock()
    engine = SimEngine(settings(per_image_token_ms=1, image_hit_discount=0.75, output_tokens=1), clock=clock)
    photo = ImageInput(b"photo", 100)
    times: list[float] = []

    async def twice() -> None:
        await generate(engine, SimRequest(text_tokens=5, images=(photo,)), times)
        await generate(engine, SimRequest(text_tokens=5, images=(photo,)), times)

    run_virtual(clock, twice)
    assert times == pytest.approx([0.100, 0.100 + 0.025])


def test_kv_cache_usage_counts_held_tokens() -> None:
    clock = VirtualClock()
    engine = SimEngine(settings(step_base_ms=10, max_running=4, max_model_len=1000, output_tokens=5), clock=clock)
    seen: list[float] = []

    async def scenario() -> None:
        task = asyncio.create_task(generate(engine, SimRequest(text_tokens=300)))
        await asyncio.sleep(0.025)  # two steps done: the prompt and two output tokens are held
        seen.append(engine.kv_cache_usage)
        await task
        seen.append(engine.kv_cache_usage)

    run_virtual(clock, scenario)
    assert seen == [pytest.approx(302 / 4000), 0.0]


def test_zero_delay_never_yields_to_the_loop() -> None:
    engine = SimEngine(settings(output_tokens=6))
    # Driven by hand, without an event loop: it must finish on the first step or it would have waited.
    coroutine = generate(engine, SimRequest(text_tokens=3, images=(ImageInput(b"x", 64),)))
    with pytest.raises(StopIteration) as done:
        coroutine.send(None)
    assert done.value.value == [0, 1, 2, 3, 4, 5]
    metrics = engine.metrics
    assert (metrics.prompt_tokens, metrics.generation_tokens, metrics.finished["stop"]) == (67, 6, 1)
    assert sum(metrics._itl.counts) == 5
    assert (engine.running, engine.waiting) == (0, 0)


def step(awaitable: Awaitable[T]) -> T:
    """Run an awaitable that must not suspend, without an event loop."""
    coroutine = awaitable.__await__()
    with pytest.raises(StopIteration) as done:
        coroutine.send(None)
    return done.value.value  # type: ignore[no-any-return]


def test_zero_delay_requests_interleave_without_waiting() -> None:
    # max_running 1 and a first request half read (its client is slow): a second one still never
    # waits, since at zero cost the steps that admit it run the first to its end in the core at once.
    engine = SimEngine(settings(max_running=1, output_tokens=4))
    first = engine.submit(SimRequest(text_tokens=1))
    step(first.__aenter__())
    first_tokens = first.tokens()
    assert step(first_tokens.__anext__()) == 0
    assert engine.running == 1
    assert step(generate(engine, SimRequest(text_tokens=2))) == [0, 1, 2, 3]
    # Four steps ran the first to its end; the fifth, which admitted the second, never had to run.
    assert first.generated == 4 and engine.core.steps_done == 4
    assert engine.metrics.finished["stop"] == 1  # the first's client has not had every token yet
    assert [step(first_tokens.__anext__()) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(StopAsyncIteration):
        step(first_tokens.__anext__())
    step(first.__aexit__(None, None, None))
    assert engine.metrics.finished == {"stop": 2, "length": 0, "abort": 0}
    assert (engine.running, engine.waiting, engine.core.kv_tokens()) == (0, 0, 0)


def test_mm_cache_is_a_bounded_lru() -> None:
    engine = SimEngine(settings(mm_cache_items=2))

    def hits(*digests: bytes) -> int:
        before = engine.metrics.mm_hits
        step(generate(engine, SimRequest(1, tuple(ImageInput(d, 64) for d in digests))))
        return engine.metrics.mm_hits - before

    assert hits(b"a", b"b") == 0
    assert hits(b"a") == 1  # "a" is now the most recent, "b" the oldest
    assert hits(b"c") == 0  # evicts "b"
    assert hits(b"b") == 0  # evicted above; coming back evicts "a"
    assert hits(b"c", b"a") == 1  # "c" survived, "a" did not


def test_cancelling_frees_running_and_waiting_places() -> None:
    clock = VirtualClock()
    engine = SimEngine(settings(max_running=1, step_base_ms=10, prefill_base_ms=1000), clock=clock)
    admitted_at: list[float] = []

    async def follow() -> None:
        async with engine.submit(SimRequest(text_tokens=1)):
            admitted_at.append(clock.now)

    async def scenario() -> None:
        running = asyncio.create_task(generate(engine, SimRequest(text_tokens=1)))
        queued = asyncio.create_task(generate(engine, SimRequest(text_tokens=1)))
        await asyncio.sleep(0.5)  # mid-way through the running one's prefill step (1010 ms)
        assert (engine.running, engine.waiting) == (1, 1)
        queued.cancel()
        await asyncio.sleep(0)
        assert (engine.running, engine.waiting) == (1, 0)
        running.cancel()
        await asyncio.sleep(0)
        assert (engine.running, engine.waiting) == (0, 0)
        assert engine.core.kv_tokens() == 0
        # The place is really free: a new request is admitted by the next step, once the step under
        # way (which the GPU cannot take back) has ended.
        await follow()
        await asyncio.gather(running, queued, return_exceptions=True)

    run_virtual(clock, scenario)
    assert admitted_at == [pytest.approx(1.010)]
    assert (engine.running, engine.waiting) == (0, 0)
    # Only admitted requests count as aborted; the queued one never reached the engine's batch.
    assert engine.metrics.finished == {"stop": 0, "length": 0, "abort": 2}


def test_cancelled_mid_stream_counts_its_tokens_as_an_abort() -> None:
    clock = VirtualClock()
    engine = SimEngine(settings(step_base_ms=10, output_tokens=10), clock=clock)

    async def scenario() -> None:
        task = asyncio.create_task(generate(engine, SimRequest(text_tokens=1)))
        await asyncio.sleep(0.035)  # three tokens produced
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert engine.running == 0
        await asyncio.sleep(0.1)  # the stepper goes idle

    run_virtual(clock, scenario)
    metrics = engine.metrics
    assert metrics.finished == {"stop": 0, "length": 0, "abort": 1}
    assert metrics.generation_tokens == 3
    assert engine.core.steps_done == 4  # the step under way when it left, and no more


def test_admitted_then_cancelled_before_it_ran_passes_its_place_on() -> None:
    clock = VirtualClock()
    engine = SimEngine(settings(max_running=1, step_base_ms=10, output_tokens=2), clock=clock)
    generations: list[Generation] = []
    tasks: list[asyncio.Task[None]] = []

    async def hold(request: SimRequest) -> None:
        generation = engine.submit(request)
        generations.append(generation)
        async with generation:
            async for _ in generation.tokens():
                pass

    async def first_then_cancel_second() -> None:
        await hold(SimRequest(text_tokens=1))
        # The step that ended with the first's last token woke it, then the next step admitted the
        # second and woke it too; the first runs first, so the second is admitted but has not yet run.
        assert generations[1].core_request.admitted
        tasks[1].cancel()

    async def scenario() -> None:
        tasks.append(asyncio.create_task(first_then_cancel_second()))
        tasks.append(asyncio.create_task(hold(SimRequest(text_tokens=1))))
        tasks.append(asyncio.create_task(hold(SimRequest(text_tokens=1))))
        await asyncio.sleep(0.001)
        assert (engine.running, engine.waiting) == (1, 2)
        await asyncio.gather(*tasks[:2], return_exceptions=True)
        assert tasks[1].cancelled()
        assert (engine.running, engine.waiting) == (0, 1)
        await tasks[2]

    run_virtual(clock, scenario)
    assert (engine.running, engine.waiting) == (0, 0)
    assert engine.metrics.finished == {"stop": 2, "length": 0, "abort": 1}
    assert generations[2].core_request.first_step == 3  # admitted by the step after the abort
