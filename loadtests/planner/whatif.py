"""What-if rows of a sizing: the same traffic with one thing changed, each row giving the replicas it needs
and what the base fleet (the base answer's N) would show under it.

- image-cache hit ratio forced to h (0, 20, 40, 60 %): every image slot of every request is replaced: a
  share h of the slots, drawn at random, by one of a small hot set of photos, the others by fresh photos
  never shown again (certain misses). The hot set is small next to the engines' mm cache (one photo per
  32 cache slots, at least one), so a hot photo comes back long before the LRU could evict it and misses
  only the first time a replica sees it. Each slot keeps its size bucket (its tokens), the hot photo
  standing in as "a cached photo of that size". Answer-cache keys are kept, so only the engines' image
  caches (and image-affinity's ring) see the change. The hit ratio measured at the base N is reported
  beside the target; when it is off by more than 2 points (a small cache, cold misses, answers served
  from the answer cache), the hot share is corrected once in proportion and the row rerun.
- twice the share of high-resolution images: the largest bucket (most tokens) gets twice its share of
  images, capped at all of them, the other buckets shrinking in proportion;
- burstiness: Gamma arrivals at the same mean rate with cv 1, 2, 3 (1 is as bursty as Poisson);
- each routing policy the router knows (`session` falls back to least-loaded: workload requests
  carry no session id).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import get_args

from loadtests.arrivals import duration_s as arrivals_duration_s
from loadtests.planner.scenario import Scenario, prepare
from loadtests.planner.size import (
    DEFAULT_MAX_REPLICAS,
    Progress,
    Sizing,
    SizingError,
    Trial,
    at_rate,
    run_trial,
    size_scenario,
)
from loadtests.schedule import ImageRef, substream
from loadtests.slo import Objective
from loadtests.workload import Workload, parse_workload
from qvl.settings import PolicyName, RouterSettings
from serving.sim.profile import CapacityProfile

HIT_RATIOS = (0.0, 0.2, 0.4, 0.6)
CVS = (1.0, 2.0, 3.0)
HIGH_RES_FACTOR = 2.0
SLOTS_PER_HOT_PHOTO = 32
HIT_TOLERANCE = 0.02


@dataclass(frozen=True)
class WhatIf:
    """One row: what changed, the replicas it needs, and the base fleet's predicted run under it."""

    name: str
    replicas: int | None
    """N needed; None when no fleet up to the search's limit held."""
    base_replicas: int
    ttft_p99_ms: float | None
    """Predicted P99 TTFT with the base N (streamed requests)."""
    goodput_rps: float | None
    """Predicted goodput with the base N."""
    slo_held: bool
    """Whether the base N still holds."""
    image_hit_ratio: float | None
    """Measured engine image-cache hit ratio with the base N."""
    target_hit_ratio: float | None = None
    """The hit ratio the row asked for (hit-ratio rows only)."""


