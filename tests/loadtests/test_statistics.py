"""The schedule matches its file statistically: rates, burstiness, rate shapes over time, Zipf shares,
and the expected cache hit ratios against caches simulated over a long schedule.

Tolerances are several standard deviations of the sampling noise at these sizes (each test says which),
so a test fails on a wrong law, not on bad luck; the seeds are fixed, so a pass is also reproducible."""

from __future__ import annotations

import collections
import itertools
import math
import statistics

import pytest
from support.loadtests import Lru

from loadtests.arrivals import expected_count, rate_at
from loadtests.popularity import expected_hit_ratios, zipf_weights
from loadtests.schedule import build_schedule, count_by_window
from loadtests.workload import Diurnal, Spike, Stages, Workload, parse_workload


def workload(
    arrivals: dict[str, object],
    *,
    catalogue: int = 100,
    alpha: float = 1.0,
    uploads: float = 0.1,
    engine_items: int = 20,
    greedy_share: float = 1.0,
) -> Workload:
    tasks: list[dict[str, object]] = [
        {"name": "attrs", "prompt": "JSON", "output": {"kind": "fixed", "tokens": 8}, "share": greedy_share},
        {"name": "caption", "prompt": "Caption", "output": {"kind": "fixed", "tokens": 8}, "share": greedy_share},
    ]
    if greedy_share < 1:
        tasks.append(
            {
                "name": "ask",
                "prompt": "Q",
                "output": {"kind": "uniform", "min": 1, "max": 9},
                "temperature": 1.0,
                "share": 2 * (1 - greedy_share),
            }
        )
    return parse_workload(
        {
            "version": 1,
            "name": "t",
            "seed": 11,
            "images": {"buckets": [{"name": "b", "width": 256, "height": 256, "share": 1}], "formats": {"png": 1}},
            "popularity": {
                "catalogue": catalogue,
                "alpha": alpha,
                "upload_share": uploads,
                "engine_cache_items": engine_items,
            },
            "tasks": tasks,
            "arrivals": arrivals,
            "tenants": [{"id": "a", "key": "k", "share": 1}],
        }
    )


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def send_times(w: Workload) -> list[float]:
    times = [p.send_at for p in build_schedule(w)]
    assert all(t is not None for t in times)
    return [t for t in times if t is not None]


def test_constant_rate_is_exact_and_even() -> None:
    times = send_times(workload({"process": "constant", "rate": 20, "duration_s": 100}))
    assert len(times) == 2000
    assert max(gaps(times)) == pytest.approx(0.05) == min(gaps(times))


def test_poisson_rate_and_gaps() -> None:
    times = send_times(workload({"process": "poisson", "rate": 20, "duration_s": 2000}))
    # 40,000 expected, standard deviation 200 (0.5%): 3% is six deviations.
    assert len(times) == pytest.approx(40_000, rel=0.03)
    g = gaps(times)
    # Exponential gaps have cv 1; the sample cv of 40,000 gaps is within about 1% of it.
    assert statistics.stdev(g) / statistics.mean(g) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_rate_and_cv(cv: float) -> None:
    times = send_times(workload({"process": "gamma", "rate": 20, "cv": cv, "duration_s": 5000}))
    # A renewal process's count has variance about N cv^2: at cv 3, 100,000 +- 950 (1%); 5% is five.
    assert len(times) == pytest.approx(100_000, rel=0.05)
    g = gaps(times)
    # The sample cv of 100,000 Gamma gaps (shape 1/cv^2 >= 1/9) strays by about 1-2%; 6% is generous.
    assert statistics.stdev(g) / statistics.mean(g) == pytest.approx(cv, rel=0.06)


def windows_match(w: Workload, window_s: float) -> None:
    """Counts per window against the integral of the intended rate over it, within 10%."""
    counts = count_by_window(build_schedule(w), window_s)
    arrivals = w.arrivals
    assert isinstance(arrivals, Stages | Diurnal | Spike)
    for i, count in enumerate(counts):
        steps = 200
        expected = sum(rate_at(arrivals, (i + (j + 0.5) / steps) * window_s) for j in range(steps))
        expected *= window_s / steps
        # Every window expects at least 1,000 requests (sd <= 3.2%): 10% is over three deviations.
        assert count == pytest.approx(expected, rel=0.10), (i, counts)


def test_stages_and_ramps_shape() -> None:
    w = workload(
        {
            "process": "stages",
            "stages": [
                {"duration_s": 100, "rate": 10},
                {"duration_s": 100, "rate": 10, "to_rate": 40},
                {"duration_s": 100, "rate": 20},
            ],
        }
    )
    windows_match(w, 50)
    assert len(send_times(w)) == pytest.approx(expected_count(w.arrivals), rel=0.03)


