"""A whole run's summary, derived from its records: throughput and goodput, latency percentiles, errors,
cache results, per-replica shares, the SLO checks, and whether the run is valid.

A distributed run's workers each judged their own share of the schedule (loadtests/records.py); the run
is valid only if every one of them is and the merged P99 send lag is within the bound too.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from loadtests.records import DEFAULT_MAX_SEND_LAG_MS, Record, Summary, percentile
from loadtests.slo import Check, Objective, check, meets


@dataclass(frozen=True)
class Percentiles:
    """P50, P90, P99 and the count they were taken over, in milliseconds (None when there is no value)."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        return cls(len(values), percentile(values, 50), percentile(values, 90), percentile(values, 99))


@dataclass(frozen=True)
class RunSummary:
    """The headline numbers of a run; `to_json` is what summary.json holds."""

    requests: int
    ok: int
    errors: int
    error_ratio: float
    errors_by_type: dict[str, int]
    duration_s: float
    """From the first send to the last answer."""
    throughput_rps: float
    """Requests answered without error per second of `duration_s`."""
    goodput_rps: float | None
    """Requests per second that met every SLO; None when no SLO was given."""
    ttft_ms: Percentiles
    itl_ms: Percentiles
    """Over streamed requests, each counted once by its mean inter-token gap."""
    e2e_ms: Percentiles
    send_lag_p99_ms: float | None
    max_send_lag_ms: float
    valid: bool
    late_workers: list[int]
    """Workers whose own share was late (a distributed run); [0] for a late single process."""
    slo: list[Check] = field(default_factory=list)
    slo_held: bool | None = None
    """Every objective held and there were answers; None when no SLO was given."""
    cache: dict[str, int] = field(default_factory=dict)
    """Requests by the router's x-qvl-cache header."""
    replicas: dict[str, int] = field(default_factory=dict)
    """Requests by the replica that answered (x-qvl-replica)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=2)

    def verdict(self) -> str:
        """One line: valid or INVALID (the generator fell behind), and whether the SLO held."""
        lag = "n/a" if self.send_lag_p99_ms is None else f"{self.send_lag_p99_ms:.1f} ms"
        if not self.valid:
            where = f" (workers {self.late_workers})" if len(self.late_workers) > 1 or self.late_workers != [0] else ""
            text = f"run INVALID: the generator fell behind{where}: P99 send lag {lag} > {self.max_send_lag_ms:g} ms"
        elif self.send_lag_p99_ms is None:
            text = "run valid: a closed loop (no schedule to fall behind)"
        else:
            text = f"run valid: P99 send lag {lag} <= {self.max_send_lag_ms:g} ms"
        if self.slo_held is None:
            return text
        missed = [c.objective for c in self.slo if not c.held]
        if self.ok == 0:
            return f"{text}; SLO MISSED: no request was answered"
        return f"{text}; SLO {'held' if self.slo_held else 'MISSED: ' + ', '.join(missed)}"


def summarise_run(
    records: Sequence[Record],
    processes: Sequence[Summary] = (),
    objectives: Sequence[Objective] = (),
    max_send_lag_ms: float = DEFAULT_MAX_SEND_LAG_MS,
) -> RunSummary:
    """The summary of a run from its merged records and each locust process's own summary."""
    ok = [r for r in records if r.error_type is None]
    lags = [r.send_lag_ms for r in records if r.send_lag_ms is not None]
    lag_p99 = percentile(lags, 99)
    late = sorted({s.worker for s in processes if not s.valid})
    valid = not late and (lag_p99 is None or lag_p99 <= max_send_lag_ms)
    if not valid and not late:
        late = [0]
    start = min((r.sent_s for r in records), default=0.0)
    end = max((r.sent_s + r.e2e_ms / 1000 for r in records), default=0.0)
    duration = max(end - start, 1e-9)
    checks = check(records, objectives) if objectives else []
    good = sum(meets(r, objectives) for r in records) if objectives else None
    return RunSummary(
        requests=len(records),
        ok=len(ok),
        errors=len(records) - len(ok),
        error_ratio=(len(records) - len(ok)) / len(records) if records else 0.0,
        errors_by_type=dict(Counter(r.error_type for r in records if r.error_type is not None)),
        duration_s=duration if records else 0.0,
        throughput_rps=len(ok) / duration if records else 0.0,
        goodput_rps=None if good is None else (good / duration if records else 0.0),
        ttft_ms=Percentiles.of([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        itl_ms=Percentiles.of([r.itl.mean_ms for r in ok if r.itl is not None and r.itl.mean_ms is not None]),
        e2e_ms=Percentiles.of([r.e2e_ms for r in ok]),
        send_lag_p99_ms=lag_p99,
        max_send_lag_ms=max_send_lag_ms,
        valid=valid,
        late_workers=late,
        slo=checks,
        slo_held=None if not objectives else bool(ok) and all(c.held for c in checks),
        cache=dict(Counter(r.cache for r in records if r.cache is not None)),
        replicas=dict(Counter(r.replica for r in records if r.replica is not None)),
    )
