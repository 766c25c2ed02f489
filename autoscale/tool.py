"""`qvl autoscale replay`: tune the autoscale settings on a rate trace before they meet real traffic.

The named traces (autoscale/traces.py) or a CSV of `t_s,rate` rows (the planner's rate-curve format) are
replayed in virtual time (autoscale/replay.py) against the settings' policy, the reactive baseline and an
oracle that knows the trace; a table gives each one's minutes in violation of the SLO, replica-hours (and
their ratio to the oracle's) and direction changes per hour, and a figure shows the replicas against the
load. `--live` replays the same trace through the real router and autoscaler with simulated replicas on a
local Ray cluster in compressed time (autoscale/live.py), the check of what the model predicts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from autoscale.policy import DemandPolicy, ReactivePolicy
from autoscale.replay import Fleet, Replay, oracle, replay
from autoscale.traces import Trace, diurnal, flash_sale, noisy_sine
from loadtests.planner.trace import load_rate_curve
from qvl.settings.autoscale import AutoscaleSettings


@dataclass(frozen=True)
class NamedTrace:
    trace: Trace
    duration_s: float
    about: str


def flash_sale_trace(base: float) -> NamedTrace:
    return NamedTrace(
        flash_sale(base, factor=3.0, at_s=1800.0, rise_s=60.0, hold_s=1200.0),
        5400.0,
        f"flash sale: {base:g} requests/s, 3x within one minute at 30 min, held 20 min, back within a minute",
    )


def noisy_sine_trace(base: float, seed: int = 0) -> NamedTrace:
    return NamedTrace(
        noisy_sine(base * 2, base * 0.8, 3600.0, 0.1, seed=seed),
        4 * 3600.0,
        f"noisy sine: {base * 2:g} +/- {base * 0.8:g} requests/s, period 1 h, 10 % noise per 5 s, 4 h",
    )


def diurnal_trace(base: float) -> NamedTrace:
    return NamedTrace(
        diurnal(base, base * 10, 86_400.0), 86_400.0, f"diurnal day: {base:g} to {base * 10:g} requests/s"
    )


TRACES: Mapping[str, Callable[[float], NamedTrace]] = {
    "flash-sale": flash_sale_trace,
    "noisy-sine": noisy_sine_trace,
    "diurnal": diurnal_trace,
}
"""Built-in traces by name, each built from a base rate (requests/s)."""


def load_trace(name_or_path: str, base: float) -> NamedTrace:
    """A built-in trace by name, else a CSV rate curve (raises SizingError naming a bad file or row)."""
    if name_or_path in TRACES:
        return TRACES[name_or_path](base)
    curve = load_rate_curve(Path(name_or_path))
    return NamedTrace(curve.rate, curve.duration_s, f"rate curve {name_or_path}")


def compare(
    named: NamedTrace, settings: AutoscaleSettings, fleet: Fleet, start: int, tick_s: float = 5.0
) -> dict[str, Replay]:
    """The settings' policy, the reactive baseline (its in-flight target and delays from the same settings)
    and the oracle, on one trace; the oracle's tick is the same."""
    policy = settings.policy
    ran = {
        f"{policy} (settings)": replay(
            named.trace,
            DemandPolicy(settings, fleet.capacity()) if policy == "demand" else ReactivePolicy(settings),
            fleet,
            named.duration_s,
            start,
            tick_s,
        )
    }
    if policy != "reactive":
        baseline = settings.model_copy(update={"policy": "reactive", "schedule": []})
        ran["reactive baseline"] = replay(named.trace, ReactivePolicy(baseline), fleet, named.duration_s, start, tick_s)
    ran["oracle"] = oracle(named.trace, fleet, named.duration_s, tick_s)
    return ran


def rows(runs: Mapping[str, Replay]) -> list[dict[str, object]]:
    """One row per run: violation minutes, replica-hours, their ratio to the oracle's, direction changes/h."""
    best = runs["oracle"].replica_hours
    return [
        {
            "policy": name,
            "violation_min": round(run.violation_s / 60, 2),
            "replica_hours": round(run.replica_hours, 2),
            "vs_oracle": round(run.replica_hours / best, 3) if best else math.nan,
            "direction_changes_per_hour": round(run.direction_changes_per_hour(), 2) if run.decisions else None,
            "max_replicas": max(run.held, default=0),
        }
        for name, run in runs.items()
    ]


def table(found: list[dict[str, object]]) -> str:
    """The rows as a Markdown table."""
    head = ["policy", "violation_min", "replica_hours", "vs_oracle", "direction_changes_per_hour", "max_replicas"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join("-" if r[h] is None else str(r[h]) for h in head) + " |" for r in found]
    return "\n".join(lines)


def plot(runs: Mapping[str, Replay], title: str, path: Path, capacity_rps: float) -> Path:
    """Replicas held (starting and serving) by each run, and the replicas the load needs, over time."""
    figure = Figure(figsize=(10, 4.5), layout="constrained")
    axes = figure.add_subplot()
    any_run = next(iter(runs.values()))
    minutes = [t / 60 for t in any_run.times]
    axes.plot(minutes, [r / capacity_rps for r in any_run.rates], color="0.6", lw=1, label="load (replicas' worth)")
    for name, run in runs.items():
        oracle_style = name == "oracle"
        axes.step(
            [t / 60 for t in run.times],
            run.held,
            where="post",
            lw=1.4,
            ls="--" if oracle_style else "-",
            color="black" if oracle_style else None,
            label=f"{name}: held",
        )
    axes.set_xlabel("minutes")
    axes.set_ylabel("replicas")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8, loc="upper left")
    axes.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
