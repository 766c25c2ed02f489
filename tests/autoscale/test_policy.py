"""The autoscaling policies as pure functions: bounds, the forecast ahead of the start-up time, the
flapping guard, one step down per cool-down, no scale-down soon after a scale-up, the reactive baseline's
delays, and which replica a scale-down removes."""

from __future__ import annotations

import itertools
import math

import pytest

from autoscale.policy import (
    REASONS,
    Capacity,
    DemandPolicy,
    Load,
    ReactivePolicy,
    ReplicaView,
    Trend,
    build_policy,
    victim,
)
from qvl.settings.autoscale import AutoscaleSettings

CAPACITY = Capacity(prefill_tokens_s=10_000.0, decode_tokens_s=1_000.0)
SETTINGS = AutoscaleSettings(
    min_replicas=1,
    max_replicas=10,
    target_utilisation=1.0,
    startup_s=120,
    cooldown_s=60,
    down_after_up_s=300,
    smoothing_s=5,  # about one tick of these tests: steps show at once (one noisy tick is its own test)
)


def demand(at: float, replicas: float) -> Load:
    """A load that needs `replicas` replicas (decode-bound) at SETTINGS."""
    return Load(at, prefill_tokens_s=1.0, decode_tokens_s=replicas * CAPACITY.decode_tokens_s)


def run(policy: DemandPolicy | ReactivePolicy, loads: list[Load], start: int) -> list[int]:
    counts, current = [], start
    for load in loads:
        decision = policy.decide(load, current)
        assert decision.reason in REASONS
        current = decision.desired
        counts.append(current)
    return counts


def test_a_step_in_load_scales_up_at_once_within_the_bounds() -> None:
    policy = DemandPolicy(SETTINGS, CAPACITY)
    assert policy.decide(demand(0, 1.0), 1).direction == "hold"
    up = policy.decide(demand(10, 4.5), 1)
    assert (up.direction, up.desired, up.reason) == ("up", 5, "demand_up")
    capped = DemandPolicy(SETTINGS.model_copy(update={"max_replicas": 3}), CAPACITY).decide(demand(0, 7), 1)
    assert capped.desired == 3
    held = DemandPolicy(SETTINGS.model_copy(update={"max_replicas": 3}), CAPACITY).decide(demand(0, 7), 3)
    assert (held.direction, held.reason) == ("hold", "at_max")
    floor = DemandPolicy(SETTINGS.model_copy(update={"min_replicas": 2}), CAPACITY).decide(demand(0, 0), 1)
    assert (floor.desired, floor.reason) == (2, "below_min")


def test_the_larger_of_prefill_and_decode_demand_counts() -> None:
    policy = DemandPolicy(SETTINGS, CAPACITY)
    load = Load(0, prefill_tokens_s=35_000, decode_tokens_s=500)
    assert policy.needed(load.prefill_tokens_s, load.decode_tokens_s) == pytest.approx(3.5)
    assert policy.decide(load, 1).desired == 4


def test_a_rising_load_is_met_one_start_up_time_ahead() -> None:
    """After ten steady minutes, demand rises by one replica every 100 s: the policy asks for the third
    replica before the load needs more than two, because a replica asked for now serves only after startup_s."""
    policy = DemandPolicy(SETTINGS, CAPACITY)
    asked_at = needed_at = None
    current = 2
    for at in range(0, 2600, 5):
        need = 0.5 + max(0, at - 600) / 100
        if needed_at is None and need > 2:
            needed_at = at
        decision = policy.decide(demand(at, need), current)
        if decision.direction == "up" and asked_at is None:
            asked_at = at
        current = decision.desired
    assert asked_at is not None and needed_at is not None
    assert needed_at - asked_at >= 60  # asked at least a minute before the third replica was needed


def test_a_load_oscillating_around_a_threshold_does_not_flap() -> None:
    """Needed replicas swing between 2.8 and 3.2 every minute for an hour: one scale-up to 4, then the
    hysteresis band keeps it there."""
    policy = DemandPolicy(SETTINGS, CAPACITY)
    loads = [demand(at, 3.0 + 0.2 * math.sin(2 * math.pi * at / 60)) for at in range(0, 3600, 5)]
    counts = run(policy, loads, 3)
    changes = sum(a != b for a, b in zip([3, *counts], counts, strict=False))
    assert changes == 1 and counts[-1] == 4


def test_scale_down_waits_a_whole_window_and_after_a_scale_up_then_one_step_per_cool_down() -> None:
    """Demand jumps to 6 replicas' worth, then falls to 4.5 and, two minutes later, to 0.5: the first step
    down waits down_after_up_s and a whole down window after the 6; each step goes to what its window's
    largest need asks, and steps are a cool-down apart."""
    settings = SETTINGS.model_copy(update={"down_window_s": 120.0})
    policy = DemandPolicy(settings, CAPACITY)
    loads = [demand(0, 6.0)] + [demand(at, 4.5 if at < 500 else 0.5) for at in range(5, 1500, 5)]
    counts = run(policy, loads, 1)
    assert counts[0] == 6
    changes = [(i * 5, c) for i, c in enumerate(counts) if i and counts[i - 1] != c]
    assert [c for _, c in changes] == [5, 1]
    assert changes[0][0] >= settings.down_after_up_s
    assert changes[1][0] >= 500 + settings.down_window_s - 5  # the 4.5 left the window
    assert all(b[0] - a[0] >= settings.cooldown_s for a, b in itertools.pairwise(changes))


