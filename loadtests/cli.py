"""What `qvl loadtest run|sweep|report` do with their parsed flags (qvl/cli/loadtest.py parses them):
build the options, run, print the verdict, map the outcome to the exit status."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from loadtests.runfolder import RunFolderError
from loadtests.runner import FAILED, USAGE, LoadtestError, LoadtestOptions, exit_status, run_loadtest
from loadtests.slo import SloError, parse_slo
from loadtests.summary import RunSummary
from loadtests.sweep import SWEEP_JSON, run_sweep
from loadtests.workload import ClosedLoop, WorkloadError, load_workload, with_load

Say = Callable[[str], None]


def options_from(args: argparse.Namespace, rate: float | None) -> LoadtestOptions:
    """The options of one run from `run`/`sweep` flags; raises WorkloadError or SloError on bad input."""
    if args.processes < 1:
        raise WorkloadError(f"--processes must be at least 1, got {args.processes}")
    workload = with_load(load_workload(args.workload), rate, args.duration)
    slo = getattr(args, "slo", None)
    return LoadtestOptions(
        workload=workload,
        workload_file=str(args.workload),
        target=args.target,
        out=args.out,
        users=args.users,
        processes=args.processes,
        objectives=parse_slo(slo) if slo else (),
        slo_text=slo,
        max_send_lag_ms=args.max_send_lag_ms,
        drain_s=args.drain,
        run_time_s=args.duration if isinstance(workload.arrivals, ClosedLoop) else None,
        scrape_interval_s=args.scrape_interval,
        model=args.model,
        label=getattr(args, "label", None),
    )


def run_command(args: argparse.Namespace, say: Say) -> int:
    try:
        options = options_from(args, args.rate)
        summary = run_loadtest(options, say)
    except (WorkloadError, SloError, LoadtestError) as exc:
        return _failed("qvl loadtest", exc, say)
    say(_headline(summary))
    say(f"qvl loadtest: {summary.verdict()}")
    say(f"qvl loadtest: run folder {options.out}; report: qvl loadtest report {options.out}")
    return exit_status(summary)


def sweep_command(args: argparse.Namespace, say: Say) -> int:
    try:
        base = options_from(args, None)
        result = run_sweep(base, args.rates, args.duration, args.stop_at_miss, say)
    except (WorkloadError, SloError, LoadtestError) as exc:
        return _failed("qvl loadtest sweep", exc, say)
    say((args.out / "sweep.md").read_text().rstrip())
    say(f"qvl loadtest sweep: {args.out / SWEEP_JSON}; report: qvl loadtest report {args.out}")
    return 0 if result.knee_rps is not None else FAILED


def report_command(args: argparse.Namespace, say: Say) -> int:
    from loadtests.report import write_report

    runs = expand_runs(args.runs)
    out = args.out or (runs[0] / "report" if len(args.runs) == 1 and len(runs) == 1 else args.runs[0] / "report")
    try:
        report = write_report(runs, out)
    except RunFolderError as exc:
        say(f"qvl loadtest report: {exc}")
        return FAILED
    say(f"qvl loadtest report: {report.markdown} and {report.html} ({len(report.plots)} plots)")
    return 0


def _failed(command: str, exc: Exception, say: Say) -> int:
    """Say why a run could not be made; its exit status: the LoadtestError's own, else bad input (2)."""
    say(f"{command}: {exc}")
    return exc.code if isinstance(exc, LoadtestError) else USAGE


def expand_runs(paths: list[Path]) -> list[Path]:
    """Run folders as given; a sweep's folder stands for its levels' folders, in rate order."""
    runs: list[Path] = []
    for path in paths:
        levels = sorted(path.glob("rate-*/"), key=lambda p: float(p.name.removeprefix("rate-")))
        runs.extend(levels if (path / SWEEP_JSON).exists() and levels else [path])
    return runs


def _headline(s: RunSummary) -> str:
    good = "" if s.goodput_rps is None else f", goodput {s.goodput_rps:.2f}/s"
    ttft = "" if s.ttft_ms.p99 is None else f"; TTFT p50 {s.ttft_ms.p50:.0f} ms p99 {s.ttft_ms.p99:.0f} ms"
    e2e = "" if s.e2e_ms.p99 is None else f"; E2E p50 {s.e2e_ms.p50:.0f} ms p99 {s.e2e_ms.p99:.0f} ms"
    lines = [
        f"qvl loadtest: {s.requests} requests, {s.errors} errors ({s.error_ratio:.2%}) in {s.duration_s:.1f} s: "
        f"throughput {s.throughput_rps:.2f}/s{good}{ttft}{e2e}"
    ]
    lines += [
        f"  SLO {c.objective}: measured {_fmt(c.measured, c.objective)} -> {'held' if c.held else 'MISSED'}"
        for c in s.slo
    ]
    return "\n".join(lines)


def _fmt(value: float | None, objective: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2%}" if objective.startswith("errors") else f"{value:.0f} ms"
