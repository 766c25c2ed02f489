"""Service-level objectives of a load-test run, and goodput: the requests per second that met every one.

An SLO string is a comma-separated list of `METRIC<=BOUND`:

    ttft_p99<=1.5s,itl_p99<=60ms,e2e_p99<=10s,errors<=0.1%

- `ttft_pQ`: the Q-th percentile of time to first token (streamed requests only: a whole JSON answer has
  no first token the client can see);
- `itl_pQ`: the Q-th percentile of the requests' inter-token latency, a request's being the mean gap
  between its tokens (vLLM's benchmark calls it TPOT), so that one slow gap does not fail a whole answer;
- `e2e_pQ`: the Q-th percentile of end-to-end time;
- `errors`: the share of requests that failed (`0.1%` or `0.001`).
Latency bounds take `ms` or `s`. A request counts towards goodput when it did not fail and its own TTFT,
inter-token latency and end-to-end time are each within the bounds given (DistServe's definition).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from loadtests.records import Record, percentile

Metric = Literal["ttft", "itl", "e2e", "errors"]
_LATENCY = re.compile(r"^(ttft|itl|e2e)_p(\d{1,2}(?:\.\d+)?)$")
_BOUND = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|%)?$")


class SloError(ValueError):
    """An SLO string that does not parse; the message names the part and what is expected."""


@dataclass(frozen=True)
class Objective:
    """One objective: a latency percentile under a bound (milliseconds), or the error ratio under a bound."""

    metric: Metric
    percentile: float | None
    """The percentile (0..100) for latency metrics; None for errors."""
    bound: float
    """Milliseconds for a latency, a ratio (0..1) for errors."""
    text: str

    def value(self, record: Record) -> float | None:
        """This objective's metric for one request, in milliseconds; None where it does not apply."""
        if self.metric == "ttft":
            return record.ttft_ms
        if self.metric == "itl":
            return None if record.itl is None else record.itl.mean_ms
        if self.metric == "e2e":
            return record.e2e_ms
        return None


def parse_slo(text: str) -> tuple[Objective, ...]:
    """The objectives of an SLO string (see the module docstring); raises SloError on a bad part."""
    objectives: list[Objective] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, raw = part.partition("<=")
        name, raw = name.strip(), raw.strip()
        if not sep:
            raise SloError(f"SLO part {part!r}: expected METRIC<=BOUND, e.g. ttft_p99<=1.5s")
        bound = _BOUND.match(raw)
        if bound is None:
            raise SloError(f"SLO part {part!r}: the bound {raw!r} is not a number with ms, s or %")
        number, unit = float(bound.group(1)), bound.group(2)
        if name == "errors":
            if unit not in (None, "%"):
                raise SloError(f"SLO part {part!r}: the error bound is a ratio (0.001) or a percentage (0.1%)")
            ratio = number / 100 if unit == "%" else number
            if ratio > 1:
                raise SloError(f"SLO part {part!r}: an error ratio cannot exceed 100%")
            objectives.append(Objective("errors", None, ratio, part))
            continue
        latency = _LATENCY.match(name)
        if latency is None:
            raise SloError(f"SLO part {part!r}: unknown metric {name!r}; use ttft_pQ, itl_pQ, e2e_pQ or errors")
        q = float(latency.group(2))
        if not 0 < q < 100:
            raise SloError(f"SLO part {part!r}: the percentile must be between 0 and 100")
        if unit not in ("ms", "s"):
            raise SloError(f"SLO part {part!r}: a latency bound needs a unit, ms or s")
        metric: Metric = latency.group(1)  # type: ignore[assignment]  # the regex admits only the three names
        objectives.append(Objective(metric, q, number * 1000 if unit == "s" else number, part))
    if not objectives:
        raise SloError("empty SLO: give METRIC<=BOUND parts, e.g. ttft_p99<=1.5s,errors<=0.1%")
    return tuple(objectives)


def meets(record: Record, objectives: Sequence[Objective]) -> bool:
    """Whether one request counts towards goodput: no error, and each of its latencies within bound."""
    if record.error_type is not None:
        return False
    for objective in objectives:
        value = objective.value(record)
        if value is not None and value > objective.bound:
            return False
    return True


@dataclass(frozen=True)
class Check:
    """One objective judged on a run: the measured value beside the bound."""

    objective: str
    measured: float | None
    """Milliseconds or a ratio, as the bound; None when no request had the metric (then it held)."""
    bound: float
    held: bool


def check(records: Sequence[Record], objectives: Sequence[Objective]) -> list[Check]:
    """Each objective judged over a run's records: the percentile of the metric, or the error ratio."""
    checks = []
    for objective in objectives:
        if objective.percentile is None:
            measured: float | None = sum(r.error_type is not None for r in records) / len(records) if records else None
        else:
            ok = [r for r in records if r.error_type is None]
            values = [v for v in (objective.value(r) for r in ok) if v is not None]
            measured = percentile(values, objective.percentile)
        held = measured is None or measured <= objective.bound
        checks.append(Check(objective.text, measured, objective.bound, held))
    return checks
