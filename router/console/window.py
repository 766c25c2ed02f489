"""The router's recent history for the operations page: rates, ratios and percentiles over the last minute.

Every `refresh_s` the console samples the router's own metrics registry (the numbers /metrics shows) into a
flat mapping of cumulative counts; the difference between the newest sample and the oldest one inside the
window is what happened in the window, as Prometheus' rate() and histogram_quantile() would compute it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.registry import Collector

Sample = dict[str, float]
"""Cumulative counts by key: `requests`, `requests_5xx`, `requests_4xx`, `cache:<result>`,
`ttft_le:<bound>`, `e2e_le:<bound>`, `mm_queries:<replica>`, `mm_hits:<replica>`."""

_HISTOGRAMS = {
    "qvl_time_to_first_token_seconds_bucket": "ttft_le:",
    "qvl_request_duration_seconds_bucket": "e2e_le:",
}
_CACHE_LOOKUPS = ("hit", "coalesced", "miss", "error")
"""Results that count as lookups in the cache hit ratio, as deploy/prometheus's qvl:cache_hit_ratio:5m has it."""


def sample_registry(registry: Collector) -> Sample:
    """The router's request, cache and latency counters summed over their labels."""
    sample: Sample = {"requests": 0.0, "requests_5xx": 0.0, "requests_4xx": 0.0}
    for family in registry.collect():
        for s in family.samples:
            if s.name == "qvl_requests_total":
                sample["requests"] += s.value
                status = s.labels.get("status", "")
                if status.startswith("5"):
                    sample["requests_5xx"] += s.value
                elif status.startswith("4"):
                    sample["requests_4xx"] += s.value
            elif s.name == "qvl_cache_requests_total":
                key = "cache:" + s.labels.get("result", "")
                sample[key] = sample.get(key, 0.0) + s.value
            elif s.name in _HISTOGRAMS:
                key = _HISTOGRAMS[s.name] + s.labels.get("le", "+Inf")
                sample[key] = sample.get(key, 0.0) + s.value
    return sample


def histogram_quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """The q-quantile of a histogram given as cumulative counts by upper bound (+Inf included), interpolated
    linearly inside the bucket as Prometheus does; the largest finite bound when it falls in +Inf. None when
    the histogram is empty."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True, slots=True)
class WindowStats:
    """What happened in the last `seconds` (None where nothing was observed)."""

    seconds: float
    requests: float
    request_rate: float | None
    error_ratio: float | None
    """Answers with a 5xx status (or a stream that ended with one) over all answers."""
    refused_ratio: float | None
    """Answers with a 4xx status over all answers."""
    cache_hit_ratio: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    e2e_p50_s: float | None
    e2e_p95_s: float | None

    def to_json(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in self.__slots__}


class Window:
    """Samples taken over time; `stats()` compares the newest with the oldest inside `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._samples: deque[tuple[float, Sample]] = deque()

    def add(self, at: float, sample: Sample) -> None:
        self._samples.append((at, sample))
        # Keep one sample at or before the window's start, so the window is covered whole.
        while len(self._samples) > 2 and self._samples[1][0] <= at - self.seconds:
            self._samples.popleft()

    def delta(self) -> tuple[float, Sample]:
        """(seconds covered, counts in that time) between the oldest kept sample and the newest."""
        if not self._samples:
            return 0.0, {}
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        return t1 - t0, {key: value - first.get(key, 0.0) for key, value in last.items()}

    def stats(self) -> WindowStats:
        seconds, d = self.delta()
        requests = d.get("requests", 0.0)
        lookups = sum(d.get("cache:" + r, 0.0) for r in _CACHE_LOOKUPS)
        hits = d.get("cache:hit", 0.0) + d.get("cache:coalesced", 0.0)
        ttft, e2e = _buckets(d, "ttft_le:"), _buckets(d, "e2e_le:")
        return WindowStats(
            seconds=round(seconds, 3),
            requests=requests,
            request_rate=requests / seconds if seconds > 0 else None,
            error_ratio=d.get("requests_5xx", 0.0) / requests if requests else None,
            refused_ratio=d.get("requests_4xx", 0.0) / requests if requests else None,
            cache_hit_ratio=hits / lookups if lookups else None,
            ttft_p50_s=histogram_quantile(0.5, ttft),
            ttft_p95_s=histogram_quantile(0.95, ttft),
            e2e_p50_s=histogram_quantile(0.5, e2e),
            e2e_p95_s=histogram_quantile(0.95, e2e),
        )

    def ratio(self, hits_key: str, queries_key: str) -> float | None:
        """Δhits / Δqueries over the window (None without queries in it)."""
        _, d = self.delta()
        queries = d.get(queries_key, 0.0)
        return d.get(hits_key, 0.0) / queries if queries > 0 else None


def _buckets(delta: Sample, prefix: str) -> dict[float, float]:
    return {float(key[len(prefix) :]): value for key, value in delta.items() if key.startswith(prefix)}
