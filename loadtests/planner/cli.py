"""What `qvl plan ...` does with its parsed flags (qvl/cli/plan.py parses them): build the options, run,
print the outcome, map it to the exit status (0 done, 1 failed, 2 bad input, 5 error over a bound)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

from loadtests.planner.calibrate import CALIBRATION_JSON, CalibrateOptions, CalibrationError, calibrate
from loadtests.planner.size import SizingError
from loadtests.planner.sizing_run import SIZING_JSON, SIZING_MD, RefusedError, SizeOptions, run_size
from loadtests.planner.validate import METRICS, BoundsError, ValidateOptions, Validation, parse_bounds, validate
from loadtests.planner.verify import VerifyOptions, verify
from loadtests.planner.vtime import DEFAULT_POLICY
from loadtests.runner import LoadtestError
from loadtests.slo import SloError, parse_slo
from loadtests.workload import Workload, WorkloadError, load_workload
from qvl.procs import StartError
from serving.sim.profile import CapacityProfile, ProfileError, load_profile

Say = Callable[[str], None]
FAILED = 1
USAGE = 2
OVER_BOUND = 5


def calibrate_command(args: argparse.Namespace, say: Say) -> int:
    if not 2 <= args.levels <= 12:
        say(f"qvl plan calibrate: --levels must be 2 to 12 (6 to 8 recommended), got {args.levels}")
        return USAGE
    try:
        workload = load_workload(args.workload)
        options = CalibrateOptions(
            workload=workload,
            workload_file=str(args.workload),
            target=args.target,
            out=args.out,
            runs=args.runs,
            levels=args.levels,
            level_s=args.level_duration,
            probe_s=args.probe_duration,
            max_rate=args.max_rate,
            rates=tuple(args.rates or ()),
            max_running=args.max_running,
            max_batched_tokens=args.max_batched_tokens,
            mm_cache_items=args.mm_cache_items,
            hardware=args.hardware,
            bootstrap=args.bootstrap,
            api_key=_first_key(workload),
        )
        profile, fitted = calibrate(options, say)
    except WorkloadError as exc:
        say(f"qvl plan calibrate: {exc}")
        return USAGE
    except (CalibrationError, LoadtestError, ProfileError) as exc:
        say(f"qvl plan calibrate: {exc}")
        return FAILED
    say(profile_table(profile))
    say(
        f"qvl plan calibrate: fitted on {profile.fitted_on.requests} requests in {fitted.iterations} rounds; "
        f"median error of the fitted TTFT {fitted.ttft_error:.1%}, of the last-token time {fitted.e2e_error:.1%}"
    )
    say(f"qvl plan calibrate: wrote {args.out}; next: qvl plan validate --profile {args.out} ...")
    return 0


def profile_table(profile: CapacityProfile) -> str:
    """The fitted terms with their intervals, one per line."""
    costs = profile.costs
    lines = ["term                          estimate   90% interval"]
    for name, estimate in costs:
        lines.append(f"{name:<28} {estimate.value:>10.4g}   [{estimate.low:.4g}, {estimate.high:.4g}]")
    engine = profile.engine
    lines.append(
        f"engine limits: max_running {engine.max_running}, max_batched_tokens {engine.max_batched_tokens}, "
        f"mm_cache_items {engine.mm_cache_items}"
    )
    return "\n".join(lines)


def _first_key(workload: Workload) -> str | None:
    tenants = workload.tenants
    tenant = tenants[0]
    if tenant.key is not None:
        return str(tenant.key)
    return os.environ.get(tenant.key_env or "")


def validate_command(args: argparse.Namespace, say: Say) -> int:
    try:
        profile = load_profile(args.profile)
        workload = load_workload(args.workload)
        objectives = parse_slo(args.slo)
        bounds = parse_bounds(args.bounds)
        runs = _calibration_runs(args.profile)
        options = ValidateOptions(
            profile_path=args.profile,
            profile=profile,
            workload=workload,
            workload_file=str(args.workload),
            target=args.target or "",
            out=args.out,
            objectives=objectives,
            slo_text=args.slo,
            bounds=bounds,
            level_s=args.level_duration,
            rates=tuple(args.rates or ()),
            calibration_runs=runs,
            api_key=_first_key(workload),
            reuse=args.reuse,
            max_send_lag_ms=args.max_send_lag_ms,
        )
    except (WorkloadError, SloError, BoundsError, ProfileError) as exc:
        say(f"qvl plan validate: {exc}")
        return USAGE
    try:
        validation = validate(options, say)
    except (LoadtestError, ValueError) as exc:
        say(f"qvl plan validate: {exc}")
        return FAILED
    say(error_table(validation))
    if validation.passed:
        say(f"qvl plan validate: every error within its bound; recorded in {args.profile}")
        return 0
    for failure in validation.failures:
        say(f"qvl plan validate: {failure}")
    say(f"qvl plan validate: the profile is not good enough to recommend with (recorded in {args.profile})")
    return OVER_BOUND


def error_table(validation: Validation) -> str:
    """Per level and metric: predicted / measured and the error; then the summary with the bounds."""
    lines = [f"{'level':<18} {'metric':<10} {'predicted':>10} {'measured':>10} {'error':>7}"]
    for level in validation.levels:
        for name in METRICS:
            p, m, e = level.predicted.get(name), level.measured.get(name), level.error.get(name)
            lines.append(f"{level.name:<18} {name:<10} {_num(p):>10} {_num(m):>10} {_pct(e):>7}")
    lines.append("summary (median over steady levels; bursty on its own):")
    for name, value in validation.errors.items():
        bound = validation.bounds.get(name)
        mark = "" if bound is None else f"  bound {bound:.0%} {'ok' if value <= bound else 'OVER'}"
        lines.append(f"  {name:<18} {value:>7.1%}{mark}")
    rate = validation.max_rate
    if rate:
        lines.append(
            f"  highest SLO-compliant rate: predicted {_num(rate.get('predicted'))} req/s; measured held at "
            f"{_num(rate.get('measured_held'))}, missed at {_num(rate.get('measured_missed'))}; "
            f"error {_pct(rate.get('error'))}"
        )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _calibration_runs(profile_path: Path) -> tuple[Path, ...]:
    """The level folders calibration.json beside the profile names (none if it is not there)."""
    path = profile_path.parent / CALIBRATION_JSON
    if not path.exists():
        return ()
    try:
        data = json.loads(path.read_text())
        return tuple(Path(p) for p in data.get("runs", []))
    except (OSError, ValueError, AttributeError):
        return ()


def size_command(args: argparse.Namespace, say: Say) -> int:
    try:
        profile = load_profile(args.profile)
        workload = load_workload(args.workload)
        options = SizeOptions(
            profile_path=args.profile,
            profile=profile,
            workload=workload,
            objectives=parse_slo(args.slo),
            slo_text=args.slo,
            out=args.out,
            bounds=parse_bounds(args.bounds),
            peak_rate=args.peak_rate,
            trace=args.trace,
            duration_s=args.duration,
            policy=args.policy or DEFAULT_POLICY,
            what_if=not args.no_what_if,
            unvalidated=args.unvalidated,
        )
    except (WorkloadError, SloError, BoundsError, ProfileError) as exc:
        say(f"qvl plan size: {exc}")
        return USAGE
    try:
        result = run_size(options, say)
    except RefusedError as exc:
        say(f"qvl plan size: refusing to recommend: {exc}")
        return OVER_BOUND
    except (SizingError, ValueError) as exc:
        say(f"qvl plan size: {exc}")
        return FAILED
    say((args.out / SIZING_MD).read_text())
    note = "" if result["validated"] else " (UNVALIDATED profile)"
    say(
        f"qvl plan size: N = {result['replicas']} replicas, {result['headroom_replicas']} with one lost; "
        f"{result['gpus']} GPUs{note}; wrote {args.out / SIZING_JSON}"
    )
    return 0


def verify_command(args: argparse.Namespace, say: Say) -> int:
    try:
        profile = load_profile(args.profile)
        workload = load_workload(args.workload)
        options = VerifyOptions(
            profile_path=args.profile,
            profile=profile,
            workload=workload,
            workload_file=str(args.workload),
            objectives=parse_slo(args.slo),
            slo_text=args.slo,
            rate=args.rate,
            replicas=args.replicas,
            out=args.out,
            bounds=parse_bounds(args.bounds),
            duration_s=args.duration,
            target=args.target,
            api_key=_first_key(workload),
        )
    except (WorkloadError, SloError, BoundsError, ProfileError) as exc:
        say(f"qvl plan verify: {exc}")
        return USAGE
    try:
        result = verify(options, say)
    except (LoadtestError, StartError, ValueError) as exc:
        say(f"qvl plan verify: {exc}")
        return FAILED
    for run in result.runs:
        say(
            f"  {run.replicas} replicas: SLO {'held' if run.slo_held else 'missed'} (virtual time predicted "
            f"{'held' if run.predicted_slo_held else 'missed'}); " + _errors_line(run.error)
        )
    if result.passed:
        say(f"qvl plan verify: verified: the SLO holds at {args.replicas} and fails at {args.replicas - 1}")
        return 0
    for failure in result.failures:
        say(f"qvl plan verify: {failure}")
    return OVER_BOUND


def _errors_line(errors: dict[str, float | None]) -> str:
    return "virtual vs real: " + ", ".join(
        f"{k} {_pct(v)}" for k, v in errors.items() if k in ("ttft_p50", "ttft_p99", "itl_p50", "e2e_p50")
    )


def report_command(args: argparse.Namespace, say: Say) -> int:
    # Imported here: the report pulls in matplotlib, which the other `qvl plan` actions never need.
    from loadtests.planner.planfolder import ReportError
    from loadtests.planner.report import write_plan_report

    out = args.out or args.folder / "report"
    try:
        report = write_plan_report(args.folder, out, say)
    except (ReportError, WorkloadError) as exc:
        say(f"qvl plan report: {exc}")
        return USAGE
    for name in report.missing:
        say(f"qvl plan report: no {name} in {args.folder}: its section is left out")
    say(f"qvl plan report: wrote {report.markdown}, {report.html}, {report.json} and {len(report.plots)} plots")
    return 0
