"""A rate sweep: the same workload at several rates in turn, and its knee, the highest rate whose run was
valid and held the SLO. Each level is an ordinary run folder (`rate-<R>/` under the sweep's folder);
sweep.json and sweep.md beside them hold the table.

A level whose generator fell behind (INVALID) says nothing about the cluster: it neither holds nor misses
the SLO, and a knee above it is still reported (with the invalid level named).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from loadtests.runner import LoadtestOptions, run_loadtest
from loadtests.summary import RunSummary
from loadtests.workload import with_load

SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"


@dataclass(frozen=True)
class Level:
    """One rate of a sweep and what its run showed."""

    rate: float
    folder: str
    valid: bool
    slo_held: bool | None
    throughput_rps: float
    goodput_rps: float | None
    ttft_p99_ms: float | None
    e2e_p99_ms: float | None
    error_ratio: float

    @classmethod
    def of(cls, rate: float, folder: Path, summary: RunSummary) -> Level:
        return cls(
            rate=rate,
            folder=folder.name,
            valid=summary.valid,
            slo_held=summary.slo_held,
            throughput_rps=summary.throughput_rps,
            goodput_rps=summary.goodput_rps,
            ttft_p99_ms=summary.ttft_ms.p99,
            e2e_p99_ms=summary.e2e_ms.p99,
            error_ratio=summary.error_ratio,
        )


@dataclass(frozen=True)
class SweepResult:
    levels: list[Level]
    knee_rps: float | None
    """The highest rate that was valid and held the SLO; None if none did (or no SLO was given)."""
    skipped: list[float]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def knee(levels: Sequence[Level]) -> float | None:
    """The highest rate among valid levels that held the SLO."""
    held = [level.rate for level in levels if level.valid and level.slo_held]
    return max(held) if held else None


def level_folder(out: Path, rate: float) -> Path:
    return out / f"rate-{rate:g}"


def run_sweep(
    base: LoadtestOptions,
    rates: Sequence[float],
    duration_s: float | None,
    stop_at_miss: bool,
    say: Callable[[str], None],
) -> SweepResult:
    """Run every rate of `rates` in turn into `base.out`/rate-R; write sweep.json and sweep.md."""
    levels: list[Level] = []
    skipped: list[float] = []
    for number, rate in enumerate(rates, 1):
        if stop_at_miss and levels and levels[-1].valid and levels[-1].slo_held is False:
            skipped = list(rates[number - 1 :])
            say(f"sweep: the SLO was missed at {levels[-1].rate:g}/s; skipping {', '.join(f'{r:g}' for r in skipped)}")
            break
        say(f"sweep: level {number}/{len(rates)}: {rate:g} requests/s")
        folder = level_folder(base.out, rate)
        options = replace(
            base,
            workload=with_load(base.workload, rate, duration_s),
            out=folder,
            label=f"{rate:g}/s",
            extra={**base.extra, "sweep_level": number},
        )
        summary = run_loadtest(options, say)
        say(f"sweep: {rate:g}/s: {summary.verdict()}")
        levels.append(Level.of(rate, folder, summary))
    result = SweepResult(levels, knee(levels), skipped)
    (base.out / SWEEP_JSON).write_text(result.to_json() + "\n")
    (base.out / SWEEP_MD).write_text(markdown(result))
    return result


def markdown(result: SweepResult) -> str:
    """The sweep's table and knee as Markdown."""
    rows = [
        "| rate (req/s) | valid | SLO | throughput | goodput | TTFT p99 (ms) | E2E p99 (ms) | errors |",
        "|---:|:---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for level in result.levels:
        slo = {True: "held", False: "missed", None: "-"}[level.slo_held]
        rows.append(
            f"| {level.rate:g} | {'yes' if level.valid else 'INVALID'} | {slo} | {level.throughput_rps:.2f} | "
            f"{_num(level.goodput_rps, '.2f')} | {_num(level.ttft_p99_ms, '.0f')} | {_num(level.e2e_p99_ms, '.0f')} | "
            f"{level.error_ratio:.2%} |"
        )
    found = "none of the rates held the SLO" if result.knee_rps is None else f"**{result.knee_rps:g} requests/s**"
    lines = ["# Rate sweep", "", *rows, "", f"Knee (highest valid rate whose SLO held): {found}."]
    if result.skipped:
        lines.append(f"Skipped after a miss: {', '.join(f'{r:g}' for r in result.skipped)} requests/s.")
    invalid = [level.rate for level in result.levels if not level.valid]
    if invalid:
        lines.append(
            f"INVALID levels (the generator fell behind; they say nothing about the cluster): "
            f"{', '.join(f'{r:g}' for r in invalid)} requests/s. Add --processes or a load machine."
        )
    return "\n".join(lines) + "\n"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
