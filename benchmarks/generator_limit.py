"""The load generator's own limit on this machine: the highest rate `qvl loadtest` sends on schedule.

A load test is only as good as its generator: past its limit, sends go out late and the latencies it
reports describe the load machine. This runs `qvl loadtest sweep` with the storefront workload (streamed
answers: the client reads every token) against a router in front of one `qvl sim --zero-delay` replica,
both at a lower CPU priority than the generator, at rising rates, with one locust process and with two.
Reported per level: P99 send lag and the verdict against the 10 ms bound. The limit is the highest rate
that stayed valid. The router and the simulator share this machine's cores with the generator: on a
load machine of its own the generator goes further.

    python -m benchmarks.generator_limit [--rates 25,50,100,150] [--duration 20] [--processes 1,2]

Writes benchmarks/results/generator_limit.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from benchmarks.common import RESULTS, start_qvl
from qvl.procs import free_port

WORKLOAD = Path(__file__).resolve().parents[1] / "loadtests" / "workloads" / "storefront.yaml"
KEY_ENVS = ("QVL_LOADTEST_KEY_WEB", "QVL_LOADTEST_KEY_APP")


def sweep(target: str, rates: str, duration: int, processes: int, out: Path) -> dict[str, object]:
    """One `qvl loadtest sweep` (an SLO every level holds unless it errs: validity decides the knee)."""
    env = {**os.environ, **{k: "sk-bench-generator-0123456789" for k in KEY_ENVS}}
    argv = [sys.executable, "-m", "qvl", "loadtest", "sweep", "--workload", str(WORKLOAD), "--target", target]
    argv += ["--rates", rates, "--duration", f"{duration}s", "--processes", str(processes)]
    argv += ["--slo", "errors<=1%", "--out", str(out), "--drain", "30s"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if not (out / "sweep.json").exists():
        raise SystemExit(f"the sweep failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, object] = json.loads((out / "sweep.json").read_text())
    levels = []
    for level in result["levels"]:  # type: ignore[attr-defined]
        summary = json.loads((out / level["folder"] / "summary.json").read_text())
        levels.append({**level, "send_lag_p99_ms": summary["send_lag_p99_ms"], "requests": summary["requests"]})
    return {"processes": processes, "levels": levels, "limit_rps": result["knee_rps"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="25,50,100,150", help="rates to try, in order")
    parser.add_argument("--duration", type=int, default=20, help="seconds per level")
    parser.add_argument("--processes", default="1,2", help="locust process counts to try")
    args = parser.parse_args()

    sim = start_qvl(["sim", "--zero-delay"], free_port(), "/health")
    router_port = free_port()
    router = start_qvl(["router", "--replica", sim.url, "--no-auth", "--cache", "off"], router_port, "/ready")
    runs = []
    try:
        for child in (sim, router):
            psutil.Process(child.pid).nice(10)
        with tempfile.TemporaryDirectory(prefix="qvl-generator-") as tmp:
            for processes in (int(p) for p in args.processes.split(",")):
                print(f"generator_limit: {processes} locust process(es), rates {args.rates}", flush=True)
                runs.append(sweep(router.url, args.rates, args.duration, processes, Path(tmp) / f"p{processes}"))
    finally:
        router.stop(10)
        sim.stop(10)

    doc = {
        "benchmark": "generator_limit",
        "workload": WORKLOAD.name,
        "duration_s": args.duration,
        "max_send_lag_ms": 10.0,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generator_limit.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Load generator limit",
        "",
        f"`qvl loadtest` with {WORKLOAD.name} (streamed) against a router and one `qvl sim --zero-delay` on the",
        f"same {os.cpu_count()}-core machine (reniced); {args.duration} s per level; valid = P99 send lag <= 10 ms.",
        "",
        "| locust processes | rate (req/s) | requests | P99 send lag (ms) | valid |",
        "|---:|---:|---:|---:|:---:|",
    ]
    for run in runs:
        for level in run["levels"]:  # type: ignore[attr-defined]
            lag = level["send_lag_p99_ms"]
            lag_text = "-" if lag is None else f"{lag:.1f}"
            valid = "yes" if level["valid"] else "INVALID"
            lines.append(f"| {run['processes']} | {level['rate']:g} | {level['requests']} | {lag_text} | {valid} |")
    lines.append("")
    for run in runs:
        limit = run["limit_rps"]
        found = "none of the rates" if limit is None else f"{limit:g} requests/s"
        lines.append(f"- {run['processes']} process(es): highest rate sent on schedule: {found}")
    (RESULTS / "generator_limit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