def test_no_step_down_while_the_trend_rises() -> None:
    """Six replicas for a load needing two: a flat load steps down after its window; the same load rising
    (one replica's worth per ten minutes) keeps them, each hold counted as `rising`, until it levels off."""
    settings = SETTINGS.model_copy(update={"down_window_s": 300.0, "forecast_window_s": 600.0})
    for shape, rise in (("flat", 0.0), ("rising", 1 / 600)):
        policy = DemandPolicy(settings, CAPACITY)
        decisions, current = [], 6
        for at in range(0, 2400, 5):
            load = 1.5 + rise * min(at, 900)  # levels off at 900 s
            decisions.append(decision := policy.decide(demand(at, load), current))
            current = decision.desired
        downs = [d for d in decisions if d.direction == "down"]
        if shape == "flat":
            assert [(d.at, d.desired) for d in downs] == [(300, 2)]
        else:
            held = [d.at for d in decisions if d.reason == "rising"]
            assert held and min(held) == 300 and max(held) < downs[0].at and downs[0].at > 900
            assert downs[-1].desired == 3  # where it levelled off


def test_no_step_down_before_a_whole_window_of_history() -> None:
    policy = DemandPolicy(SETTINGS.model_copy(update={"down_window_s": 300.0}), CAPACITY)
    counts = run(policy, [demand(at, 0.5) for at in range(0, 400, 5)], 4)
    assert counts[: 300 // 5] == [4] * (300 // 5) and counts[-1] == 1


def test_the_reactive_baseline_waits_its_delays_then_jumps() -> None:
    settings = SETTINGS.model_copy(update={"in_flight_target": 2.0})
    policy = ReactivePolicy(settings)
    loads = [Load(at, 0, 0, in_flight=10.0) for at in range(0, 60, 5)]
    counts = run(policy, loads, 1)
    assert counts[:6] == [1] * 6 and counts[6] == 5  # 30 s of wanting 5, then 5 at once
    quiet = [Load(at, 0, 0, in_flight=2.0) for at in range(60, 800, 5)]
    counts = run(policy, quiet, 5)
    first_down = next(i for i, c in enumerate(counts) if c < 5) * 5 + 60
    assert first_down - 60 >= settings.reactive_down_delay_s and counts[-1] == 1


def test_policies_are_built_by_name() -> None:
    assert isinstance(build_policy(SETTINGS, CAPACITY), DemandPolicy)
    assert isinstance(build_policy(SETTINGS.model_copy(update={"policy": "reactive"}), CAPACITY), ReactivePolicy)


def test_a_starting_replica_goes_before_a_serving_one_and_a_draining_one_never() -> None:
    serving_busy = ReplicaView("a", "serving", 5, 10.0)
    serving_idle = ReplicaView("b", "serving", 0, 5.0)
    starting = ReplicaView("c", "starting", 0, 20.0)
    draining = ReplicaView("d", "draining", 0, 1.0)
    assert victim([serving_busy, serving_idle, starting, draining]) == starting
    assert victim([serving_busy, serving_idle, draining]) == serving_idle
    assert victim([draining]) is None


def test_the_trend_follows_a_ramp_and_forecasts_it() -> None:
    trend = Trend(span_s=60)
    for at in range(0, 600, 5):
        trend.update(at, 2.0 * at)
    assert trend.forecast(100) == pytest.approx(2.0 * 595 + 200, rel=0.02)


def test_a_rising_load_is_followed_up_without_waiting_for_the_cool_down() -> None:
    policy = DemandPolicy(SETTINGS.model_copy(update={"down_window_s": 0.0}), CAPACITY)  # the cool-down alone
    first = policy.decide(demand(0, 3.5), 1)
    again = policy.decide(demand(5, 6.5), first.desired)
    assert (first.desired, again.desired, again.reason) == (4, 7, "demand_up")
    turned = policy.decide(demand(10, 0.2), again.desired)
    assert (turned.direction, turned.reason) == ("hold", "cooldown")


def test_one_noisy_interval_adds_no_replica_with_the_default_smoothing() -> None:
    settings = SETTINGS.model_copy(update={"smoothing_s": AutoscaleSettings().smoothing_s})
    policy = DemandPolicy(settings, CAPACITY)
    steady = [policy.decide(demand(t, 0.8), 1) for t in range(0, 600, 10)]
    spike = policy.decide(demand(600, 1.1), 1)  # 37.5 % over the mean for one interval
    after = policy.decide(demand(610, 0.8), 1)
    assert {d.desired for d in steady} == {1}
    assert (spike.desired, after.desired) == (1, 1)
    # The same interval with the smoothing at one tick would have asked for a second replica.
    raw = DemandPolicy(SETTINGS, CAPACITY)
    for t in range(0, 600, 10):
        raw.decide(demand(t, 0.8), 1)
    assert raw.decide(demand(600, 1.1), 1).desired == 2


def test_batch_tokens_use_only_the_burst_budget() -> None:
    batch = Load(0, 1.0, 1.0 * CAPACITY.decode_tokens_s, batch_decode_tokens_s=5 * CAPACITY.decode_tokens_s)
    none = DemandPolicy(SETTINGS, CAPACITY).decide(batch, 1)
    two = DemandPolicy(SETTINGS.model_copy(update={"batch_burst_replicas": 2}), CAPACITY).decide(batch, 1)
    assert (none.desired, two.desired) == (1, 3)


def test_without_a_capacity_the_demand_policy_holds_but_keeps_the_bounds() -> None:
    policy = DemandPolicy(SETTINGS.model_copy(update={"min_replicas": 2}), None)
    assert policy.decide(demand(0, 5), 3).reason == "no_capacity"
    assert policy.decide(demand(10, 5), 1).desired == 2
    policy.tune(CAPACITY, 0.0)
    assert policy.decide(demand(20, 5), 3).desired == 5
