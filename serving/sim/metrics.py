"""The simulated engine's Prometheus metrics, under vLLM's own names, in a registry of its own.

Dashboards, alert rules and the router's load scraper read these exactly as they read a real
`vllm serve`: every series carries `model_name`, counters gain `_total` on exposition
(`vllm:request_success_total`, ...), and the histogram buckets are vLLM's.

Callers only use the `record_*` methods. They update plain numbers, and one collector turns them
into metric families when Prometheus scrapes; the running/waiting gauges and KV-cache usage are read
from the engine at that moment. The engine lives on one event loop thread, so prometheus_client's
per-sample locks would buy nothing, and at thousands of requests a second (one inter-token
observation per token) they were the largest cost of the hot path.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so histograms compare like for like.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort")


class EngineLoad(Protocol):
    """What the scrape-time gauges read from the engine."""

    @property
    def running(self) -> int: ...

    @property
    def waiting_seen(self) -> int: ...

    @property
    def kv_cache_usage(self) -> float:
        """Share of the KV cache in use, 0 to 1."""
        ...


class _Histogram:
    """Bucket counts, sum and count of one histogram series; cumulated only at scrape time."""

    __slots__ = ("bounds", "counts", "labels", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # repr of a float is the `le` text Prometheus clients write for these bounds ("0.1", "1.0").
        self.labels = (*(repr(float(bound)) for bound in bounds), "+Inf")
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound into that bound's bucket, as `le` requires.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, doc: str, model: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        running = 0
        for label, count in zip(self.labels, self.counts, strict=True):
            running += count
            buckets.append((label, running))
        family = HistogramMetricFamily(name, doc, labels=["model_name"])
        family.add_metric([model], buckets, self.total)
        return family


class SimMetrics(Collector):
    """Every metric of one simulated replica; `render()` gives the /metrics body.

    The counters are plain attributes (`prompt_tokens`, `mm_hits`, `finished[reason]`, ...): read
    them freely, but change them only through the `record_*` methods.
    """

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, model_name: str, load: EngineLoad) -> None:
        self._model = model_name
        self._load = load
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.mm_queries = 0
        self.mm_hits = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self._ttft = _Histogram(TTFT_BUCKETS)
        self._itl = _Histogram(ITL_BUCKETS)
        self._e2e = _Histogram(E2E_BUCKETS)
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def record_prefill(self, prompt_tokens: int, cached_tokens: int, images: int, image_hits: int) -> None:
        """A request was scheduled: its prompt tokens, those served from cache, its images and hits."""
        self.prompt_tokens += prompt_tokens
        self.prefix_queries += prompt_tokens
        self.prefix_hits += cached_tokens
        self.mm_queries += images
        self.mm_hits += image_hits

    def record_first_token(self, seconds: float) -> None:
        """Time from arrival (queueing included, as in vLLM) to the first output token."""
        self._ttft.observe(seconds)

    def record_inter_token(self, seconds: float) -> None:
        """Time between two consecutive output tokens of one request."""
        self._itl.observe(seconds)

    def record_finished(self, reason: str, generated_tokens: int, e2e_seconds: float | None) -> None:
        """A request left the engine: `reason` is one of FINISH_REASONS; e2e is None for aborts."""
        self.finished[reason] += 1
        self.generation_tokens += generated_tokens
        if e2e_seconds is not None:
            self._e2e.observe(e2e_seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def describe(self) -> Iterable[Metric]:
        # Nothing to declare up front; an empty description also keeps register() from collecting.
        return ()

    def collect(self) -> Iterable[Metric]:
        model, load = self._model, self._load
        gauges = (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", load.running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", load.waiting_seen),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", load.kv_cache_usage),
        )
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(name, doc, labels=["model_name"])
            gauge.add_metric([model], value)
            yield gauge
        counters = (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             self.prefix_queries),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", self.prefix_hits),
            ("vllm:mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items.",
             self.mm_queries),
            ("vllm:mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items.", self.mm_hits),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", self.generation_tokens),
        )  # fmt: skip
        for name, doc, count in counters:
            counter = CounterMetricFamily(name, doc, labels=["model_name"])
            counter.add_metric([model], count)
            yield counter
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["model_name", "finished_reason"],
        )
        for reason, count in self.finished.items():
            success.add_metric([model, reason], count)
        yield success
        yield self._ttft.family(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", model
        )
        yield self._itl.family(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", model
        )
        yield self._e2e.family(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", model
        )