def what_ifs(
    workload: Workload,
    profile: CapacityProfile,
    objectives: Sequence[Objective],
    peak_rate: float,
    base: Sizing,
    *,
    duration_s: float | None = None,
    hit_ratios: Sequence[float] = HIT_RATIOS,
    high_res_factor: float = HIGH_RES_FACTOR,
    cvs: Sequence[float] = CVS,
    policies: Sequence[PolicyName] | None = None,
    answer_cache: bool = True,
    router: RouterSettings | None = None,
    seed: int = 0,
    max_replicas: int = DEFAULT_MAX_REPLICAS,
    progress: Progress | None = None,
) -> list[WhatIf]:
    """The what-if rows of `base` (the sizing of `workload` at `peak_rate` for `duration_s`, with its
    policy), in this order: as planned, each hit ratio, more high-resolution images, each cv, each policy."""
    planned = at_rate(workload, peak_rate, duration_s)
    length = arrivals_duration_s(planned.arrivals) or 0.0
    scenario = prepare(planned, tokens=profile.tokens)

    def row(name: str, scenario: Scenario, policy: PolicyName = base.policy) -> WhatIf:
        try:
            sizing = size_scenario(
                scenario,
                profile,
                objectives,
                peak_rate,
                policy=policy,
                answer_cache=answer_cache,
                router=router,
                seed=seed,
                hint=base.replicas,
                headroom=False,
                max_replicas=max_replicas,
                progress=progress,
            )
        except SizingError:
            # Even the limit did not hold: the base N's run still tells how far off it is.
            trial = run_trial(
                scenario,
                profile,
                objectives,
                base.replicas,
                policy=policy,
                answer_cache=answer_cache,
                router=router,
                seed=seed,
            )
            return _row(name, None, trial)
        return _row(name, sizing.replicas, sizing.trial(base.replicas))

    rows = [_row("as planned", base.replicas, base.at_n)]
    hot = max(1, profile.engine.mm_cache_items // SLOTS_PER_HOT_PHOTO)
    for target in hit_ratios:
        share = target
        name = f"image-cache hit ratio {target:.0%}"
        result = row(name, force_hit_ratio(scenario, share, hot, seed))
        measured = result.image_hit_ratio
        if measured and abs(measured - target) > HIT_TOLERANCE and target > 0:
            share = min(1.0, share * target / measured)
            result = row(name, force_hit_ratio(scenario, share, hot, seed))
        rows.append(replace(result, target_hit_ratio=target))
    rows.append(
        row(
            f"{high_res_factor:g}x high-resolution share",
            prepare(more_high_res(planned, high_res_factor), tokens=profile.tokens),
        )
    )
    for cv in cvs:
        bursty = _with_arrivals(planned, {"process": "gamma", "rate": peak_rate, "cv": cv, "duration_s": length})
        rows.append(row(f"bursty arrivals (Gamma cv {cv:g})", prepare(bursty, tokens=profile.tokens)))
    for policy in policies if policies is not None else get_args(PolicyName):
        if policy == base.policy:
            rows.append(_row(f"policy {policy}", base.replicas, base.at_n))
        else:
            rows.append(row(f"policy {policy}", scenario, policy))
    return rows


def force_hit_ratio(scenario: Scenario, share: float, hot: int, seed: int = 0) -> Scenario:
    """Every image slot replaced: round(share x slots) of them, drawn at random, by one of `hot` hot photos,
    the others by fresh ones (see the module docstring); sizes kept. The draws do not depend on `share`, so
    a larger share only turns more of the same slots hot."""
    if not 0 <= share <= 1 or hot < 1:
        raise ValueError(f"need a share in [0, 1] and at least one hot photo, got {share:g} and {hot}")
    rng = substream(scenario.workload.seed + seed, "whatif-hits")
    slots = [(i, k) for i, item in enumerate(scenario.items) for k in range(len(item.plan.images))]
    order = sorted(range(len(slots)), key=lambda _: rng.random())
    hot_slots = {slots[j]: rng.randrange(hot) for j in order[: round(share * len(slots))]}
    refs = []
    for i, item in enumerate(scenario.items):
        new = []
        for k, ref in enumerate(item.plan.images):
            photo = hot_slots.get((i, k))
            new.append(ImageRef(f"fresh-{i}-{k}" if photo is None else f"hot-{photo}", ref.bucket, ref.format))
        refs.append(tuple(new))
    return scenario.with_images(refs)


def more_high_res(workload: Workload, factor: float) -> Workload:
    """The workload with `factor` times the share of its largest bucket (by tokens), capped at all images."""
    buckets = workload.images.buckets
    total = sum(b.share for b in buckets)
    largest = max(buckets, key=lambda b: b.tokens)
    old = largest.share / total
    new = min(1.0, old * factor)
    rest = (1 - new) / (1 - old) if old < 1 else 0.0
    shares = {b.name: new if b is largest else b.share / total * rest for b in buckets}
    data = workload.model_dump()
    data["images"]["buckets"] = [
        {**b, "share": shares[b["name"]]} for b in data["images"]["buckets"] if shares[b["name"]] > 0
    ]
    return parse_workload(data, workload.name)


def _with_arrivals(workload: Workload, arrivals: dict[str, object]) -> Workload:
    data = workload.model_dump()
    data["arrivals"] = arrivals
    return parse_workload(data, workload.name)


def _row(name: str, replicas: int | None, trial: Trial | None) -> WhatIf:
    assert trial is not None  # every search starts at the base N
    summary = trial.summary
    return WhatIf(
        name, replicas, trial.replicas, summary.ttft_ms.p99, summary.goodput_rps, trial.held, trial.image_hit_ratio
    )
