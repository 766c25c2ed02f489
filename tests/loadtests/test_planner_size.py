"""Sizing: a fleet size known by construction, failure headroom, a day's trace window by window, and what-if
rows that move the way they must."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.planner import make_profile, planner_workload

from loadtests.planner.size import SizingError, at_rate, search, size
from loadtests.planner.trace import RateCurve, curve_of, load_rate_curve, size_trace
from loadtests.planner.whatif import more_high_res, what_ifs
from loadtests.slo import parse_slo

# One request at a time per replica (max_running 1), 10 steps of 10 ms each: a replica serves one request
# in exactly S = 0.1 s, so at most 10 requests/s without a queue. Constant arrivals at rate r, shared evenly,
# keep every TTFT at one step (10 ms) while r / N < 10, and grow a queue without bound otherwise: the
# smallest fleet holding a TTFT bound is N = ceil(r S).
SERIAL = make_profile(step_base_ms=10, max_running=1, tensor_parallel_size=2)
SLO = parse_slo("ttft_p99<=500ms,errors<=0.1%")


def constant(rate: float, duration_s: float = 60) -> str:
    return f"{{process: constant, rate: {rate}, duration_s: {duration_s}}}"


def test_size_finds_the_fleet_known_by_construction_its_headroom_and_its_gpus() -> None:
    sizing = size(planner_workload(constant(45), tokens=10), SERIAL, SLO, 45, policy="round-robin")
    assert (sizing.replicas, sizing.headroom_replicas) == (5, 6)
    assert (sizing.gpus, sizing.headroom_gpus) == (10, 12)
    assert sizing.at_n.held and sizing.at_n.summary.ttft_ms.p99 == pytest.approx(10)
    below = sizing.below
    assert below is not None and below.replicas == 4 and not below.held
    lost = sizing.trial(5, lost=1)
    assert lost is not None and not lost.held  # the headroom search looked at N with one lost, too


def test_least_loaded_needs_at_least_the_capacity_bound_and_headroom_is_never_below_n() -> None:
    sizing = size(planner_workload(constant(45), tokens=10), SERIAL, SLO, 45, policy="least-loaded")
    assert sizing.replicas >= 5
    assert sizing.headroom_replicas is not None and sizing.headroom_replicas > sizing.replicas


@pytest.mark.parametrize("hint", [None, 1, 10, 36, 37, 38, 500])
def test_search_finds_the_smallest_holding_n_and_always_evaluates_the_one_below(hint: int | None) -> None:
    seen: list[int] = []

    def holds(n: int) -> bool:
        seen.append(n)
        return n >= 37

    assert search(holds, hint, 1000) == 37
    assert 36 in seen and len(seen) == len(set(seen))
    with pytest.raises(SizingError, match="up to 30 replicas"):
        search(holds, hint, 30)


def test_a_trace_is_sized_window_by_window_at_each_window_peak(tmp_path: Path) -> None:
    csv = tmp_path / "day.csv"
    csv.write_text("t_s,rate\n0,15\n3600,15\n3601,45\n7200,45\n")
    trace = size_trace(
        planner_workload(constant(15), tokens=10), SERIAL, SLO, load_rate_curve(csv), sample_s=30, policy="round-robin"
    )
    assert [(w.start_s, w.end_s, w.peak_rate, w.replicas, w.gpus) for w in trace.windows] == [
        (0, 3600, 15, 2, 4),
        (3600, 7200, 45, 5, 10),
    ]
    assert trace.replicas == 5


def test_the_rate_curves_of_stages_spikes_and_diurnal_workloads_peak_where_they_should() -> None:
    stages = planner_workload(
        "{process: stages, stages: [{duration_s: 100, rate: 5, to_rate: 20}, {duration_s: 100, rate: 8}]}"
    )
    curve = curve_of(stages)
    assert curve.duration_s == 200
    assert [curve.peak(0, 100), curve.peak(100, 200)] == [pytest.approx(20), 8]
    spike = planner_workload(
        "{process: spike, base_rate: 4, multiplier: 5, start_s: 130, length_s: 1, duration_s: 300}"
    )
    assert [curve_of(spike).peak(s, s + 100) for s in (0, 100, 200)] == [4, 20, 4]
    diurnal = planner_workload("{process: diurnal, mean_rate: 10, amplitude: 0.5, period_s: 400, duration_s: 400}")
    assert curve_of(diurnal).peak(0, 400) == pytest.approx(15, rel=1e-3)
    with pytest.raises(SizingError, match="not a trace"):
        curve_of(planner_workload(constant(1)))
    assert RateCurve(lambda t: 0.0, 10).peak(0, 10) == 0


def test_bad_inputs_are_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(SizingError, match="closed loop"):
        at_rate(planner_workload("{process: closed, users: 2, requests: 10}"), 5)
    bad = tmp_path / "bad.csv"
    bad.write_text("0,1\n10,oops\n")
    with pytest.raises(SizingError, match="row 2"):
        load_rate_curve(bad)
    bad.write_text("0,1\n0,2\n")
    with pytest.raises(SizingError, match="increase"):
        load_rate_curve(bad)


def test_what_if_rows_move_the_way_they_must() -> None:
    # Image encoding dominates: a zoom photo costs 0.2 ms a token to encode unless the engine has it cached.
    workload = planner_workload(
        "{process: poisson, rate: 40, duration_s: 30}",
        tokens=20,
        images={
            "buckets": [
                {"name": "thumbnail", "width": 256, "height": 256, "share": 0.7},
                {"name": "zoom", "width": 1024, "height": 1024, "share": 0.3},
            ],
            "formats": {"jpeg": 1},
        },
        popularity={"catalogue": 2000, "alpha": 0.8, "upload_share": 0.1},
    )
    profile = make_profile(step_base_ms=10, per_decode_ms=0.5, per_image_token_ms=0.2, max_running=16)
    slo = parse_slo("ttft_p99<=1s,errors<=1%")
    base = size(workload, profile, slo, 40, headroom=False)
    rows = {row.name: row for row in what_ifs(workload, profile, slo, 40, base)}

    hits = [rows[f"image-cache hit ratio {h:.0%}"] for h in (0.0, 0.2, 0.4, 0.6)]
    for row in hits:
        assert row.target_hit_ratio is not None and row.image_hit_ratio is not None
        assert row.image_hit_ratio == pytest.approx(row.target_hit_ratio, abs=0.03)
    needed = [row.replicas for row in hits if row.replicas is not None]
    assert len(needed) == 4
    assert needed == sorted(needed, reverse=True) and needed[0] > needed[-1]

    high_res = rows["2x high-resolution share"]
    assert high_res.replicas is not None and high_res.replicas > base.replicas
    assert not high_res.slo_held
    cv1, cv3 = rows["bursty arrivals (Gamma cv 1)"], rows["bursty arrivals (Gamma cv 3)"]
    assert cv1.replicas is not None and cv3.replicas is not None and cv3.replicas >= cv1.replicas
    tails = {row.name: row.ttft_p99_ms or 0.0 for row in (cv1, cv3)}
    assert max(tails, key=lambda name: tails[name]) == cv3.name  # at the same N, burstier arrivals wait longer
    assert rows["as planned"].replicas == base.replicas and rows["as planned"].slo_held
    assert {name for name in rows if name.startswith("policy ")} == {
        "policy round-robin",
        "policy least-loaded",
        "policy session",
        "policy image-affinity",
    }


def test_more_high_res_doubles_the_largest_bucket_share_and_caps_it_at_every_image() -> None:
    workload = planner_workload(
        constant(1),
        images={
            "buckets": [
                {"name": "small", "width": 256, "height": 256, "share": 3},
                {"name": "large", "width": 1024, "height": 1024, "share": 1},
            ],
            "formats": {"jpeg": 1},
        },
    )
    shares = {b.name: b.share for b in more_high_res(workload, 2).images.buckets}
    assert shares == {"small": pytest.approx(0.5), "large": pytest.approx(0.5)}
    assert [b.name for b in more_high_res(workload, 5).images.buckets] == ["large"]
