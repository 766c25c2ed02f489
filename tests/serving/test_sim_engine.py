"""The simulated engine in-process: latency model, output length, FIFO queueing, mm cache, cancellation."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from qvl.settings import SimSettings
from serving.sim import engine as engine_module
from serving.sim.engine import ImageInput, LatencyModel, RequestRejected, SimEngine, SimRequest

ZERO = SimSettings(model="m").zero_delay()


def settings(**fields: Any) -> SimSettings:
    return ZERO.model_copy(update=fields)


async def generate(engine: SimEngine, request: SimRequest) -> list[int]:
    async with engine.submit(request) as generation:
        return [index async for index in generation.tokens()]


def test_latency_model_terms() -> None:
    model = LatencyModel.from_settings(
        settings(
            ttft_base_ms=20,
            ttft_per_prompt_token_ms=0.5,
            ttft_per_image_token_ms=0.1,
            itl_base_ms=10,
            itl_per_running_ms=2,
        )
    )
    assert model.prefill(text_tokens=100, uncached_image_tokens=1000) == pytest.approx(0.020 + 0.050 + 0.100)
    assert model.inter_token(running=1) == pytest.approx(0.010)
    assert model.inter_token(running=5) == pytest.approx(0.018)
    assert not model.zero
    assert LatencyModel.from_settings(ZERO).zero


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


def test_zero_delay_never_yields_to_the_loop() -> None:
    engine = SimEngine(settings(output_tokens=6))
    # Driven by hand, without an event loop: it must finish on the first step or it would have slept.
    coroutine = generate(engine, SimRequest(text_tokens=3, images=(ImageInput(b"x", 64),)))
    with pytest.raises(StopIteration) as done:
        coroutine.send(None)
    assert done.value.value == [0, 1, 2, 3, 4, 5]
    metrics = engine.metrics
    assert (metrics.prompt_tokens, metrics.generation_tokens, metrics.finished["stop"]) == (67, 6, 1)
    assert engine.running == 0


def test_max_running_queues_the_rest_in_order() -> None:
    engine = SimEngine(settings(max_running=2, itl_base_ms=20, output_tokens=3))
    started: list[int] = []

    async def one(number: int) -> None:
        async with engine.submit(SimRequest(text_tokens=1)) as generation:
            started.append(number)
            async for _ in generation.tokens():
                pass

    async def scenario() -> None:
        tasks = [asyncio.create_task(one(n)) for n in range(4)]
        await asyncio.sleep(0.01)
        assert (engine.running, engine.waiting) == (2, 2)
        assert started == [0, 1]
        await asyncio.gather(*tasks)
        assert (engine.running, engine.waiting) == (0, 0)

    asyncio.run(scenario())
    assert started == [0, 1, 2, 3]
    assert engine.metrics.finished["stop"] == 4


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every delay the engine asks asyncio to sleep (it still sleeps): what the latency model decided,
    checked exactly, where the time that passed depends on how busy the machine is."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded(delay: float) -> None:
        asked.append(delay)
        await real_sleep(delay)

    monkeypatch.setattr(engine_module.asyncio, "sleep", recorded)
    return asked


def test_inter_token_latency_grows_with_running_requests(sleeps: list[float]) -> None:
    async def elapsed(concurrency: int) -> float:
        sleeps.clear()
        engine = SimEngine(settings(max_running=8, itl_base_ms=10, itl_per_running_ms=10, output_tokens=6))
        began = time.perf_counter()
        await asyncio.gather(*(generate(engine, SimRequest(text_tokens=1)) for _ in range(concurrency)))
        return time.perf_counter() - began

    alone = asyncio.run(elapsed(1))
    assert sleeps == pytest.approx([0.010] * 5)  # 5 gaps of 10 ms
    assert alone >= 0.05  # a sleep never ends early; how late it ends is the machine's business
    crowded = asyncio.run(elapsed(4))
    # 5 gaps each: 10 ms plus 10 ms per other running request, so 40 ms once all four run.
    assert len(sleeps) == 20
    assert sleeps[:4] == pytest.approx([0.010, 0.020, 0.030, 0.040])  # each starts as the one before waits
    assert max(sleeps) == pytest.approx(0.040)
    assert crowded >= 0.010 + 4 * 0.040  # the first request's own gaps


def test_cached_image_skips_encode_cost(sleeps: list[float]) -> None:
    engine = SimEngine(settings(ttft_per_image_token_ms=1, output_tokens=1, mm_cache_items=8))
    photo = ImageInput(b"photo", 100)  # 100 ms to encode

    async def first_token_seconds() -> float:
        sleeps.clear()
        began = time.perf_counter()
        await generate(engine, SimRequest(text_tokens=5, images=(photo,)))
        return time.perf_counter() - began

    cold = asyncio.run(first_token_seconds())
    assert sleeps == pytest.approx([0.1])
    assert cold >= 0.1
    asyncio.run(first_token_seconds())
    assert sleeps == []  # the cached image costs nothing to encode
    metrics = engine.metrics
    assert (metrics.mm_queries, metrics.mm_hits) == (2, 1)
    assert (metrics.prefix_queries, metrics.prefix_hits) == (210, 100)


def test_mm_cache_is_a_bounded_lru() -> None:
    engine = SimEngine(settings(mm_cache_items=2))

    def hits(*digests: bytes) -> int:
        before = engine.metrics.mm_hits
        asyncio.run(generate(engine, SimRequest(1, tuple(ImageInput(d, 64) for d in digests))))
        return engine.metrics.mm_hits - before

    assert hits(b"a", b"b") == 0
    assert hits(b"a") == 1  # "a" is now the most recent, "b" the oldest
    assert hits(b"c") == 0  # evicts "b"
    assert hits(b"b") == 0  # evicted above; coming back evicts "a"
    assert hits(b"c", b"a") == 1  # "c" survived, "a" did not


def test_cancelling_frees_running_and_waiting_places() -> None:
    engine = SimEngine(settings(max_running=1, ttft_base_ms=10_000))

    async def scenario() -> None:
        running = asyncio.create_task(generate(engine, SimRequest(text_tokens=1)))
        queued = asyncio.create_task(generate(engine, SimRequest(text_tokens=1)))
        await asyncio.sleep(0.01)
        assert (engine.running, engine.waiting) == (1, 1)
        queued.cancel()
        await asyncio.sleep(0)
        assert (engine.running, engine.waiting) == (1, 0)
        running.cancel()
        await asyncio.sleep(0)
        assert (engine.running, engine.waiting) == (0, 0)
        # The slot is really free: a new request starts at once.
        follower = asyncio.create_task(generate(engine, SimRequest(text_tokens=1)))
        await asyncio.sleep(0.01)
        assert engine.running == 1
        follower.cancel()
        await asyncio.gather(running, queued, follower, return_exceptions=True)

    asyncio.run(scenario())
    assert (engine.running, engine.waiting) == (0, 0)
    # Only admitted requests count as aborted; the queued one never reached the engine's batch.
    assert engine.metrics.finished == {"stop": 0, "length": 0, "abort": 2}


def test_slot_handed_over_then_cancelled_is_passed_on() -> None:
    engine = SimEngine(settings(max_running=1, itl_base_ms=10_000, output_tokens=2))

    async def scenario() -> None:
        first = asyncio.create_task(generate(engine, SimRequest(text_tokens=1)))
        second = asyncio.create_task(generate(engine, SimRequest(text_tokens=1)))
        third = asyncio.create_task(generate(engine, SimRequest(text_tokens=1)))
        await asyncio.sleep(0.01)
        assert (engine.running, engine.waiting) == (1, 2)
        # Freeing the slot hands it to `second`; cancelling `second` before it runs must pass it on.
        first.cancel()
        await asyncio.sleep(0)
        second.cancel()
        await asyncio.sleep(0.01)
        assert (engine.running, engine.waiting) == (1, 0)
        third.cancel()
        await asyncio.gather(first, second, third, return_exceptions=True)

    asyncio.run(scenario())
    assert (engine.running, engine.waiting) == (0, 0)
