"""One analysis of a rollout's step: the new version's answers against the baseline's on the same
traffic, and the decision it leads to (a pure function of the samples and the settings).

Checks, each one-sided (is the new version worse?) and each needing both a p-value under alpha and an
effect over its tolerance before it fails:
    errors        5xx and broken streams: Fisher's exact test on the two error ratios
    ttft_p95      P95 time to first token: Fisher's test on the shares above the baseline's P95
    e2e_p95       P95 end-to-end time: the same
    ttft_median   the whole TTFT distribution shifted up: Mann-Whitney U, effect on the medians
The latency effects must pass both max_latency_increase (relative) and min_latency_increase_ms (absolute).
    answers       greedy shadow answers that differ from the baseline's: exact binomial test against
                  max_answer_change (reported only when that is not set)
A failed check aborts the rollout. With none failed, the step passes once the new version answered
min_requests requests and min_duration_s has gone by; until then, or while a side has fewer than
min_samples answers, the rollout holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from qvl.settings import RolloutSettings
from router.rollout.stats import binomial_greater, fisher_greater, mann_whitney_greater, quantile, tail_greater

ADVANCE, HOLD, ABORT = "advance", "hold", "abort"


@dataclass(frozen=True, slots=True)
class Sample:
    """One answer: its version, whether it was not a server error, its TTFT and end-to-end seconds."""

    version: str
    ok: bool
    ttft_s: float
    e2e_s: float
    at: float


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    passed: bool
    p_value: float | None
    canary: float | None
    baseline: float | None
    detail: str


@dataclass(frozen=True, slots=True)
class Analysis:
    decision: str
    reason: str
    canary_requests: int
    baseline_requests: int
    checks: list[Check] = field(default_factory=list)

    def to_doc(self) -> dict[str, Any]:
        doc = asdict(self)
        for check in doc["checks"]:
            for name in ("p_value", "canary", "baseline"):
                value = check[name]
                check[name] = None if value is None or math.isnan(value) else round(value, 6)
        return doc


def analyse(
    samples: Sequence[Sample],
    shadow: Sequence[tuple[str, bool]],
    canary: str,
    baseline: str,
    settings: RolloutSettings,
    step_age_s: float,
) -> Analysis:
    """The decision for a step `step_age_s` old, from its answers and its shadow comparisons."""
    new = [s for s in samples if s.version == canary]
    old = [s for s in samples if s.version == baseline]
    if len(new) < settings.min_samples or len(old) < settings.min_samples:
        return Analysis(
            HOLD,
            f"waiting for answers: {len(new)} from {canary}, {len(old)} from {baseline} "
            f"(each test needs {settings.min_samples})",
            len(new),
            len(old),
        )
    checks = [
        _errors(new, old, settings),
        _tail("ttft_p95", [s.ttft_s for s in new if s.ok], [s.ttft_s for s in old if s.ok], settings),
        _tail("e2e_p95", [s.e2e_s for s in new if s.ok], [s.e2e_s for s in old if s.ok], settings),
        _median([s.ttft_s for s in new if s.ok], [s.ttft_s for s in old if s.ok], settings),
        _answers([same for version, same in shadow if version == canary], settings),
    ]
    failed = [c for c in checks if not c.passed]
    if failed:
        reason = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        return Analysis(ABORT, reason, len(new), len(old), checks)
    if len(new) < settings.min_requests or step_age_s < settings.min_duration_s:
        return Analysis(
            HOLD,
            f"checks pass; step needs {settings.min_requests} answers from {canary} (has {len(new)}) and "
            f"{settings.min_duration_s:.0f}s (has {step_age_s:.0f}s)",
            len(new),
            len(old),
            checks,
        )
    return Analysis(
        ADVANCE,
        f"checks pass over {len(new)} answers from {canary} and {len(old)} from {baseline} in {step_age_s:.0f}s",
        len(new),
        len(old),
        checks,
    )


def _errors(new: Sequence[Sample], old: Sequence[Sample], settings: RolloutSettings) -> Check:
    new_bad, old_bad = sum(not s.ok for s in new), sum(not s.ok for s in old)
    new_ratio, old_ratio = new_bad / len(new), old_bad / len(old)
    p = fisher_greater(new_bad, len(new), old_bad, len(old))
    failed = p < settings.alpha and new_ratio - old_ratio > settings.max_error_increase
    detail = f"error ratio {new_ratio:.2%} vs {old_ratio:.2%} (p={p:.2g})"
    return Check("errors", not failed, p, new_ratio, old_ratio, detail)


def _tail(name: str, new: Sequence[float], old: Sequence[float], settings: RolloutSettings) -> Check:
    if len(new) < settings.min_samples or len(old) < settings.min_samples:
        return Check(name, True, None, None, None, "too few successful answers to judge")
    test = tail_greater(new, old, 0.95)
    new_p95 = quantile(new, 0.95)
    slower_ms = (new_p95 - test.threshold) * 1000
    failed = (
        test.p_value < settings.alpha
        and test.ratio > 1 + settings.max_latency_increase
        and slower_ms > settings.min_latency_increase_ms
    )
    detail = (
        f"P95 {new_p95 * 1000:.1f} ms vs {test.threshold * 1000:.1f} ms ({test.ratio - 1:+.0%}); "
        f"{test.a_share:.1%} above the baseline's P95 (p={test.p_value:.2g})"
    )
    return Check(name, not failed, test.p_value, new_p95, test.threshold, detail)


def _median(new: Sequence[float], old: Sequence[float], settings: RolloutSettings) -> Check:
    if len(new) < settings.min_samples or len(old) < settings.min_samples:
        return Check("ttft_median", True, None, None, None, "too few successful answers to judge")
    p = mann_whitney_greater(new, old)
    new_m, old_m = quantile(new, 0.5), quantile(old, 0.5)
    ratio = new_m / old_m if old_m > 0 else math.inf
    slower_ms = (new_m - old_m) * 1000
    failed = (
        p < settings.alpha
        and ratio > 1 + settings.max_latency_increase
        and slower_ms > settings.min_latency_increase_ms
    )
    detail = f"median TTFT {new_m * 1000:.1f} ms vs {old_m * 1000:.1f} ms ({ratio - 1:+.0%}, p={p:.2g})"
    return Check("ttft_median", not failed, p, new_m, old_m, detail)


def _answers(same: Sequence[bool], settings: RolloutSettings) -> Check:
    if not same:
        return Check("answers", True, None, None, None, "no shadow comparisons")
    differ = sum(not s for s in same)
    share = differ / len(same)
    limit = settings.max_answer_change
    if limit is None:
        return Check("answers", True, None, share, None, f"{share:.1%} of {len(same)} greedy answers differ (no limit)")
    p = binomial_greater(differ, len(same), limit) if limit > 0 else (0.0 if differ else 1.0)
    failed = p < settings.alpha and share > limit
    return Check(
        "answers", not failed, p, share, limit, f"{share:.1%} of {len(same)} greedy answers differ (p={p:.2g})"
    )


def parse_sample(line: bytes) -> Sample | None:
    """A sample line as routers write them ("version ok ttft_s e2e_s unix"); None when malformed."""
    parts = line.split()
    if len(parts) != 5:
        return None
    try:
        return Sample(parts[0].decode(), parts[1] == b"1", float(parts[2]), float(parts[3]), float(parts[4]))
    except ValueError:
        return None


def sample_line(version: str, ok: bool, ttft_s: float, e2e_s: float, at: float) -> bytes:
    return f"{version} {int(ok)} {ttft_s:.6f} {e2e_s:.6f} {at:.3f}".encode()
