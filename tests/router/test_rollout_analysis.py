"""The rollout's statistics and its decisions, on samples drawn here."""

from __future__ import annotations

import math
import random

import pytest

from qvl.settings import RolloutSettings
from router.rollout import steps as st
from router.rollout.analysis import ABORT, ADVANCE, HOLD, Sample, analyse, parse_sample, sample_line
from router.rollout.stats import binomial_greater, fisher_greater, mann_whitney_greater, quantile, tail_greater
from router.routes import Route

SETTINGS = RolloutSettings(min_requests=100, min_duration_s=10, min_samples=30)


def test_fisher_matches_the_hypergeometric_tail_computed_by_hand() -> None:
    # 3 of 3 hits in a's 3 draws out of 10 with 3 hits: 1 / C(10, 3).
    assert fisher_greater(3, 3, 0, 7) == pytest.approx(1 / math.comb(10, 3))
    # a: 2/4, b: 1/4; P(X >= 2) with N=8, K=3, n=4 = (C(3,2)C(5,2) + C(3,3)C(5,1)) / C(8,4).
    assert fisher_greater(2, 4, 1, 4) == pytest.approx((3 * 10 + 1 * 5) / 70)
    assert fisher_greater(0, 100, 5, 100) == 1.0
    assert fisher_greater(0, 0, 0, 0) == 1.0


def test_binomial_tail_and_quantile_by_hand() -> None:
    assert binomial_greater(2, 2, 0.5) == pytest.approx(0.25)
    assert binomial_greater(1, 2, 0.5) == pytest.approx(0.75)
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert quantile([1.0, 2.0], 0.25) == 1.25


def test_mann_whitney_sees_a_shift_and_not_noise() -> None:
    rng = random.Random(1)
    base = [rng.lognormvariate(0, 0.3) for _ in range(400)]
    same = [rng.lognormvariate(0, 0.3) for _ in range(400)]
    slower = [rng.lognormvariate(0.3, 0.3) for _ in range(400)]
    assert mann_whitney_greater(slower, base) < 1e-6
    assert mann_whitney_greater(same, base) > 0.001
    assert mann_whitney_greater(base, slower) > 0.99


def test_the_tail_test_sees_a_slower_p95_only() -> None:
    rng = random.Random(2)
    base = [rng.lognormvariate(0, 0.3) for _ in range(2000)]
    tail = [v * (2.0 if rng.random() < 0.1 else 1.0) for v in (rng.lognormvariate(0, 0.3) for _ in range(400))]
    test = tail_greater(tail, base)
    assert test.p_value < 1e-4 and test.a_share > 0.1 and test.ratio > 1.2


def _samples(version: str, n: int, rng: random.Random, *, scale: float = 1.0, errors: float = 0.0) -> list[Sample]:
    out = []
    for _ in range(n):
        ttft = 0.05 * rng.lognormvariate(0, 0.25) * scale
        out.append(Sample(version, rng.random() >= errors, ttft, ttft + 0.2 * rng.lognormvariate(0, 0.2), 0.0))
    return out


def test_a_failing_canary_is_aborted_with_its_error_ratio_in_the_reason() -> None:
    rng = random.Random(3)
    samples = _samples("v2", 150, rng, errors=0.05) + _samples("v1", 3000, rng)
    analysis = analyse(samples, [], "v2", "v1", SETTINGS, step_age_s=5)
    assert analysis.decision == ABORT and "errors" in analysis.reason


def test_a_slow_canary_is_aborted_on_its_p95() -> None:
    rng = random.Random(4)
    samples = _samples("v2", 150, rng, scale=1.5) + _samples("v1", 3000, rng)
    analysis = analyse(samples, [], "v2", "v1", SETTINGS, step_age_s=5)
    assert analysis.decision == ABORT and "ttft_p95" in analysis.reason


def test_a_healthy_canary_holds_until_its_step_is_long_and_full_enough_then_advances() -> None:
    rng = random.Random(5)
    few = _samples("v2", 60, rng) + _samples("v1", 3000, rng)
    assert analyse(few, [], "v2", "v1", SETTINGS, step_age_s=60).decision == HOLD
    many = _samples("v2", 200, rng) + _samples("v1", 3000, rng)
    assert analyse(many, [], "v2", "v1", SETTINGS, step_age_s=5).decision == HOLD
    assert analyse(many, [], "v2", "v1", SETTINGS, step_age_s=11).decision == ADVANCE
    assert analyse(_samples("v2", 10, rng), [], "v2", "v1", SETTINGS, 60).decision == HOLD


def test_identical_versions_are_not_aborted_across_many_looks() -> None:
    """An A/A rollout: 400 analyses of identical versions, none aborts (alpha 0.001 and the effect bound)."""
    rng = random.Random(6)
    aborts = 0
    for _ in range(400):
        samples = _samples("v2", rng.randint(30, 300), rng) + _samples("v1", rng.randint(300, 3000), rng)
        aborts += analyse(samples, [], "v2", "v1", SETTINGS, step_age_s=30).decision == ABORT
    assert aborts == 0


def test_answer_changes_abort_only_when_a_limit_is_set() -> None:
    rng = random.Random(7)
    samples = _samples("v2", 200, rng) + _samples("v1", 2000, rng)
    shadow = [("v2", i % 2 == 0) for i in range(200)]
    assert analyse(samples, shadow, "v2", "v1", SETTINGS, 30).decision == ADVANCE
    strict = SETTINGS.model_copy(update={"max_answer_change": 0.05})
    analysis = analyse(samples, shadow, "v2", "v1", strict, 30)
    assert analysis.decision == ABORT and "answers" in analysis.reason


def test_sample_lines_round_trip() -> None:
    line = sample_line("v2", False, 0.0123, 0.5, 1700000000.25)
    assert parse_sample(line) == Sample("v2", False, 0.0123, 0.5, 1700000000.25)
    assert parse_sample(b"garbage") is None


def test_a_rollout_walks_its_steps_to_promotion_and_an_abort_returns_everyone() -> None:
    route = Route("m", (("v1", 100.0),))
    state, first = st.new_rollout(route, "v2", [1, 5, 100], min_requests=1, min_duration_s=0, shadow=0.05, now=0.0)
    assert first.versions == (("v2", 1.0), ("v1", 99.0)) and first.rollout == f"{state['id']}:0"
    assert first.shadow == (("v2", 0.05),)
    state = st.advanced(state, "ok", 1.0)
    assert st.route_of(state).versions == (("v2", 5.0), ("v1", 95.0))
    done = st.advanced(state, "ok", 2.0)
    assert done["status"] == st.PROMOTED and st.route_of(done).versions == (("v2", 100.0),)
    gone = st.aborted(state, "bad", 2.0)
    assert st.route_of(gone).weight_of("v2") == 0 and st.route_of(gone).rollout == ""
