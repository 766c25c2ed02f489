"""The engine core without a clock: step durations, admission, token counts, KV sums, aborts, the mm cache."""

from __future__ import annotations

import random

import pytest

from serving.sim.core import FEATURES, CoreImage, CoreRequest, EngineCore, StepCosts

# Every term distinct, so a term counted twice or left out changes the duration.
COSTS = StepCosts(
    step_base=0.010,
    per_decode=0.001,
    per_kv_ktoken=0.002,
    prefill_base=0.020,
    per_text_token=0.0005,
    per_image_token=0.0001,
    image_hit_discount=0.75,
)


def core(max_running: int = 8, max_batched_tokens: int = 100_000, mm_cache_items: int = 16) -> EngineCore:
    return EngineCore(COSTS, max_running, max_batched_tokens, mm_cache_items)


def text(tokens: int, output: int = 4) -> CoreRequest:
    return CoreRequest(tokens, (), output)


def expected(
    decodes: int = 0, kv: int = 0, prefills: int = 0, text_tokens: int = 0, missed: int = 0, hit: int = 0
) -> float:
    """The module docstring's formula, written out term by term."""
    c = COSTS
    return (
        c.step_base
        + c.per_decode * decodes
        + c.per_kv_ktoken * kv / 1000
        + c.prefill_base * prefills
        + c.per_text_token * text_tokens
        + c.per_image_token * missed
        + c.per_image_token * (1 - c.image_hit_discount) * hit
    )


def test_step_durations_follow_the_formula() -> None:
    engine = core()
    photo = CoreImage(b"photo", 400)
    first = CoreRequest(100, (photo,), 3)
    engine.add(first)
    assert engine.plan() == pytest.approx(expected(prefills=1, text_tokens=100, missed=400))
    engine.finish()
    # One decoding request holding its 500 prompt tokens and its first output token; a second
    # request with the same photo (an mm-cache hit) and another (a miss) are prefilled alongside.
    second = CoreRequest(50, (photo, CoreImage(b"other", 300)), 3)
    engine.add(second)
    assert engine.plan() == pytest.approx(expected(decodes=1, kv=501, prefills=1, text_tokens=50, missed=300, hit=400))
    assert engine.last_features == (1.0, 1, 0.501, 1, 50, 300, 400)
    engine.finish()
    # Two decoding: 502 + 751 KV tokens.
    assert engine.plan() == pytest.approx(expected(decodes=2, kv=502 + 751))
    assert COSTS.duration(engine.last_features) == pytest.approx(expected(decodes=2, kv=1253))


def test_coefficients_round_trip_and_zero() -> None:
    assert len(COSTS.coefficients()) == len(FEATURES)
    again = StepCosts.from_coefficients(COSTS.coefficients())
    assert again.coefficients() == pytest.approx(COSTS.coefficients())
    assert again.image_hit_discount == pytest.approx(0.75)
    assert not COSTS.zero
    assert StepCosts(0, 0, 0, 0, 0, 0, image_hit_discount=0.5).zero
    assert not StepCosts(0, 0, 0, 0, 0, 1e-9).zero


def test_first_token_at_the_end_of_the_prefill_step_and_n_tokens_in_n_steps() -> None:
    engine = core()
    request = text(10, output=3)
    engine.add(request)
    assert (request.admitted, engine.waiting) == (False, 1)
    engine.plan()
    assert request.admitted and request.first_step == 0
    assert request.generated(engine.steps_done) == 0  # planned, not yet run
    outcome = engine.finish()
    assert outcome.first_tokens == [request] and outcome.finished == []
    assert request.generated(engine.steps_done) == 1
    engine.plan()
    assert engine.finish().finished == []
    assert request.generated(engine.steps_done) == 2
    engine.plan()
    outcome = engine.finish()
    assert outcome.index == 2 and outcome.finished == [request]
    assert request.generated(engine.steps_done) == 3
    assert engine.idle and engine.kv_tokens() == 0
    assert engine.plan() is None


def test_one_token_request_finishes_in_its_prefill_step() -> None:
    engine = core()
    request = text(10, output=1)
    engine.add(request)
    engine.plan()
    outcome = engine.finish()
    assert outcome.first_tokens == [request] and outcome.finished == [request]
    assert engine.idle


def test_plan_twice_or_finish_without_plan_is_an_error() -> None:
    engine = core()
    with pytest.raises(RuntimeError):
        engine.finish()
    engine.add(text(1))
    engine.plan()
    with pytest.raises(RuntimeError):
        engine.plan()
    with pytest.raises(ValueError):
        CoreRequest(1, (), 0)


def test_admission_is_fifo_under_max_running() -> None:
    engine = core(max_running=2)
    requests = [text(10, output=2) for _ in range(4)]
    for request in requests:
        engine.add(request)
    engine.plan()
    assert [r.admitted for r in requests] == [True, True, False, False]
    assert (len(engine.running), engine.waiting) == (2, 2)
    engine.finish()
    engine.plan()  # a decode step; nobody finished yet, so nobody new
    assert [r.admitted for r in requests] == [True, True, False, False]
    assert engine.finish().finished == requests[:2]
    engine.plan()
    assert [r.first_step for r in requests] == [0, 0, 2, 2]
    assert (len(engine.running), engine.waiting) == (2, 0)


