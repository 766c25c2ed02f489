"""The output-length laws' probabilities, which the answer-cache expectation needs (max_tokens is part of
the cache key), against the lengths the schedule actually draws."""

from __future__ import annotations

from collections import Counter

import pytest
from support import ROOT

from loadtests.schedule import build_schedule
from loadtests.workload import FixedLength, LognormalLength, UniformLength, length_pmf, load_workload


@pytest.mark.parametrize(
    "law",
    [
        FixedLength(kind="fixed", tokens=96),
        UniformLength(kind="uniform", min=32, max=64),
        LognormalLength(kind="lognormal", median=120, sigma=0.6, min=16, max=512),
        LognormalLength(kind="lognormal", median=8, sigma=2.0, min=4, max=4),
    ],
)
def test_a_length_law_sums_to_one_within_its_bounds(law: FixedLength | UniformLength | LognormalLength) -> None:
    pmf = length_pmf(law)
    assert sum(pmf.values()) == pytest.approx(1.0)
    low, high = (law.tokens, law.tokens) if isinstance(law, FixedLength) else (law.min, law.max)
    assert min(pmf) >= low and max(pmf) <= high


def test_the_lognormal_law_matches_the_drawn_lengths() -> None:
    workload = load_workload(ROOT / "loadtests" / "workloads" / "storefront.yaml")
    task = next(t for t in workload.tasks if isinstance(t.output, LognormalLength))
    drawn = Counter(p.max_tokens for p in build_schedule(workload) if p.task == task.name)
    total = sum(drawn.values())
    pmf = length_pmf(task.output)
    # Bands of 40 tokens: each within 1.5 points of the law over ~2000 draws.
    for start in range(16, 512, 40):
        band = range(start, start + 40)
        measured = sum(drawn[v] for v in band) / total
        expected = sum(pmf.get(v, 0.0) for v in band)
        assert measured == pytest.approx(expected, abs=0.015), (start, measured, expected)
