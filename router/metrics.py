"""Every metric the router exports, declared here and used only through `record_*` methods.

Labels are bounded: model (only models some replica serves; anything else is `_unknown`), replica
(host:port, `cache` or `none`), HTTP status, cache result, error type, failure reason, and on
`qvl_key_requests_total` alone the API key's id (the operator-chosen name from the keys file, never the
key itself). Never a request id, user id, key or image digest. Replica and store gauges are read at
scrape time, so the hot path never touches them.

Latency buckets span 5 ms to 120 s: a cache hit is a few ms, a long answer on a loaded 8B replica is
tens of seconds, and router.request_timeout_s defaults to 600 s (anything above 120 s lands in +Inf).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.classes import CLASSES, Klass
from router.replicas import Replica
from router.routes import Route

UNKNOWN_MODEL = "_unknown"
CACHE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
# Inter-token gaps: ~10 ms on an idle GPU, ~100 ms+ when a replica is saturated.
ITL_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The `cache` label of a request the edge refused before any lookup.
NO_LOOKUP = "none"
# Upstream failure types (the `type` label of qvl_upstream_errors_total).
UPSTREAM_ERROR_TYPES = ("connect", "connect_timeout", "disconnect", "http_5xx", "timeout", "stream_interrupted")


class _StateCollector(Collector):
    """Gauges read when Prometheus scrapes: replica state from the pool, store health from the cache, the
    registry's and the quota store's state."""

    def __init__(
        self,
        replicas: Callable[[], Iterable[Replica]],
        stores: Callable[[], Mapping[str, bool]],
        audit: Callable[[], tuple[int, int, int] | None],
        discovery: Callable[[], tuple[bool, int] | None],
        quota: Callable[[], tuple[bool, float] | None],
    ) -> None:
        self._replicas = replicas
        self._stores = stores
        self._audit = audit
        self._discovery = discovery
        self._quota = quota

    def collect(self) -> Iterable[Metric]:
        healthy = GaugeMetricFamily(
            "qvl_replica_healthy",
            "1 if the replica takes traffic; one series per model it serves (model _unknown until it has "
            "answered /v1/models)",
            labels=["replica", "model"],
        )
        in_flight = GaugeMetricFamily(
            "qvl_replica_in_flight", "Requests this router has open on the replica", labels=["replica"]
        )
        waiting = GaugeMetricFamily(
            "qvl_replica_engine_waiting", "vllm:num_requests_waiting as last scraped", labels=["replica"]
        )
        running = GaugeMetricFamily(
            "qvl_replica_engine_running", "vllm:num_requests_running as last scraped", labels=["replica"]
        )
        batch = GaugeMetricFamily(
            "qvl_batch_in_flight", "Batch lines this router has open on the replica", labels=["replica"]
        )
        for r in self._replicas():
            # Public names only: a pooled replica's MODEL@VERSION name would count it twice in every sum.
            for model in [m for m in r.models if "@" not in m] or [UNKNOWN_MODEL]:
                healthy.add_metric([r.name, model], 1.0 if r.healthy else 0.0)
            in_flight.add_metric([r.name], r.in_flight)
            waiting.add_metric([r.name], r.waiting)
            running.add_metric([r.name], r.running)
            batch.add_metric([r.name], r.batch_in_flight)
        store_up = GaugeMetricFamily(
            "qvl_cache_store_up", "1 if the answer-cache store answered its last health ping", labels=["store"]
        )
        for store, up in self._stores().items():
            store_up.add_metric([store], 1.0 if up else 0.0)
        families: list[Metric] = [healthy, in_flight, waiting, running, batch, store_up]
        registry = self._discovery()
        if registry is not None:
            registry_up, routers = registry
            families.append(
                GaugeMetricFamily(
                    "qvl_registry_up", "1 if the router's last read of the replica registry worked", value=registry_up
                )
            )
            families.append(
                GaugeMetricFamily(
                    "qvl_registry_routers",
                    "Live routers in the registry, this one included, at the last read that worked",
                    value=routers,
                )
            )
        quota = self._quota()
        if quota is not None:
            degraded, seconds = quota
            families.append(
                GaugeMetricFamily(
                    "qvl_quota_degraded",
                    "1 while the shared quota store does not answer and router.quota.on_store_failure applies",
                    value=degraded,
                )
            )
            families.append(
                CounterMetricFamily(
                    "qvl_quota_degraded_seconds", "Seconds this router's quotas have been degraded", value=seconds
                )
            )
        audit = self._audit()
        if audit is not None:
            written, errors, pending = audit
            families.append(CounterMetricFamily("qvl_audit_lines", "Audit lines written to disk", value=written))
            families.append(
                CounterMetricFamily("qvl_audit_write_errors", "Failed audit write attempts (retried)", value=errors)
            )
            families.append(GaugeMetricFamily("qvl_audit_pending", "Audit lines not yet on disk", value=pending))
        return families


class _RouteCollector(Collector):
    """The routes this router applies, read at scrape time."""

    def __init__(self, routes: Callable[[], Iterable[Route]]) -> None:
        self._routes = routes

    def collect(self) -> Iterable[Metric]:
        weight = GaugeMetricFamily(
            "qvl_route_weight_percent", "Share of a model's requests each version gets now", labels=["model", "version"]
        )
        rollout = GaugeMetricFamily(
            "qvl_route_in_rollout", "1 while a rollout owns the model's route", labels=["model"]
        )
        step = GaugeMetricFamily(
            "qvl_rollout_step_percent",
            "While a rollout owns the model's route: its step, the percent of requests the new version gets",
            labels=["model", "version"],
        )
        for route in self._routes():
            for version, _ in route.versions:
                weight.add_metric([route.model, version], route.weight_of(version))
            rollout.add_metric([route.model], 1.0 if route.rollout else 0.0)
            if route.rollout:
                target = route.versions[0][0]  # a rollout puts its new version first (router/rollout/steps.py)
                step.add_metric([route.model, target], route.weight_of(target))
        return [weight, rollout, step]


class RouterMetrics:
    """The router's metrics, in a registry of their own (no process-global state)."""

    def __init__(
        self,
        replicas: Callable[[], Iterable[Replica]],
        stores: Callable[[], Mapping[str, bool]] = dict,
        audit: Callable[[], tuple[int, int, int] | None] = lambda: None,
        discovery: Callable[[], tuple[bool, int] | None] = lambda: None,
        quota: Callable[[], tuple[bool, float] | None] = lambda: None,
        routes: Callable[[], Iterable[Route]] = tuple,
    ) -> None:
        self.registry = CollectorRegistry()
        self._by_key = Counter(
            "qvl_key_requests",
            "Chat requests by API key id (never the key) and HTTP status; key_id '' when auth is off",
            ["key_id", "status"],
            registry=self.registry,
        )
        self._requests = Counter(
            "qvl_requests",
            "Chat requests answered, by model, the replica that answered (cache, none), HTTP status (for a "
            "stream that ended with an error event, that error's status), cache result and error type ('' if none)",
            ["model", "replica", "status", "cache", "error_type"],
            registry=self.registry,
        )
        self._duration = Histogram(
            "qvl_request_duration_seconds",
            "Time from the request's arrival at the router to its last byte",
            ["model", "stream"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._ttft = Histogram(
            "qvl_time_to_first_token_seconds",
            "Streams answered by a replica: time from arrival at the router to the first streamed token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._itl = Histogram(
            "qvl_inter_token_latency_seconds",
            "Streams answered by a replica: mean gap between streamed events after the first, one "
            "observation per request (vllm:inter_token_latency_seconds has the per-token view)",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self._retries = Counter(
            "qvl_retries", "Requests moved to another replica after a failed attempt", ["model"], registry=self.registry
        )
        self._upstream_errors = Counter(
            "qvl_upstream_errors",
            "Upstream failures by replica and type: " + ", ".join(UPSTREAM_ERROR_TYPES),
            ["replica", "type"],
            registry=self.registry,
        )
        self._rejections = Counter(
            "qvl_rejections",
            "Requests the router refused before any replica saw them, by reason (the error code)",
            ["reason"],
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
        self._batches = Counter(
            "qvl_batches",
            "Batch jobs that entered a status on this router: created, in_progress, completed, failed, cancelled, "
            "expired",
            ["status"],
            registry=self.registry,
        )
        self._batch_lines = Counter(
            "qvl_batch_lines",
            "Batch lines answered (completed) or failed, recorded by this router",
            ["result"],
            registry=self.registry,
        )
        admissions = Counter(
            "qvl_admission_decisions",
            "Admission decisions by priority class: admitted, shed (flex refused under overload), deferred (a batch "
            "line put back for lack of room or quota) and aborted (a batch line taken back when its replica filled up)",
            ["class", "decision"],
            registry=self.registry,
        )
        self._admissions = admissions
        # Bound once: the interactive path counts every request.
        self._admitted = {klass: admissions.labels(klass, "admitted") for klass in CLASSES}
        self._version_requests = Counter(
            "qvl_version_requests",
            "Chat requests answered by a chosen model version, by model, version and status class (2xx, 4xx, 5xx)",
            ["model", "version", "code"],
            registry=self.registry,
        )
        self._version_ttft = Histogram(
            "qvl_version_time_to_first_token_seconds",
            "Requests answered by a chosen model version: time to the first token (a non-streamed answer's whole time)",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._version_duration = Histogram(
            "qvl_version_request_duration_seconds",
            "Requests answered by a chosen model version: time from arrival to the last byte",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._shadow = Counter(
            "qvl_shadow_comparisons",
            "Shadow copies by model, version and result: same, differ (the answer text), error, skipped (too "
            "many copies in flight)",
            ["model", "version", "result"],
            registry=self.registry,
        )
        self._decisions = Counter(
            "qvl_rollout_decisions",
            "Rollout decisions that changed something: start, advance, promote, abort, pause, resume; by "
            "analysis or operator; cause: operator, checks_passed, or the failed checks (errors, ttft_p95, e2e_p95, "
            "ttft_median, answers) joined by +",
            ["model", "decision", "by", "cause"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(replicas, stores, audit, discovery, quota))
        self.registry.register(_RouteCollector(routes))

    def record_version(self, model: str, version: str, status: int, ttft_s: float, seconds: float) -> None:
        self._version_requests.labels(model, version, f"{status // 100}xx").inc()
        if status < 400:
            self._version_ttft.labels(model, version).observe(ttft_s)
            self._version_duration.labels(model, version).observe(seconds)

    def record_shadow(self, model: str, version: str, result: str) -> None:
        self._shadow.labels(model, version, result).inc()

    def record_rollout_decision(self, model: str, decision: str, by: str, cause: str) -> None:
        self._decisions.labels(model, decision, by, cause).inc()

    def record_request(
        self, model: str, replica: str, status: int, cache: str, error_type: str, seconds: float, stream: bool
    ) -> None:
        self._requests.labels(model, replica, str(status), cache, error_type).inc()
        self._duration.labels(model, "true" if stream else "false").observe(seconds)

    def record_key(self, key_id: str, status: int) -> None:
        self._by_key.labels(key_id, str(status)).inc()

    def record_stream_timing(self, model: str, first_token_s: float, inter_token_s: float | None) -> None:
        """A stream answered by a replica: its TTFT, and its mean inter-token gap when it had two events."""
        self._ttft.labels(model).observe(first_token_s)
        if inter_token_s is not None:
            self._itl.labels(model).observe(inter_token_s)

    def record_retry(self, model: str) -> None:
        self._retries.labels(model).inc()

    def record_upstream_error(self, replica: str, kind: str) -> None:
        self._upstream_errors.labels(replica, kind).inc()

    def record_rejection(self, reason: str) -> None:
        self._rejections.labels(reason).inc()

    def record_disconnect(self, model: str) -> None:
        self._disconnects.labels(model).inc()

    def record_cache_result(self, result: str) -> None:
        self._cache_requests.labels(result).inc()

    def record_cache_operation(self, op: str, store: str, seconds: float) -> None:
        self._cache_seconds.labels(op, store).observe(seconds)

    def record_cache_stored(self, store: str) -> None:
        self._cache_stored.labels(store).inc()

    def record_admitted(self, klass: Klass) -> None:
        self._admitted[klass].inc()

    def record_admission(self, klass: str, decision: str) -> None:
        self._admissions.labels(klass, decision).inc()

    def record_batch(self, status: str) -> None:
        self._batches.labels(status).inc()

    def record_batch_line(self, result: str) -> None:
        self._batch_lines.labels(result).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
