"""Every metric the autoscaler exports, declared here and used only through `record_*` methods.

Labels: pool (a pool's name; `default` for a cluster without pools), direction (up, down, hold), reason
(autoscale.policy.REASONS), state (starting, serving, draining), kind (prefill, decode, batch), action and
result. The autoscaler serves them at `/metrics` on autoscale.port; Prometheus scrapes it as the job
`qvl-autoscaler` (deploy/prometheus/prometheus.yml).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

STATES = ("starting", "serving", "draining")


class AutoscalerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._decisions = Counter(
            "qvl_autoscaler_decisions",
            "Autoscaling decisions, one per pool per interval: direction up, down or hold, and why",
            ["pool", "direction", "reason"],
            registry=self.registry,
        )
        self._desired = Gauge(
            "qvl_autoscaler_desired_replicas",
            "Replicas the autoscaler wants the pool to have",
            ["pool"],
            registry=self.registry,
        )
        self._actual = Gauge(
            "qvl_autoscaler_actual_replicas",
            "Replicas the pool has, by state: starting (placed, not yet healthy), serving, draining (left the "
            "registry, finishing its requests)",
            ["pool", "state"],
            registry=self.registry,
        )
        self._needed = Gauge(
            "qvl_autoscaler_needed_replicas",
            "Replicas the policy's signal asks for, before rounding, bounds and the stability rules",
            ["pool"],
            registry=self.registry,
        )
        self._demand = Gauge(
            "qvl_autoscaler_demand_tokens_per_second",
            "The pool's load the autoscaler sees: interactive prefill and decode tokens per second, and batch "
            "tokens per second (kept out of the interactive demand)",
            ["pool", "kind"],
            registry=self.registry,
        )
        self._capacity = Gauge(
            "qvl_autoscaler_capacity_tokens_per_second",
            "One replica's capacity at the SLO the autoscaler divides by (0 while unknown)",
            ["pool", "kind"],
            registry=self.registry,
        )
        self._startup = Gauge(
            "qvl_autoscaler_startup_seconds",
            "The start-up time the forecast looks ahead: the longer of autoscale.startup_s and the measured ones",
            ["pool"],
            registry=self.registry,
        )
        self._actions = Counter(
            "qvl_autoscaler_actions",
            "Replicas started and stopped: action start, stop_starting (removed before it served), drain; result "
            "ok, failed, timeout (a drain that outlived drain_timeout_s), dry_run (logged, not done)",
            ["pool", "action", "result"],
            registry=self.registry,
        )
        self._dry_run = Gauge(
            "qvl_autoscaler_dry_run", "1 when the autoscaler only logs what it would do", registry=self.registry
        )

    def record_decision(self, pool: str, direction: str, reason: str, desired: int, needed: float) -> None:
        self._decisions.labels(pool, direction, reason).inc()
        self._desired.labels(pool).set(desired)
        self._needed.labels(pool).set(needed)

    def record_fleet(self, pool: str, counts: dict[str, int]) -> None:
        for state in STATES:
            self._actual.labels(pool, state).set(counts.get(state, 0))

    def record_load(
        self, pool: str, prefill: float, decode: float, batch: float, capacity: tuple[float, float], startup_s: float
    ) -> None:
        self._demand.labels(pool, "prefill").set(prefill)
        self._demand.labels(pool, "decode").set(decode)
        self._demand.labels(pool, "batch").set(batch)
        self._capacity.labels(pool, "prefill").set(capacity[0])
        self._capacity.labels(pool, "decode").set(capacity[1])
        self._startup.labels(pool).set(startup_s)

    def record_action(self, pool: str, action: str, result: str) -> None:
        self._actions.labels(pool, action, result).inc()

    def set_dry_run(self, on: bool) -> None:
        self._dry_run.set(1 if on else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