def test_diurnal_shape() -> None:
    w = workload({"process": "diurnal", "mean_rate": 40, "amplitude": 0.5, "period_s": 400, "duration_s": 400})
    assert isinstance(w.arrivals, Diurnal)
    windows_match(w, 50)
    counts = count_by_window(build_schedule(w), 100)
    # Peak in the first half-period, trough in the second.
    assert counts[0] < counts[1] > counts[2] > counts[3]


def test_flash_sale_spike_shape() -> None:
    w = workload(
        {"process": "spike", "base_rate": 20, "multiplier": 5, "start_s": 100, "length_s": 50, "duration_s": 300}
    )
    windows_match(w, 50)
    counts = count_by_window(build_schedule(w), 50)
    assert counts[2] > 4 * max(counts[:2] + counts[3:])


def test_closed_loop_has_users_not_times() -> None:
    plans = build_schedule(workload({"process": "closed", "users": 4, "think_s": 1.0, "requests": 10}))
    assert len(plans) == 10
    assert {p.send_at for p in plans} == {None}
    assert [p.user for p in plans[:5]] == [0, 1, 2, 3, 0]


def test_zipf_and_upload_shares() -> None:
    plans = build_schedule(workload({"process": "constant", "rate": 50, "duration_s": 600}))
    images = [ref.id for p in plans for ref in p.images]
    n = len(images)
    uploads = sum(isinstance(i, str) for i in images)
    counts = collections.Counter(i for i in images if isinstance(i, int))
    law = zipf_weights(100, 1.0)
    # 30,000 images: a share near 0.1-0.2 has sd about 0.002; 0.012 is six deviations.
    assert uploads / n == pytest.approx(0.1, abs=0.012)
    assert counts[0] / n == pytest.approx(0.9 * law[0], abs=0.012)
    assert counts[1] / n == pytest.approx(0.9 * law[1], abs=0.012)
    assert len({i for i in images if isinstance(i, str)}) == uploads  # every upload is new


@pytest.mark.parametrize(("alpha", "catalogue", "greedy_share"), [(1.0, 200, 1.0), (0.8, 2000, 0.5), (1.4, 500, 0.4)])
def test_expected_answer_cache_hit_ratio_matches_simulation(alpha: float, catalogue: int, greedy_share: float) -> None:
    w = workload(
        {"process": "constant", "rate": 40, "duration_s": 300},
        alpha=alpha,
        catalogue=catalogue,
        greedy_share=greedy_share,
    )
    plans = build_schedule(w)
    seen: set[tuple[object, ...]] = set()
    hits = 0
    for p in plans:
        if p.temperature != 0:
            continue
        key = (tuple(r.id for r in p.images), p.task)
        if any(isinstance(r.id, str) for r in p.images):
            continue
        hits += key in seen
        seen.add(key)
    expected = expected_hit_ratios(w, len(plans)).answer_cache
    # 12,000 requests: the simulated ratio strays by well under a point; 2 points is "a few".
    assert hits / len(plans) == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize(("alpha", "items"), [(1.0, 20), (0.8, 100), (1.4, 10)])
def test_expected_engine_cache_hit_ratio_matches_lru_simulation(alpha: float, items: int) -> None:
    w = workload(
        {"process": "constant", "rate": 50, "duration_s": 600}, alpha=alpha, catalogue=1000, engine_items=items
    )
    lru = Lru(items)
    hits = lookups = 0
    for p in build_schedule(w):
        for ref in p.images:
            lookups += 1
            hits += lru.lookup(ref.id)
    expected = expected_hit_ratios(w).engine_image_cache
    # Che's approximation is within about a point for Zipf laws; the sampling noise of 30,000 lookups
    # adds half a point: 3 points.
    assert hits / lookups == pytest.approx(expected, abs=0.03)
    assert not math.isnan(expected)


def test_expected_bounded_answer_cache_hit_ratio_matches_lru_simulation() -> None:
    doc = workload({"process": "constant", "rate": 50, "duration_s": 600}, catalogue=500, greedy_share=0.5)
    w = doc.model_copy(update={"popularity": doc.popularity.model_copy(update={"answer_cache_items": 50})})
    lru: collections.OrderedDict[object, None] = collections.OrderedDict()
    hits = 0
    plans = build_schedule(w)
    for p in plans:
        if p.temperature != 0:
            continue
        key = (tuple(r.id for r in p.images), p.task)
        if key in lru:
            hits += 1
            lru.move_to_end(key)
        else:
            lru[key] = None
            if len(lru) > 50:
                lru.popitem(last=False)
    expected = expected_hit_ratios(w).answer_cache
    # Steady-state Che approximation against an LRU warming up from empty over 30,000 requests (the
    # warm-up costs about 50 misses, 0.2 points): 3 points, as for the engine cache.
    assert hits / len(plans) == pytest.approx(expected, abs=0.03)
