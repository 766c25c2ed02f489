"""Every metric the router exports, declared here and used only through `record_*` methods.

Labels are bounded: model (only models some replica serves; anything else is `_unknown`), replica
(host:port), HTTP status, error type, failure reason. Never a request id, user id or image digest.
Replica gauges are read from the pool at scrape time, so the hot path never touches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.replicas import Replica

UNKNOWN_MODEL = "_unknown"
CACHE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _ReplicaCollector(Collector):
    def __init__(self, replicas: Callable[[], Iterable[Replica]]) -> None:
        self._replicas = replicas

    def collect(self) -> Iterable[Metric]:
        healthy = GaugeMetricFamily("qvl_replica_healthy", "1 if the replica takes traffic", labels=["replica"])
        in_flight = GaugeMetricFamily(
            "qvl_replica_in_flight", "Requests this router has open on the replica", labels=["replica"]
        )
        waiting = GaugeMetricFamily(
            "qvl_replica_engine_waiting", "vllm:num_requests_waiting as last scraped", labels=["replica"]
        )
        for r in self._replicas():
            healthy.add_metric([r.name], 1.0 if r.healthy else 0.0)
            in_flight.add_metric([r.name], r.in_flight)
            waiting.add_metric([r.name], r.waiting)
        return [healthy, in_flight, waiting]


class RouterMetrics:
    """The router's metrics, in a registry of their own (no process-global state)."""

    def __init__(self, replicas: Callable[[], Iterable[Replica]]) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "qvl_requests",
            "Chat requests answered, by the replica that answered, HTTP status and error type ('' if none)",
            ["model", "replica", "status", "error_type"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "qvl_request_duration_seconds",
            "Time from the request's arrival to its last byte",
            ["model", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._attempt_failures = Counter(
            "qvl_upstream_attempt_failures",
            "Upstream attempts that failed before the first byte and were retried or given up",
            ["replica", "reason"],
            registry=self.registry,
        )
        self._disconnects = Counter(
            "qvl_client_disconnects",
            "Requests whose client went away before the answer ended",
            ["model"],
            registry=self.registry,
        )
        self._cache_requests = Counter(
            "qvl_cache_requests",
            "Chat requests by cache result: hit, miss, coalesced (answered by an identical in-flight request), "
            "bypass (not cacheable), error (the store failed and was bypassed)",
            ["result"],
            registry=self.registry,
        )
        self._cache_seconds = Histogram(
            "qvl_cache_operation_seconds",
            "Time of one cache store operation (get, lock, wait, publish)",
            ["op", "store"],
            buckets=CACHE_BUCKETS,
            registry=self.registry,
        )
        self._cache_stored = Counter(
            "qvl_cache_stored", "Answers written to the cache store", ["store"], registry=self.registry
        )
        self.registry.register(_ReplicaCollector(replicas))

    def record_request(
        self, model: str, replica: str, status: int, error_type: str, seconds: float, stream: bool
    ) -> None:
        self._requests.labels(model, replica, str(status), error_type).inc()
        self._duration.labels(model, "true" if stream else "false").observe(seconds)

    def record_attempt_failure(self, replica: str, reason: str) -> None:
        self._attempt_failures.labels(replica, reason).inc()

    def record_disconnect(self, model: str) -> None:
        self._disconnects.labels(model).inc()

    def record_cache_result(self, result: str) -> None:
        self._cache_requests.labels(result).inc()

    def record_cache_operation(self, op: str, store: str, seconds: float) -> None:
        self._cache_seconds.labels(op, store).observe(seconds)

    def record_cache_stored(self, store: str) -> None:
        self._cache_stored.labels(store).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
