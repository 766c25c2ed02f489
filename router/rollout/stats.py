"""The tests a rollout's analysis runs: one-sided, exact where it is cheap, each a pure function.

The analysis looks every few seconds, so every p-value is held to a small alpha and every abort also
needs an effect larger than a tolerance: a significant but tiny difference holds nothing back, and an
identical canary (an A/A rollout) is never aborted by chance alone at any practical rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of `values` by linear interpolation between order statistics (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(a_hits: int, a_total: int, b_hits: int, b_total: int) -> float:
    """One-sided Fisher exact test: the p-value of a's hit ratio being this much above b's or more.

    The hypergeometric upper tail P(X >= a_hits), X the hits that a's a_total draws take out of all
    a_total + b_total with a_hits + b_hits hits in all."""
    if not 0 <= a_hits <= a_total or not 0 <= b_hits <= b_total:
        raise ValueError("hits must lie between 0 and their totals")
    total, hits = a_total + b_total, a_hits + b_hits
    if total == 0 or hits == 0:
        return 1.0
    top = min(hits, a_total)
    base = _log_comb(total, a_total)
    terms = [
        _log_comb(hits, x) + _log_comb(total - hits, a_total - x) - base
        for x in range(a_hits, top + 1)
        if a_total - x <= total - hits
    ]
    if not terms:
        return 1.0
    peak = max(terms)
    return min(1.0, math.exp(peak) * sum(math.exp(t - peak) for t in terms))


def mann_whitney_greater(a: Sequence[float], b: Sequence[float]) -> float:
    """One-sided Mann-Whitney U test: the p-value of a's values tending to be larger than b's.

    The normal approximation with the tie correction and a continuity correction; fine from about eight
    values on each side (the analysis asks for more before it judges)."""
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        return 1.0
    pooled = sorted([(v, 0) for v in a] + [(v, 1) for v in b])
    ranks_a = 0.0
    ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        rank = (i + j) / 2 + 1
        count = j - i + 1
        ties += count**3 - count
        ranks_a += rank * sum(1 for k in range(i, j + 1) if pooled[k][1] == 0)
        i = j + 1
    u = ranks_a - n1 * (n1 + 1) / 2
    n = n1 + n2
    variance = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return 0.5 * math.erfc(z / math.sqrt(2))


@dataclass(frozen=True, slots=True)
class TailTest:
    """Whether a's q-quantile is above b's: `threshold` is b's q-quantile, `a_share` and `b_share` the
    shares of each side above it, `p_value` Fisher's on those counts, `ratio` a's quantile over b's."""

    threshold: float
    a_share: float
    b_share: float
    p_value: float
    ratio: float


def tail_greater(a: Sequence[float], b: Sequence[float], q: float = 0.95) -> TailTest:
    """A test of the q-quantile itself: if a's q-quantile were b's, a share 1 - q of a would lie above
    b's; Fisher's test on the counts above it (both sides sampled) says whether a has more."""
    threshold = quantile(b, q)
    a_above = sum(1 for v in a if v > threshold)
    b_above = sum(1 for v in b if v > threshold)
    a_q, b_q = quantile(a, q), threshold
    return TailTest(
        threshold=threshold,
        a_share=a_above / len(a) if a else math.nan,
        b_share=b_above / len(b) if b else math.nan,
        p_value=fisher_greater(a_above, len(a), b_above, len(b)) if a and b else 1.0,
        ratio=a_q / b_q if b_q and not math.isnan(b_q) and not math.isnan(a_q) else math.nan,
    )


def binomial_greater(hits: int, total: int, p0: float) -> float:
    """One-sided exact binomial test: the p-value of `hits` in `total` or more when each has chance p0."""
    if total == 0 or hits == 0:
        return 1.0
    if p0 <= 0:
        return 0.0
    if p0 >= 1:
        return 1.0
    terms = [_log_comb(total, k) + k * math.log(p0) + (total - k) * math.log1p(-p0) for k in range(hits, total + 1)]
    peak = max(terms)
    return min(1.0, math.exp(peak) * sum(math.exp(t - peak) for t in terms))
