"""`qvl plan calibrate | validate | size | verify | report`: the capacity planner (loadtests/planner/).

    qvl plan calibrate --target URL --workload loadtests/workloads/calibration.yaml --out plan/profile.yaml
    qvl plan validate --target URL --profile plan/profile.yaml --workload W --slo S --out plan/validation
    qvl plan size --profile plan/profile.yaml --workload W --slo S --peak-rate 40 [--trace day.csv] --out plan/sizing
    qvl plan verify --profile plan/profile.yaml --workload W --slo S --rate 40 --replicas N --out plan/verify
    qvl plan report plan/ [--out plan/report]

Like `qvl loadtest`, a client of the cluster: the flags are the whole configuration. Exit status: 0 done
(and, for validate, within bounds; for verify, the SLO held at N and failed at N-1), 1 failed,
2 bad input, 5 the profile's measured error is over a bound (validate; size refuses to recommend).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qvl.cli.loadtest import duration, rates


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The `plan` command and its actions."""
    plan = sub.add_parser(
        "plan",
        help="Capacity planning: calibrate the simulator on replicas, validate it, size a fleet for an SLO.",
        description="Capacity planning: `qvl plan calibrate`, `validate`, `size`, `verify`, `report`.",
    )
    actions = plan.add_subparsers(dest="plan_action", required=True, metavar="ACTION")

    cal = actions.add_parser(
        "calibrate",
        help="Fit a capacity profile to real replicas with a short sweep (6 to 8 levels).",
        description="Probe the replicas behind --target, run 6 to 8 Poisson levels of --workload against them, "
        "fit the simulated engine's latency model with bootstrap intervals and write the profile to --out.",
    )
    cal.add_argument("--target", required=True, metavar="URL", help="the router's base URL")
    cal.add_argument(
        "--workload", type=Path, required=True, help="calibration workload (loadtests/workloads/calibration.yaml)"
    )
    cal.add_argument("--out", type=Path, required=True, help="profile YAML to write (calibration.json goes beside it)")
    cal.add_argument("--runs", type=Path, help="folder for the level runs (default: <out>-runs beside the profile)")
    cal.add_argument("--levels", type=int, default=7, help="load levels, 6 to 8 (default: %(default)s)")
    cal.add_argument("--level-duration", type=duration, default=40.0, help="length of each level (default: 40s)")
    cal.add_argument(
        "--probe-duration", type=duration, default=20.0, help="length of the capacity probe (default: 20s)"
    )
    cal.add_argument("--max-rate", type=float, help="capacity to place the levels under, instead of probing (req/s)")
    cal.add_argument("--rates", type=rates, metavar="R1,R2,...", help="explicit level rates (skips the probe)")
    cal.add_argument(
        "--max-running", type=int, help="the replicas' running cap (vLLM max_num_seqs) when the sweep does not reach it"
    )
    cal.add_argument(
        "--max-batched-tokens", type=int, default=8192, help="vLLM max_num_batched_tokens (default: %(default)s)"
    )
    cal.add_argument(
        "--mm-cache-items", type=int, help="images the mm cache holds (default: fitted to the measured hits)"
    )
    cal.add_argument("--hardware", help="what the replicas run on, for the profile (default: this host's CPU)")
    cal.add_argument(
        "--bootstrap", type=int, default=200, help="bootstrap rounds for the intervals (default: %(default)s)"
    )
    cal.set_defaults(standalone=_standalone("calibrate_command"))

    val = actions.add_parser(
        "validate",
        help="Measure load levels the fit did not see and compare with the profile's predictions.",
        description="Predict levels between and above the calibration's, and a bursty one (Gamma, cv 3), by "
        "simulation; measure them on the replicas; print the error per metric and record it in the profile. "
        "Exit 5 when an error is over its bound.",
    )
    where = val.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", metavar="URL", help="the router's base URL: measure the levels there")
    where.add_argument(
        "--reuse",
        type=Path,
        metavar="DIR",
        help="a previous validation's --out folder: compare with its measured levels (e.g. another profile)",
    )
    _profile_flags(val)
    val.add_argument("--level-duration", type=duration, default=40.0, help="length of each level (default: 40s)")
    val.add_argument(
        "--rates", type=rates, metavar="R1,R2,...", help="the levels to check (default: from the calibration)"
    )
    val.add_argument(
        "--bounds",
        help='error bounds, e.g. "ttft_p50=10%%,itl_p50=10%%,e2e_p50=10%%,ttft_p99=20%%,bursty_ttft_p99=25%%"',
    )
    val.add_argument(
        "--max-send-lag-ms",
        type=float,
        default=10.0,
        help="P99 send lag above which a level's run is INVALID and made once more (default: %(default)s)",
    )
    val.add_argument("--out", type=Path, required=True, help="folder for the runs and validation.json")
    val.set_defaults(standalone=_standalone("validate_command"))

    size = actions.add_parser(
        "size",
        help="The smallest replica count that holds the SLO at a peak rate (or over a day's trace).",
        description="Simulate the router and N replicas in virtual time and search for the smallest N whose "
        "run holds --slo; report N, N with one replica of headroom, GPUs, and what-if rows. Refuses (exit 5) "
        "when the profile's validation error is over a bound or missing.",
    )
    _profile_flags(size)
    group = size.add_mutually_exclusive_group(required=True)
    group.add_argument("--peak-rate", type=float, help="requests per second at the peak")
    group.add_argument("--trace", type=Path, help="CSV of t_s,rate over a day (replicas per window)")
    size.add_argument(
        "--duration", type=duration, default=600.0, help="simulated length of each scenario (default: 10m)"
    )
    size.add_argument("--policy", help="routing policy (default: the router's default)")
    size.add_argument("--no-what-if", action="store_true", help="skip the what-if rows")
    size.add_argument(
        "--unvalidated", action="store_true", help="recommend even without a passed validation (marked so)"
    )
    size.add_argument("--bounds", help="error bounds the profile's validation must meet (as for validate)")
    size.add_argument("--out", type=Path, required=True, help="folder for sizing.json and sizing.md")
    size.set_defaults(standalone=_standalone("size_command"))

    verify = actions.add_parser(
        "verify",
        help="Run N and N-1 replicas at the target load through the real router; compare with virtual time.",
        description="Start N and then N-1 simulated replicas with the profile behind a real router (or use "
        "--target for your own), run the workload at --rate, and show the SLO holds at N and fails at N-1; "
        "the same scenario in virtual time must agree within the bounds.",
    )
    _profile_flags(verify)
    verify.add_argument("--rate", type=float, required=True, help="requests per second")
    verify.add_argument("--replicas", type=int, required=True, help="N, the recommended replica count")
    verify.add_argument("--duration", type=duration, default=60.0, help="length of each run (default: 60s)")
    verify.add_argument(
        "--target",
        metavar="URL",
        help="measure your own cluster of N replicas at this router instead of starting simulated ones",
    )
    verify.add_argument("--bounds", help="error bounds for real time against virtual time (as for validate)")
    verify.add_argument("--out", type=Path, required=True, help="folder for the runs and verify.json")
    verify.set_defaults(standalone=_standalone("verify_command"))

    report = actions.add_parser(
        "report",
        help="Markdown, self-contained HTML and JSON report of a planning folder.",
        description="Write report.md, report.html and report.json from a folder holding the profile, "
        "calibration.json, validation/validation.json, sizing/sizing.json and verify/verify.json.",
    )
    report.add_argument("folder", type=Path, help="the planning folder")
    report.add_argument("--out", type=Path, help="where to write (default: FOLDER/report)")
    report.set_defaults(standalone=_standalone("report_command"))


def _profile_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", type=Path, required=True, help="capacity profile from `qvl plan calibrate`")
    p.add_argument("--workload", type=Path, required=True, help="workload YAML file of the traffic to plan for")
    p.add_argument("--slo", required=True, help='objectives, e.g. "ttft_p99<=1.5s,itl_p99<=60ms,errors<=0.1%%"')


def _standalone(name: str):  # type: ignore[no-untyped-def]
    def run(args: argparse.Namespace) -> int:
        from loadtests.planner import cli

        command = getattr(cli, name)
        return int(command(args, _say))

    return run


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
