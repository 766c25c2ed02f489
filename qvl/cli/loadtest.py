"""`qvl loadtest [run] | sweep | report`: load tests from workload files (loadtests/), with their exit status.

    qvl loadtest --workload loadtests/workloads/storefront.yaml --target http://HOST:PORT --rate 50 \\
        --duration 2m --slo "ttft_p99<=1.5s,errors<=0.1%" --out runs/X
    qvl loadtest sweep --rates 10,20,40,80 --workload ... --target ... --duration 1m --slo ... --out runs/S
    qvl loadtest report runs/X [runs/Y ...] [--out DIR]

A client of the cluster, not part of it: no settings tree (the flags are the whole configuration), and
locust and matplotlib are imported only here, on use.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ACTIONS = ("run", "sweep", "report")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT_S = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `2m`, `1.5h`, `500ms`."""
    found = _DURATION.match(text.strip())
    if found is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 2m, 1h)")
    return float(found.group(1)) * _UNIT_S[found.group(2)]


def rates(text: str) -> list[float]:
    """Comma-separated positive rates."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of rates: {text!r} (e.g. 10,20,40)") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"rates must be positive numbers, got {text!r}")
    return values


def with_default_action(argv: list[str]) -> list[str]:
    """`qvl loadtest --workload ...` means `qvl loadtest run --workload ...`."""
    if len(argv) >= 1 and argv[0] == "loadtest":
        rest = argv[1:]
        if not rest or rest[0] not in (*ACTIONS, "-h", "--help"):
            return ["loadtest", "run", *rest]
    return argv


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The `loadtest` command and its actions."""
    loadtest = sub.add_parser(
        "loadtest",
        help="Load-test a router with a workload file (locust), sweep rates, report runs.",
        description="Load-test a router with a workload file: `qvl loadtest [run] ...`, `sweep`, `report`.",
    )
    actions = loadtest.add_subparsers(dest="loadtest_action", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="One run (the default action). Exit 0 valid, 3 INVALID, 4 SLO missed, 1 failed, 2 bad arguments.",
        description="One headless locust run of a workload against --target, leaving a run folder in --out.",
    )
    _run_flags(run)
    run.add_argument(
        "--slo", help='objectives, e.g. "ttft_p99<=1.5s,itl_p99<=60ms,e2e_p99<=10s,errors<=0.1%%" (loadtests/slo.py)'
    )
    run.add_argument("--rate", type=float, help="requests per second (the workload's rate; see README for stages)")
    run.add_argument("--label", help="the run's name in reports (default: the --out folder's name)")
    run.add_argument("--out", type=Path, required=True, help="run folder to create (must be new or empty)")
    run.set_defaults(standalone=_run)

    sweep = actions.add_parser(
        "sweep",
        help="Run several rates in turn and report the knee (the highest rate whose SLO held).",
        description="Run the workload at each of --rates in turn (a run folder each under --out) and report "
        "the knee: the highest rate at which the run was valid and the SLO held. Exit 0 when a knee was found.",
    )
    _run_flags(sweep)
    sweep.add_argument("--rates", type=rates, required=True, metavar="R1,R2,...", help="rates to run, in order")
    sweep.add_argument("--slo", required=True, help="objectives every level is judged by (as for run)")
    sweep.add_argument("--out", type=Path, required=True, help="folder for the levels' run folders and sweep.json")
    sweep.add_argument("--stop-at-miss", action="store_true", help="skip the higher rates once a level misses the SLO")
    sweep.set_defaults(standalone=_sweep)

    report = actions.add_parser(
        "report",
        help="Markdown and self-contained HTML report with plots of one or more run folders.",
        description="Write report.md, report.html and plots/ for one or more run folders (side by side).",
    )
    report.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run folders (or a sweep's folder)")
    report.add_argument("--out", type=Path, help="where to write (default: RUN/report for one run, else ./report)")
    report.set_defaults(standalone=_report)


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", type=Path, required=True, help="workload YAML file (loadtests/workloads/)")
    p.add_argument("--target", required=True, metavar="URL", help="the router's base URL, e.g. http://10.0.0.5:8000")
    p.add_argument(
        "--duration",
        type=duration,
        help="length of the schedule (90s, 2m); for a closed loop, a time limit; default: the workload's",
    )
    p.add_argument(
        "--users",
        type=int,
        help="requests that may be in flight at once (open loop), or users (closed loop); default: 4 s of the "
        "peak rate, 16 to 1024",
    )
    p.add_argument(
        "--processes", type=int, default=1, help="locust worker processes on this machine (default: %(default)s)"
    )
    p.add_argument(
        "--max-send-lag-ms",
        type=float,
        default=10.0,
        help="P99 send lag above which the run is INVALID: the generator fell behind (default: %(default)s)",
    )
    p.add_argument(
        "--drain", type=duration, default=120.0, help="how long answers may arrive after the last send (default: 2m)"
    )
    p.add_argument(
        "--scrape-interval",
        type=duration,
        default=2.0,
        help="seconds between reads of the router's and replicas' /metrics (default: 2s)",
    )
    p.add_argument("--model", help="model to request (default: the first of the router's GET /v1/models)")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    from loadtests.cli import run_command

    return run_command(args, _say)


def _sweep(args: argparse.Namespace) -> int:
    from loadtests.cli import sweep_command

    return sweep_command(args, _say)


def _report(args: argparse.Namespace) -> int:
    from loadtests.cli import report_command

    return report_command(args, _say)