def test_the_waiting_gauge_counts_only_what_the_last_step_passed_over() -> None:
    engine = core(max_running=2)
    engine.add(text(10, output=5))
    engine.plan()
    late = [text(10, output=2) for _ in range(3)]
    for request in late:  # they arrive during the step: vLLM's scheduler has not seen them yet
        engine.add(request)
    assert (engine.waiting, engine.waiting_seen) == (3, 0)
    engine.finish()
    engine.plan()  # one slot was free: the first is admitted, the other two are passed over
    assert (engine.waiting, engine.waiting_seen) == (2, 2)
    engine.abort(late[2])
    assert (engine.waiting, engine.waiting_seen) == (1, 1)


def test_admission_stays_within_max_batched_tokens_in_order() -> None:
    engine = core(max_batched_tokens=100)
    big, second, small = text(60), text(60), text(30)
    for request in (big, second, small):
        engine.add(request)
    engine.plan()
    # 60 + 60 is over the budget; the 30 behind it would fit but may not overtake (first in, first out).
    assert [r.admitted for r in (big, second, small)] == [True, False, False]
    engine.finish()
    engine.plan()
    assert second.admitted and small.admitted and second.first_step == small.first_step == 1
    engine.finish()
    # A prompt longer than the whole budget still runs: alone in its step.
    huge = text(500)
    engine.add(huge)
    engine.add(text(1))
    kv = engine.kv_tokens()
    assert kv == (60 + 2) + (60 + 1) + (30 + 1)
    assert engine.plan() == pytest.approx(expected(decodes=3, kv=kv, prefills=1, text_tokens=500))
    assert huge.admitted and engine.waiting == 1


def test_kv_tokens_match_a_brute_force_sum() -> None:
    rng = random.Random(7)
    engine = core(max_running=6, max_batched_tokens=400)
    live: list[CoreRequest] = []
    for _ in range(300):
        for _ in range(rng.randrange(3)):
            request = text(rng.randrange(1, 300), output=rng.randrange(1, 12))
            engine.add(request)
            live.append(request)
        if live and rng.random() < 0.1:
            engine.abort(rng.choice(live))
        if engine.plan() is not None:
            if live and rng.random() < 0.1:
                engine.abort(rng.choice(live))  # also while a step is planned
            engine.finish()
        done = engine.steps_done
        brute = sum(r.prompt_tokens + r.generated(done) for r in engine.running)
        assert engine.kv_tokens() == brute
        assert engine.waiting == sum(1 for r in live if not r.admitted and not r.aborted)
        assert all(r.generated(done) < r.output_tokens for r in engine.running)


def test_abort_a_waiting_request() -> None:
    engine = core(max_running=1)
    running, waiting = text(10), text(10)
    engine.add(running)
    engine.add(waiting)
    engine.plan()
    engine.abort(waiting)
    assert engine.waiting == 0
    engine.finish()
    for _ in range(3):
        engine.plan()
        engine.finish()
    assert not waiting.admitted and engine.idle and engine.plan() is None


def test_abort_a_request_in_its_planned_prefill_step() -> None:
    engine = core()
    decoding, prefilling = text(10, output=5), text(20)
    engine.add(decoding)
    engine.plan()
    engine.finish()
    engine.add(prefilling)
    engine.plan()
    engine.abort(prefilling)
    assert engine.running == {decoding}
    outcome = engine.finish()
    assert outcome.first_tokens == []
    assert engine.kv_tokens() == 10 + 2
    engine.abort(prefilling)  # twice is harmless


def test_abort_a_decoding_request() -> None:
    engine = core()
    first, second = text(10, output=5), text(20, output=5)
    engine.add(first)
    engine.add(second)
    engine.plan()
    engine.finish()
    engine.abort(first)
    assert engine.running == {second} and engine.kv_tokens() == 21
    assert engine.plan() == pytest.approx(expected(decodes=1, kv=21))
    finished = engine.finish().finished
    while engine.plan() is not None:
        finished += engine.finish().finished
    assert finished == [second]


def test_abort_after_finishing_changes_nothing() -> None:
    engine = core()
    request = text(10, output=1)
    engine.add(request)
    engine.plan()
    engine.finish()
    engine.abort(request)
    assert not request.aborted and engine.idle


def test_mm_cache_is_a_bounded_lru() -> None:
    engine = core(mm_cache_items=2)

    def hits(*digests: bytes) -> int:
        request = CoreRequest(1, tuple(CoreImage(d, 64) for d in digests), 1)
        engine.add(request)
        engine.plan()
        engine.finish()
        assert request.hit_image_tokens == 64 * request.image_hits
        assert request.missed_image_tokens == 64 * (len(digests) - request.image_hits)
        return request.image_hits

    assert hits(b"a", b"b") == 0
    assert hits(b"a") == 1  # "a" is now the most recent, "b" the oldest
    assert hits(b"c") == 0  # evicts "b"
    assert hits(b"b") == 0  # evicted above; coming back evicts "a"
    assert hits(b"c", b"a") == 1  # "c" survived, "a" did not


def test_no_mm_cache_never_hits() -> None:
    engine = core(mm_cache_items=0)
    for _ in range(2):
        request = CoreRequest(1, (CoreImage(b"a", 64),), 1)
        engine.add(request)
        assert engine.plan() == pytest.approx(expected(prefills=1, text_tokens=1, missed=64))
        engine.finish()
        assert request.image_hits == 0
