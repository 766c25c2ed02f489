"""A planning folder read back for `qvl plan report`: the profile, the JSON each step wrote, the level runs
they name, and the predicted curve re-simulated from the profile (the profile is recorded, so the curve is
derived, not stored).

    FOLDER/profile.yaml                 qvl plan calibrate (required)
    FOLDER/calibration.json             beside it: the level runs, the fit's diagnostics
    FOLDER/validation/validation.json   qvl plan validate
    FOLDER/sizing/sizing.json           qvl plan size
    FOLDER/verify/verify.json           qvl plan verify

The JSON files hold the paths the commands were given (relative to where they ran, or absolute). A folder
that was moved, or committed elsewhere, still finds its runs: a recorded path is looked for under FOLDER
(relative to where the recorded profile sat), then as recorded, then by its last two parts under FOLDER.
A measured level is summarised again from its records under the plan's SLO where the records are there
(calibration levels ran without an SLO, so their goodput exists only this way), else read from summary.json.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.planner.calibrate import CALIBRATION_JSON
from loadtests.planner.sizing_run import SIZING_JSON
from loadtests.planner.validate import METRICS, VALIDATION_JSON, highest_compliant_rate, metrics_of, predict
from loadtests.planner.verify import VERIFY_JSON
from loadtests.planner.vtime import DEFAULT_POLICY
from loadtests.records import DEFAULT_MAX_SEND_LAG_MS
from loadtests.runfolder import SUMMARY, WORKLOAD, RunFolder, RunFolderError
from loadtests.slo import Objective, SloError, parse_slo
from loadtests.summary import summarise_run
from loadtests.workload import WorkloadError, load_workload, with_load
from serving.sim.profile import CapacityProfile, ProfileError, load_profile

Say = Callable[[str], None]
PROFILE = "profile.yaml"
PARTS: dict[str, Path] = {
    "calibration": Path(CALIBRATION_JSON),
    "validation": Path("validation") / VALIDATION_JSON,
    "sizing": Path("sizing") / SIZING_JSON,
    "verify": Path("verify") / VERIFY_JSON,
}
COMMANDS = {
    "calibration": "qvl plan calibrate",
    "validation": "qvl plan validate",
    "sizing": "qvl plan size",
    "verify": "qvl plan verify",
}
GRID_POINTS = 14
SCHEDULES = 4
"""Schedules (workload seeds) each predicted point averages: one 20 s schedule alone makes a jagged curve."""
ANSWER_CACHE_RESULTS = ("hit", "miss", "coalesced")


class ReportError(Exception):
    """The folder cannot be reported on (no profile, a damaged file); the message names the file."""


@dataclass(frozen=True)
class Plan:
    folder: Path
    profile: CapacityProfile
    parts: dict[str, dict[str, Any]]
    """calibration, validation, sizing, verify: the JSON of each part present."""
    slo_text: str | None
    objectives: tuple[Objective, ...]


@dataclass(frozen=True)
class Measured:
    """One measured load level: a calibration level or a validation level, as read back from its run."""

    name: str
    kind: str
    """calibration, or validate's kinds: between, above, bursty."""
    rate: float
    folder: Path | None
    source: str
    """records (summarised again), summary.json, or validation.json (the run folder is gone)."""
    requests: int | None
    valid: bool | None
    slo_held: bool | None
    metrics: dict[str, float | None]
    predicted: dict[str, float | None] | None
    """What validate predicted for this very run (validation levels only)."""
    replicas: int | None
    policy: str | None
    answer_cache: bool


@dataclass(frozen=True)
class Curve:
    """Virtual-time predictions at a grid of offered rates, with the workload and fleet of one measured level."""

    source: str
    """The level whose workload.yaml the curve was simulated with."""
    replicas: int
    policy: str
    answer_cache: bool
    duration_s: float
    points: list[dict[str, Any]]
    """{rate, held_share (of the schedules), ttft_p50, ..., goodput}: means over SCHEDULES schedules per rate."""
    highest_rate: float | None
    highest_source: str
    simulated_requests: int


def load_plan(folder: Path) -> Plan:
    """The folder's profile and parts; raises ReportError without a readable profile or with a damaged part."""
    path = folder / PROFILE
    if not path.is_file():
        raise ReportError(f"{folder}: no {PROFILE}: not a planning folder (`qvl plan calibrate --out` writes it)")
    try:
        profile = load_profile(path)
    except ProfileError as exc:
        raise ReportError(str(exc)) from None
    parts = {name: _json(folder / rel) for name, rel in PARTS.items() if (folder / rel).is_file()}
    slo_text = _slo_text(folder, parts)
    try:
        objectives = parse_slo(slo_text) if slo_text else ()
    except SloError as exc:
        raise ReportError(f"{folder}: the recorded SLO {slo_text!r} does not parse: {exc}") from None
    return Plan(folder, profile, parts, slo_text, objectives)


