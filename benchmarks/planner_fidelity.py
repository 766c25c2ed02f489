"""How right the capacity planner is against real vLLM replicas (issue 15's fidelity and capacity targets).

On 2 real vLLM CPU replicas of the tiny Qwen3-VL behind a router (`qvl up --engine vllm`, answer cache off):

1. Calibration: `calibrate` as `qvl plan calibrate` runs it by default (a capacity probe, 7 Poisson levels
   of 40 s). Target: at most 10 minutes.
2. Fidelity: `validate` (two levels between calibration levels, one above, one bursty: Gamma cv 3), each
   predicted in virtual time and measured. Targets, on held-out levels up to 85 % of the knee: median
   absolute error at most 10 % for P50 TTFT, inter-token latency and end-to-end; at most 20 % for P99
   TTFT; at most 25 % for P99 TTFT of the bursty level. The knee is the measured highest compliant rate.
3. Capacity: the highest rate holding the SLO, found by bisection on the real replicas (runs of 40 s,
   between the highest measured level that held and the lowest that missed, to 5 %), against the
   planner's prediction (bisection in virtual time). Target: within 10 %.
4. Replicas: at 90 % of the measured 2-replica capacity, the planner's N (`size`) against the measured
   minimum: the same load on 1 replica (restarted as `qvl up --replicas 1`) and on 2. Target: N is the
   measured minimum or one more, never fewer.

    python -m benchmarks.planner_fidelity [--slo "ttft_p99<=1s,errors<=1%"] [--level-duration 40]

Writes benchmarks/results/planner_fidelity.json and .md (the Markdown derived from the JSON), and keeps
every run folder under benchmarks/results/planner_fidelity/ (git-ignored: raw records for re-analysis).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS
from loadtests.planner.calibrate import CalibrateOptions, calibrate
from loadtests.planner.size import size
from loadtests.planner.validate import (
    DEFAULT_BOUNDS,
    ValidateOptions,
    highest_compliant_rate,
    validate,
)
from loadtests.runner import LoadtestOptions, run_loadtest
from loadtests.slo import Objective, parse_slo
from loadtests.workload import Workload, load_workload, with_load
from qvl.procs import Child, free_port, spawn

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "loadtests" / "workloads" / "calibration.yaml"
RUNS = RESULTS / "planner_fidelity"
MAX_RUNNING = 16  # serving/vllm_replica.py's CPU default max_num_seqs
KNEE_SHARE = 0.85
BISECTION_TOLERANCE = 0.05
Say = Callable[[str], None]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start_cluster(replicas: int, folder: Path) -> Child:
    port = free_port()
    argv = [
        sys.executable, "-m", "qvl", "up", "--engine", "vllm", "--replicas", str(replicas), "--port", str(port),
        "--cache", "off", "--no-auth", "--no-gpu-exporter", "--run-dir", str(folder / "run"),
    ]  # fmt: skip
    child = spawn(f"qvl up ({replicas} vLLM)", argv, url=f"http://127.0.0.1:{port}", log=folder / "up.log")
    child.wait_ready(600, "/ready", progress=say)
    return child


def measure(
    target: str, workload: Workload, objectives: tuple[Objective, ...], slo: str, folder: Path
) -> dict[str, Any]:
    summary = run_loadtest(
        LoadtestOptions(
            workload=workload, workload_file=str(CALIBRATION), target=target, out=folder, objectives=objectives,
            slo_text=slo, drain_s=60.0, scrape_interval_s=1.0, label=folder.name,
        ),
        say,
    )  # fmt: skip
    return {
        "rate": workload.arrivals.rate,  # type: ignore[union-attr]
        "held": bool(summary.slo_held),
        "valid": summary.valid,
        "ttft_p99_ms": summary.ttft_ms.p99,
        "error_ratio": summary.error_ratio,
        "folder": str(folder.relative_to(RESULTS)),
    }


def bisect_real(
    target: str, workload: Workload, objectives: tuple[Objective, ...], slo: str, held: float, missed: float,
    level_s: float, out: Path,
) -> tuple[float, list[dict[str, Any]]]:  # fmt: skip
    """The highest rate holding the SLO on the real replicas, to BISECTION_TOLERANCE, and every probe."""
    probes = []
    step = 0
    while missed / held > 1 + BISECTION_TOLERANCE:
        step += 1
        rate = float(f"{math.sqrt(held * missed):.3g}")
        level = with_load(workload, rate, level_s).model_copy(update={"seed": workload.seed + 200 + step})
        result = measure(target, level, objectives, slo, out / f"bisect-{step}-{rate:g}")
        probes.append(result)
        held, missed = (rate, missed) if result["held"] else (held, rate)
    return held, probes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slo", default="ttft_p99<=1s,errors<=1%", help="the SLO of the capacity checks")
    parser.add_argument("--level-duration", type=float, default=40.0, help="seconds per level (default 40)")
    args = parser.parse_args(argv)
    objectives = parse_slo(args.slo)
    os.environ.setdefault("QVL_LOADTEST_KEY", "bench")
    shutil.rmtree(RUNS, ignore_errors=True)
    RUNS.mkdir(parents=True)
    workload = load_workload(CALIBRATION)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "slo": args.slo,
        "level_s": args.level_duration,
    }
    cluster = start_cluster(2, RUNS / "cluster-2")
    try:
        t0 = time.monotonic()
        profile, fitted = calibrate(
            CalibrateOptions(workload=workload, workload_file=str(CALIBRATION), target=cluster.url,
                             out=RUNS / "plan" / "profile.yaml", level_s=args.level_duration, max_running=MAX_RUNNING),
            say,
        )  # fmt: skip
        result["calibration"] = {
            "wall_s": time.monotonic() - t0,
            "rates": profile.fitted_on.rates,
            "requests": profile.fitted_on.requests,
            "fit_ttft_error": fitted.ttft_error,
            "fit_e2e_error": fitted.e2e_error,
            "costs": {name: est.model_dump() for name, est in profile.costs},
        }
        validation = validate(
            ValidateOptions(
                profile_path=RUNS / "plan" / "profile.yaml", profile=profile, workload=workload,
                workload_file=str(CALIBRATION), target=cluster.url, out=RUNS / "plan" / "validation",
                objectives=objectives, slo_text=args.slo, bounds=dict(DEFAULT_BOUNDS), level_s=args.level_duration,
                calibration_runs=tuple((RUNS / "plan" / "profile-runs").glob("level-*")),
            ),
            say,
        )  # fmt: skip
        result["validation"] = json.loads(validation.to_json())
        # Capacity by bisection on the real replicas, between what the measured levels bracket (calibration
        # and validation levels; when none missed, from the highest that held to half as much again).
        held = validation.max_rate.get("measured_held") or min(profile.fitted_on.rates) / 2
        missed = validation.max_rate.get("measured_missed") or 1.5 * held
        real_max, probes = bisect_real(
            cluster.url, workload, objectives, args.slo, held, missed, args.level_duration, RUNS / "capacity"
        )
        predicted_max = highest_compliant_rate(
            workload,
            profile,
            2,
            "least-loaded",
            objectives,
            False,
            min(profile.fitted_on.rates) / 4,
            max(profile.fitted_on.rates),
            args.level_duration,
        )
        result["capacity"] = {
            "measured_max_rate": real_max,
            "predicted_max_rate": predicted_max,
            "error": None if predicted_max is None else (predicted_max - real_max) / real_max,
            "probes": probes,
        }
        result["fidelity"] = _fidelity(validation, real_max)
    finally:
        cluster.stop()
    # Replicas: the planner's N at 90 % of the measured 2-replica capacity, against 1 and 2 real replicas.
    rate = float(f"{0.9 * real_max:.3g}")
    sizing = size(
        workload, profile, objectives, rate, duration_s=args.level_duration, policy="least-loaded", answer_cache=False
    )
    one = start_cluster(1, RUNS / "cluster-1")
    try:
        level = with_load(workload, rate, args.level_duration).model_copy(update={"seed": workload.seed + 300})
        on_one = measure(one.url, level,
                         objectives, args.slo, RUNS / "replicas-1")  # fmt: skip
    finally:
        one.stop()
    measured_min = 1 if on_one["held"] else 2
    result["replicas"] = {
        "rate": rate,
        "predicted_n": sizing.replicas,
        "measured_min": measured_min,
        "on_one_replica": on_one,
        "ok": sizing.replicas in (measured_min, measured_min + 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "planner_fidelity.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "planner_fidelity.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def _fidelity(validation: Any, knee: float) -> dict[str, Any]:
    """Median absolute errors over the steady levels at most KNEE_SHARE of the knee, and the bursty one."""
    import statistics

    steady = [lv for lv in validation.levels if lv.kind != "bursty" and lv.rate <= KNEE_SHARE * knee]
    bursty = [lv for lv in validation.levels if lv.kind == "bursty"]
    targets = {"ttft_p50": 0.10, "itl_p50": 0.10, "e2e_p50": 0.10, "ttft_p99": 0.20}
    rows = {}
    for name, target in targets.items():
        values = [lv.error[name] for lv in steady if lv.error.get(name) is not None]
        error = statistics.median(values) if values else None
        rows[name] = {
            "error": error,
            "target": target,
            "levels": len(values),
            "met": error is not None and error <= target,
        }
    values = [lv.error["ttft_p99"] for lv in bursty if lv.error.get("ttft_p99") is not None]
    error = statistics.median(values) if values else None
    rows["bursty_ttft_p99"] = {
        "error": error,
        "target": 0.25,
        "levels": len(values),
        "met": error is not None and error <= 0.25,
    }
    return {"knee": knee, "levels_used": [lv.name for lv in steady], "metrics": rows}


def markdown(r: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.1%}"

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4g}"

    cal = r["calibration"]
    lines = [
        "# Capacity planner against real vLLM replicas",
        "",
        f"{r['date']}, {r['machine']}; 2 vLLM CPU replicas of the tiny Qwen3-VL; SLO `{r['slo']}`; "
        f"levels of {r['level_s']:.0f} s.",
        "Produced by `python -m benchmarks.planner_fidelity` (make bench-planner); raw runs under planner_fidelity/.",
        "",
        "## Calibration",
        "",
        f"- {cal['wall_s'] / 60:.1f} minutes (target at most 10), {cal['requests']} requests over levels "
        + ", ".join(f"{x:g}" for x in cal["rates"]) + " req/s",
        f"- median error of the fitted per-request times: TTFT {pct(cal['fit_ttft_error'])}, "
        f"last token {pct(cal['fit_e2e_error'])}",
        "",
        "| term | estimate | 90 % interval |",
        "|---|---:|---|",
    ]  # fmt: skip
    for name, est in cal["costs"].items():
        lines.append(f"| {name} | {est['value']:.4g} | {est['low']:.4g} to {est['high']:.4g} |")
    fid = r["fidelity"]
    lines += [
        "",
        f"## Fidelity on held-out levels (up to {KNEE_SHARE:.0%} of the measured knee, {fid['knee']:g} req/s)",
        "",
        f"Steady levels used: {', '.join(fid['levels_used']) or 'none'}.",
        "",
        "| metric | median abs. error | target | met |",
        "|---|---:|---:|:--:|",
    ]
    for name, row in fid["metrics"].items():
        lines.append(f"| {name} | {pct(row['error'])} | {row['target']:.0%} | {'yes' if row['met'] else 'NO'} |")
    lines += [
        "",
        "Every level (predicted / measured, ms; goodput req/s):",
        "",
        "| level | metric | predicted | measured | error |",
        "|---|---|---:|---:|---:|",
    ]
    for lv in r["validation"]["levels"]:
        for name in ("ttft_p50", "ttft_p99", "itl_p50", "e2e_p50", "goodput"):
            p, m, e = lv["predicted"].get(name), lv["measured"].get(name), lv["error"].get(name)
            lines.append(f"| {lv['name']} | {name} | {num(p)} | {num(m)} | {pct(e)} |")
    cap = r["capacity"]
    lines += [
        "",
        "## Capacity",
        "",
        f"- highest SLO-compliant rate, bisection on the real replicas: {cap['measured_max_rate']:g} req/s",
        f"- predicted (bisection in virtual time): {num(cap['predicted_max_rate'])} req/s; error {pct(cap['error'])} "
        "(target within 10 %)",
        "",
        "| probe rate | SLO held | P99 TTFT ms | valid |",
        "|---:|:--:|---:|:--:|",
    ]  # fmt: skip
    for p in cap["probes"]:
        lines.append(
            f"| {p['rate']:g} | {'yes' if p['held'] else 'no'} | {num(p['ttft_p99_ms'])} | "
            f"{'yes' if p['valid'] else 'no'} |"
        )
    rep = r["replicas"]
    lines += [
        "",
        "## Replicas",
        "",
        f"At {rep['rate']:g} req/s (90 % of the measured 2-replica capacity): "
        f"the planner says N = {rep['predicted_n']}; "
        f"measured: 1 replica {'held' if rep['on_one_replica']['held'] else 'missed'} the SLO "
        f"(P99 TTFT {num(rep['on_one_replica']['ttft_p99_ms'])} ms), so the measured minimum is {rep['measured_min']}. "
        f"Target (N is the minimum or one more, never fewer): {'met' if rep['ok'] else 'NOT met'}.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
