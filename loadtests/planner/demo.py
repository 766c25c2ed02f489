"""`make capacity-demo`: the whole planning loop on this machine, command by command, as a user runs it.

1. `qvl up --engine vllm --replicas 2`: two real vLLM replicas of the tiny Qwen3-VL on the CPU.
2. `qvl plan calibrate` against them (a capacity probe, then 7 levels of 40 s).
3. `qvl plan validate` against them (two levels between, one above, one bursty).
4. `qvl plan size` for storefront traffic at a peak rate (refused when validation failed: then sized
   again with --unvalidated, and every output says so).
5. `qvl plan verify`: N and N - 1 simulated replicas with the profile, through a real router.
6. `qvl plan report`.

Each command is printed before it runs. On a GPU host, run the same commands against real Qwen3-VL
replicas (README, "Capacity planning").
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from qvl.procs import free_port, spawn

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION = ROOT / "loadtests" / "workloads" / "calibration.yaml"
STOREFRONT = ROOT / "loadtests" / "workloads" / "storefront.yaml"
SLO = "ttft_p99<=2s,itl_p99<=100ms,errors<=0.1%"
PEAK_RATE = 20.0
MAX_RUNNING = 16  # the CPU replicas' max_num_seqs (serving/vllm_replica.py's CPU default)
START_TIMEOUT_S = 600.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("plan"), help="planning folder (default: ./plan)")
    parser.add_argument("--slo", default=SLO, help=f"the example SLO (default: {SLO})")
    parser.add_argument(
        "--peak-rate", type=float, default=PEAK_RATE, help="storefront peak, req/s (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        print(f"capacity-demo: {out} exists and is not empty: remove it or give --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "QVL_LOADTEST_KEY": os.environ.get("QVL_LOADTEST_KEY", "demo"), "PYTHONUNBUFFERED": "1"}
    env.setdefault("QVL_LOADTEST_KEY_WEB", "demo")
    env.setdefault("QVL_LOADTEST_KEY_APP", "demo")
    port = free_port()
    qvl = [sys.executable, "-m", "qvl"]
    up = spawn(
        "qvl up (2 vLLM replicas)",
        [*qvl, "up", "--engine", "vllm", "--replicas", "2", "--port", str(port), "--cache", "off", "--no-auth",
         "--no-gpu-exporter", "--run-dir", str(out / "cluster")],
        url=f"http://127.0.0.1:{port}",
        log=out / "cluster" / "up.log",
        env=env,
    )  # fmt: skip
    started = time.monotonic()
    timings: dict[str, float] = {}
    try:
        print(
            f"capacity-demo: starting 2 vLLM replicas of the tiny model (log {out / 'cluster' / 'up.log'})", flush=True
        )
        up.wait_ready(START_TIMEOUT_S, "/ready", progress=lambda m: print(m, flush=True))
        target = up.url
        profile = out / "profile.yaml"
        workload = ["--workload", str(CALIBRATION)]

        def plan(step: str, *rest: str) -> int:
            argv = [*qvl, "plan", step, *rest]
            print("\n$ qvl plan " + " ".join(shlex.quote(a) for a in argv[4:]), flush=True)
            t0 = time.monotonic()
            code = subprocess.run(argv, env=env, cwd=ROOT).returncode
            timings[step] = time.monotonic() - t0
            return code

        if plan("calibrate", "--target", target, *workload, "--out", str(profile), "--max-running", str(MAX_RUNNING)):
            return 1
        validated = plan("validate", "--target", target, "--profile", str(profile), *workload, "--slo", args.slo,
                         "--out", str(out / "validation")) == 0  # fmt: skip
        sizing = ["--profile", str(profile), "--workload", str(STOREFRONT), "--slo", args.slo]
        code = plan("size", *sizing, "--peak-rate", f"{args.peak_rate:g}", "--out", str(out / "sizing"))
        if code == 5:
            print("capacity-demo: the profile's error is over a bound, so `size` refused; sizing again with "
                  "--unvalidated to show the rest of the loop (every output says so)", flush=True)  # fmt: skip
            code = plan(
                "size", *sizing, "--peak-rate", f"{args.peak_rate:g}", "--unvalidated", "--out", str(out / "sizing")
            )
        if code:
            return 1
    finally:
        up.stop()
    replicas = json.loads((out / "sizing" / "sizing.json").read_text())["replicas"]
    plan_verify = [*qvl, "plan", "verify", *sizing, "--rate", f"{args.peak_rate:g}", "--replicas", str(replicas),
                   "--duration", "60s", "--out", str(out / "verify")]  # fmt: skip
    print("\n$ qvl plan " + " ".join(shlex.quote(a) for a in plan_verify[4:]), flush=True)
    t0 = time.monotonic()
    verified = subprocess.run(plan_verify, env=env, cwd=ROOT).returncode == 0
    timings["verify"] = time.monotonic() - t0
    report = [*qvl, "plan", "report", str(out)]
    print("\n$ qvl plan report " + str(out), flush=True)
    if subprocess.run(report, env=env, cwd=ROOT).returncode:
        return 1
    (out / "demo.json").write_text(
        json.dumps(
            {"seconds": timings, "total_s": time.monotonic() - started, "validated": validated, "verified": verified},
            indent=2,
        )
        + "\n"
    )
    print(
        f"\ncapacity-demo: done in {(time.monotonic() - started) / 60:.1f} min (calibration "
        f"{timings.get('calibrate', 0) / 60:.1f} min); validation {'passed' if validated else 'FAILED its bounds'}, "
        f"verification {'passed' if verified else 'FAILED'}; report: {out / 'report' / 'report.html'}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