def locate(recorded: str, recorded_profile: str | None, folder: Path) -> Path | None:
    """Where a run folder a part recorded is now (see the module docstring); None when it is nowhere."""
    path = Path(recorded)
    candidates = []
    if recorded_profile is not None:
        with contextlib.suppress(ValueError):  # recorded elsewhere than beside the profile
            candidates.append(folder / path.relative_to(Path(recorded_profile).parent))
    candidates += [path, folder / Path(*path.parts[-2:])]
    return next((c for c in candidates if c.is_dir()), None)


def measured_levels(plan: Plan, notes: list[str]) -> list[Measured]:
    """The calibration's levels and the validation's, in that order; a run not found is noted, not fatal."""
    levels: list[Measured] = []
    calibration = plan.parts.get("calibration", {})
    rates = calibration.get("rates", [])
    for number, recorded in enumerate(calibration.get("runs", [])):
        path = locate(recorded, calibration.get("profile"), plan.folder)
        if path is None:
            notes.append(f"calibration level run {recorded} not found: left out")
            continue
        fallback = rates[number] if number < len(rates) else None
        levels.append(_read_level(path, path.name, "calibration", fallback, plan.objectives, None))
    validation = plan.parts.get("validation", {})
    for level in validation.get("levels", []):
        path = locate(level["folder"], validation.get("profile"), plan.folder)
        if path is not None:
            levels.append(
                _read_level(path, level["name"], level["kind"], level["rate"], plan.objectives, level["predicted"])
            )
            continue
        notes.append(f"validation level run {level['folder']} not found: its numbers come from validation.json")
        measured = {m: level["measured"].get(m) for m in METRICS}
        levels.append(
            Measured(
                level["name"], level["kind"], float(level["rate"]), None, "validation.json", None,
                level.get("valid"), None, measured, level["predicted"], None, None, False,
            )
        )  # fmt: skip
    return levels


def run_metrics(path: Path, objectives: Sequence[Objective]) -> tuple[dict[str, float | None], bool | None, str]:
    """A run folder's compared metrics, whether it held `objectives` (None when that cannot be told) and the
    source (records, or summary.json when the records were pruned)."""
    level = _read_level(path, path.name, "run", None, objectives, None)
    return level.metrics, level.slo_held, level.source


def predicted_curve(plan: Plan, levels: Sequence[Measured], say: Say) -> Curve | None:
    """Virtual-time runs at a grid of rates with the workload, replicas and policy of a measured level (a
    steady validation level first: validate predicted with that very workload); None without a level."""
    steady = [lv for lv in levels if lv.kind in ("between", "above") and lv.folder is not None]
    calibrated = [lv for lv in levels if lv.kind == "calibration" and lv.folder is not None]
    base = next(iter(steady or calibrated), None)
    if base is None or base.folder is None:
        return None
    try:
        workload = load_workload(base.folder / WORKLOAD)
    except WorkloadError as exc:
        raise ReportError(str(exc)) from None
    duration = float(getattr(workload.arrivals, "duration_s", None) or 60.0)
    replicas = base.replicas or plan.profile.fitted_on.replicas
    policy = base.policy or DEFAULT_POLICY
    highest, source = _recorded_highest(plan)
    if highest is None and plan.objectives:
        low = min(lv.rate for lv in levels) / 4
        highest = highest_compliant_rate(
            workload, plan.profile, replicas, policy, plan.objectives, base.answer_cache, low,
            max(lv.rate for lv in levels), duration,
        )  # fmt: skip
        source = "bisection in virtual time on one schedule (no validation.json)"
    rates = grid([lv.rate for lv in levels if lv.kind != "bursty"], highest)
    say(
        f"report: simulating {len(rates)} rates x {SCHEDULES} schedules with {replicas} replicas ({policy}), "
        f"{duration:g} s each"
    )
    points, simulated = [], 0
    for rate in rates:
        runs = []
        for k in range(SCHEDULES):
            scheduled = with_load(workload, rate, duration).model_copy(update={"seed": workload.seed + k})
            summary, requests, _ = predict(
                scheduled, plan.profile, replicas, policy, plan.objectives, base.answer_cache
            )
            simulated += requests
            runs.append((metrics_of(summary), summary.slo_held))
        points.append(_mean_point(rate, runs))
    return Curve(base.name, replicas, policy, base.answer_cache, duration, points, highest, source, simulated)


