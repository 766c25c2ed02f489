"""The virtual-time fleet simulator: step and arrival bookkeeping, the answer cache, admission, replica loss
and routing through the router's own policies, checked against times computed from the cost model."""

from __future__ import annotations

from collections import defaultdict

import pytest
from support.planner import make_profile, planner_workload

from loadtests.planner.scenario import prepare
from loadtests.planner.vtime import simulate
from loadtests.slo import parse_slo
from qvl.settings import RouterSettings
from qvl.settings.router import AdmissionSettings
from serving.sim.profile import Tokens


def test_a_lone_request_takes_the_front_end_then_one_prefill_step_then_one_decode_step_per_token() -> None:
    profile = make_profile(
        step_base_ms=10,
        prefill_base_ms=5,
        per_text_token_ms=0.1,
        per_image_token_ms=0.2,
        per_decode_ms=1,
        frontend_base_ms=3,
        frontend_per_image_token_ms=0.01,
    )
    workload = planner_workload("{process: constant, rate: 1, duration_s: 1}", tokens=6)
    image = workload.images.buckets[0].tokens
    text = Tokens().text_tokens("Describe.")
    result = simulate(workload, profile, 1)
    (record,) = result.records
    frontend = 3 + 0.01 * image
    prefill = 10 + 5 + 0.1 * text + 0.2 * image
    decode = 10 + 1  # one decoding request; the KV term is zero
    assert record.ttft_ms == pytest.approx(frontend + prefill)
    assert record.e2e_ms == pytest.approx(frontend + prefill + 5 * decode)
    assert record.itl is not None
    assert record.itl.count == 5
    assert record.itl.mean_ms == pytest.approx(decode) and record.itl.max_ms == pytest.approx(decode)
    assert (record.prompt_tokens, record.image_tokens, record.output_tokens) == (text + image, image, 6)
    assert (record.status, record.error_type, record.replica, record.cache) == (200, None, "sim-0", "bypass")
    assert (record.intended_s, record.sent_s, record.send_lag_ms, record.stream) == (0.0, 0.0, 0.0, True)
    assert (result.requests, result.engine_steps, result.image_lookups, result.image_hits) == (1, 6, 1, 0)
    summary = result.summary(parse_slo("ttft_p99<=1s,itl_p99<=20ms"))
    assert summary.slo_held and summary.ok == 1 and summary.goodput_rps is not None


def test_identical_greedy_requests_coalesce_while_the_first_is_on_its_way_then_hit_the_answer_cache() -> None:
    profile = make_profile(step_base_ms=90, frontend_base_ms=2)
    workload = planner_workload(
        "{process: constant, rate: 10, duration_s: 3}",
        tokens=5,
        temperature=0,
        popularity={"catalogue": 1, "alpha": 1.0, "upload_share": 0},
    )
    records = simulate(workload, profile, 2).records
    assert [r.cache for r in records] == ["miss"] + ["coalesced"] * 4 + ["hit"] * 25
    leader_end_s = 0.002 + 5 * 0.09
    for r in records[1:5]:
        assert r.e2e_ms == pytest.approx((leader_end_s - r.sent_s) * 1000)
        assert r.ttft_ms == r.e2e_ms and r.replica == "cache" and r.itl is not None and r.itl.count == 0
    assert all(r.e2e_ms == pytest.approx(2.0) and r.replica == "cache" for r in records[5:])
    assert {r.cache for r in simulate(workload, profile, 2, answer_cache=False).records} == {"bypass"}


def test_admission_refuses_at_once_when_the_queue_is_full_and_after_the_wait_runs_out() -> None:
    profile = make_profile(step_base_ms=100)
    workload = planner_workload("{process: constant, rate: 10, duration_s: 1}", tokens=10)
    no_queue = RouterSettings(admission=AdmissionSettings(max_in_flight_per_replica=1, queue_size=0))
    records = simulate(workload, profile, 1, router=no_queue).records
    assert [r.status for r in records] == [200] + [503] * 9
    assert all(r.error_type == "overloaded" and r.e2e_ms == 0 and r.replica == "none" for r in records[1:])

    # Arrivals every 100 ms wait at most 250 ms; the one slot frees at 1.0 s (10 steps of 100 ms): the
    # request sent at 0.8 s (still waiting) takes it, the one sent at 0.9 s times out at 1.15 s.
    short_wait = RouterSettings(
        admission=AdmissionSettings(max_in_flight_per_replica=1, queue_size=10, queue_timeout_s=0.25)
    )
    records = simulate(workload, profile, 1, router=short_wait).records
    assert [r.status for r in records] == [200] + [503] * 7 + [200, 503]
    assert all(r.e2e_ms == pytest.approx(250) for r in records if r.status == 503)
    assert records[8].ttft_ms == pytest.approx((1.0 - 0.8 + 0.1) * 1000)


def test_a_lost_replica_takes_no_request_and_round_robin_shares_the_rest_evenly() -> None:
    workload = planner_workload("{process: constant, rate: 20, duration_s: 3}")
    result = simulate(workload, make_profile(step_base_ms=5), 3, "round-robin", lost=1)
    counts = result.summary().replicas
    assert counts == {"sim-1": 30, "sim-2": 30}
    assert (result.replicas, result.serving) == (3, 2)
    with pytest.raises(ValueError, match="serving replica"):
        simulate(workload, make_profile(step_base_ms=5), 1, lost=1)


def test_image_affinity_sends_each_photo_to_one_replica_whose_cache_then_always_hits() -> None:
    # One request at a time (50 ms of service every 100 ms): the bounded load never spills to another replica.
    workload = planner_workload(
        "{process: constant, rate: 10, duration_s: 10}", popularity={"catalogue": 6, "alpha": 0.5, "upload_share": 0}
    )
    scenario = prepare(workload)
    result = simulate(scenario, make_profile(step_base_ms=5), 4, "image-affinity")
    owners: dict[int | str, set[str | None]] = defaultdict(set)
    for item, record in zip(scenario.items, result.records, strict=True):
        owners[item.plan.images[0].id].add(record.replica)
    assert all(len(replicas) == 1 for replicas in owners.values())
    assert len(result.summary().replicas) == 4  # the ring spreads the 6 photos over every replica
    # Each photo misses once, on its owner, then stays cached (6 photos, 64 slots).
    assert result.image_lookups == len(scenario.items)
    assert result.image_hits == len(scenario.items) - len(owners)


def test_the_same_seed_gives_the_same_run_and_least_loaded_balances_a_busy_fleet() -> None:
    workload = planner_workload("{process: poisson, rate: 80, duration_s: 20}", tokens=20)
    profile = make_profile(step_base_ms=10, per_decode_ms=0.5, max_running=8)
    scenario = prepare(workload)
    first = simulate(scenario, profile, 4, "least-loaded", seed=3)
    again = simulate(scenario, profile, 4, "least-loaded", seed=3)
    assert first.records == again.records and first.engine_steps == again.engine_steps
    shares = first.summary().replicas
    assert set(shares) == {"sim-0", "sim-1", "sim-2", "sim-3"}
    assert max(shares.values()) < 1.2 * min(shares.values())