def grid(rates: Sequence[float], highest: float | None, count: int = GRID_POINTS) -> list[float]:
    """The measured rates, and `count` evenly spaced rates (those not within 3 % of a measured one) from half
    the lowest measured to past the highest and past the highest compliant rate; 3 significant digits, sorted."""
    if not rates:
        return []
    low = min(rates) / 2
    high = max(1.25 * max(rates), 1.1 * highest if highest else 0.0)
    step = (high - low) / (count - 1)
    measured = {float(f"{r:.3g}") for r in rates}
    spaced = {float(f"{low + i * step:.3g}") for i in range(count)}
    # A grid point next to a measured rate adds nothing but a kink of schedule noise.
    spaced = {g for g in spaced if all(abs(g - r) > 0.03 * r for r in measured)}
    return sorted(spaced | measured)


def _mean_point(rate: float, runs: Sequence[tuple[dict[str, float | None], bool | None]]) -> dict[str, Any]:
    """Each metric's mean over the schedules that have it, and the share of schedules that held the SLO."""
    point: dict[str, Any] = {"rate": rate}
    for name in METRICS:
        values = [v for metrics, _ in runs if (v := metrics.get(name)) is not None]
        point[name] = sum(values) / len(values) if values else None
    verdicts = [held for _, held in runs if held is not None]
    point["held_share"] = sum(verdicts) / len(verdicts) if verdicts else None
    return point


def _read_level(
    path: Path,
    name: str,
    kind: str,
    rate: float | None,
    objectives: Sequence[Objective],
    predicted: dict[str, float | None] | None,
) -> Measured:
    folder = RunFolder(path)
    held: bool | None
    requests: int | None
    valid: bool | None
    try:
        meta = folder.meta()
        recorded_rate = meta.get("rate", rate)
        if not isinstance(recorded_rate, int | float):
            raise ReportError(f"{path}: no offered rate in run.json")
        replicas, policy = meta.get("replicas"), meta.get("policy")
        if folder.record_files():
            bound = meta.get("max_send_lag_ms") or DEFAULT_MAX_SEND_LAG_MS
            s = summarise_run(folder.records(), folder.process_summaries(), objectives, float(bound))
            metrics, held, cache = metrics_of(s), s.slo_held, s.cache
            requests, valid, source = s.requests, s.valid, "records"
        else:
            data = folder.summary()
            metrics = {m: _percentile(data, m) for m in METRICS}
            held = data.get("slo_held")
            if not _same_slo(meta.get("slo"), objectives):
                # summary.json's verdict and goodput are under the run's own SLO, not the plan's.
                held, metrics["goodput"] = None, None
            cache, requests, valid, source = data.get("cache", {}), data.get("requests"), data.get("valid"), SUMMARY
    except RunFolderError as exc:
        raise ReportError(str(exc)) from None
    answer_cache = any(k in cache for k in ANSWER_CACHE_RESULTS)
    return Measured(
        name, kind, float(recorded_rate), path, source, requests, valid, held, metrics, predicted,
        replicas if isinstance(replicas, int) else None, policy if isinstance(policy, str) else None, answer_cache,
    )  # fmt: skip


def _same_slo(text: object, objectives: Sequence[Objective]) -> bool:
    """Whether a run's SLO string means the plan's objectives."""
    if not isinstance(text, str) or not text or not objectives:
        return False
    try:
        theirs = parse_slo(text)
    except SloError:
        return False
    return [(o.metric, o.percentile, o.bound) for o in theirs] == [
        (o.metric, o.percentile, o.bound) for o in objectives
    ]


def _percentile(summary: dict[str, Any], metric: str) -> float | None:
    """A compared metric (validate's names) from summary.json."""
    if metric == "goodput":
        value = summary.get("goodput_rps")
    else:
        name, _, q = metric.partition("_")
        value = (summary.get(f"{name}_ms") or {}).get(q)
    return float(value) if isinstance(value, int | float) else None


def _recorded_highest(plan: Plan) -> tuple[float | None, str]:
    recorded = plan.parts.get("validation", {}).get("max_rate", {}).get("predicted")
    if isinstance(recorded, int | float):
        return float(recorded), "recorded by qvl plan validate: bisection in virtual time on one schedule"
    return None, "none"


def _slo_text(folder: Path, parts: dict[str, dict[str, Any]]) -> str | None:
    """The plan's SLO: sizing.json's, else the one a validation or verify run was measured against."""
    slo = parts.get("sizing", {}).get("slo")
    if isinstance(slo, str) and slo:
        return slo
    recorded = [
        (lv["folder"], parts["validation"].get("profile")) for lv in parts.get("validation", {}).get("levels", [])
    ]
    recorded += [(run["folder"], None) for run in parts.get("verify", {}).get("runs", [])]
    for path, profile in recorded:
        where = locate(path, profile, folder)
        if where is not None and (where / "run.json").is_file():
            slo = _json(where / "run.json").get("slo")
            if isinstance(slo, str) and slo:
                return slo
    return None


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return data
