"""`qvl plan report FOLDER`: the capacity plan of a planning folder as Markdown, a self-contained HTML page
and JSON, with plots.

    out/report.md     tables, and links to the plots
    out/report.html   the same with the plots embedded as data URIs (no script, nothing fetched)
    out/report.json   the numbers behind every table and plot
    out/plots/*.png   one figure each (loadtests/planner/plots.py)

Everything comes from the recorded files (loadtests/planner/planfolder.py reads them back): the measured
points from the level runs, the errors from validation.json, the fleet from sizing.json and verify.json;
the predicted curves are simulated again in virtual time from the recorded profile. A part not there yet
(no sizing, no verify) is left out with a line saying so. The page is built as the load-test report's
blocks and rendered by its writers (loadtests/report.py), so the Markdown and the HTML cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.planner import plots
from loadtests.planner.planfolder import (
    COMMANDS,
    PARTS,
    PROFILE,
    Curve,
    Measured,
    Plan,
    Say,
    load_plan,
    measured_levels,
    predicted_curve,
)
from loadtests.planner.validate import METRICS
from loadtests.report import HTML, MARKDOWN, Heading, Table, Text, _html, _markdown, _num, _Page, _pct, _yes

REPORT_JSON = "report.json"
SCHEMA = "qvl-plan-report/1"
SHOWN = ("ttft_p50", "ttft_p99", "itl_p50", "e2e_p50", "e2e_p99", "goodput")
"""The metrics the per-level tables show (report.json has all of METRICS)."""


@dataclass(frozen=True)
class PlanReport:
    """What `write_plan_report` wrote, and the parts it found missing."""

    markdown: Path
    html: Path
    json: Path
    plots: list[Path]
    missing: list[str]


def write_plan_report(folder: Path, out: Path, say: Say) -> PlanReport:
    """Write the report of planning folder `folder` into `out`; raises ReportError (planfolder.py) for a
    folder without a readable profile or with a damaged part, before anything is written."""
    plan = load_plan(folder)
    notes: list[str] = []
    levels = measured_levels(plan, notes)
    curve = predicted_curve(plan, levels, say)
    missing = [name for name in PARTS if name not in plan.parts]
    page = _Page(out)
    title = f"Capacity plan: {folder.resolve().name}"
    page.blocks += [Heading(1, title), *_overview(plan, missing), *(Text(n, note=True) for n in notes)]
    say("report: drawing")
    _curves(page, plan, levels, curve)
    _validation(page, plan)
    _sizing(page, plan)
    _verify(page, plan)
    _calibration(page, plan)
    data = _data(plan, levels, curve, missing, notes, page)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / MARKDOWN, out / HTML, out / REPORT_JSON
    paths[0].write_text(_markdown(page.blocks, out))
    paths[1].write_text(_html(page.blocks, title))
    paths[2].write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    return PlanReport(*paths, page.plots, missing)


def _overview(plan: Plan, missing: Sequence[str]) -> list[Heading | Text | Table]:
    blocks: list[Heading | Text | Table] = [Text(f"Folder: {plan.folder}. SLO: {plan.slo_text or 'none recorded'}.")]
    rows = [["profile", PROFILE, "calibrated" + _validated_note(plan)]]
    for name, rel in PARTS.items():
        rows.append([name, rel.as_posix(), _outcome(plan, name) if name in plan.parts else "missing"])
    blocks.append(Table("Parts of the plan", ["part", "file", "outcome"], rows))
    sizing = plan.parts.get("sizing")
    if sizing:
        caveat = "" if sizing.get("validated") else " (UNVALIDATED profile: " + "; ".join(sizing["caveats"]) + ")"
        blocks.append(
            Text(
                f"Answer: N = {sizing['replicas']} replicas ({sizing['gpus']} GPUs) at {sizing['peak_rate']:g} "
                f"req/s; {sizing['headroom_replicas']} with one replica of failure headroom{caveat}."
            )
        )
    blocks += [
        Text(f"No {name} yet ({PARTS[name].as_posix()} not found): run {COMMANDS[name]} to add it.", note=True)
        for name in missing
    ]
    return blocks


def _validated_note(plan: Plan) -> str:
    recorded = plan.profile.validation
    if not recorded:
        return ", never validated"
    return ", validation recorded: " + ("passed" if recorded.get("passed") else "FAILED")


def _outcome(plan: Plan, name: str) -> str:
    part = plan.parts[name]
    if name == "calibration":
        return f"{len(part.get('runs', []))} levels, {part.get('requests', 'n/a')} requests fitted"
    if name == "validation":
        return "passed" if part.get("passed") else f"FAILED: {len(part.get('failures', []))} errors over bounds"
    if name == "sizing":
        return f"N = {part.get('replicas')}" + ("" if part.get("validated") else " (unvalidated profile)")
    return ("verified" if part.get("passed") else "NOT verified") + f" at N = {part.get('replicas')}"


def _curves(page: _Page, plan: Plan, levels: Sequence[Measured], curve: Curve | None) -> None:
    page.blocks.append(Heading(2, "Predicted against measured"))
    if curve is None:
        page.blocks.append(Text("No measured level run in the folder: no curve to compare.", note=True))
        return
    page.blocks.append(
        Text(
            f"Lines: virtual-time runs with the profile at each offered rate ({curve.duration_s:g} s, the mean of "
            f"schedules), with the workload of level {curve.source}, {curve.replicas} replicas, policy "
            f"{curve.policy}, answer cache {'on' if curve.answer_cache else 'off'}. Points: the measured runs. "
            f"Predicted highest SLO-compliant rate (the dotted line): {_num(curve.highest_rate, 2)} req/s "
            f"({curve.highest_source}; the averaged curves may cross a bound a little off it)."
        )
    )
    page.plot("Latency against offered rate", "headline", lambda p: plots.headline(curve, levels, plan.objectives, p))
    page.plot("Goodput against offered rate", "goodput", lambda p: plots.goodput(curve, levels, p))
    rows = [
        [lv.name, lv.kind, f"{lv.rate:g}", str(lv.requests or "n/a"), _opt(lv.valid), _opt(lv.slo_held)]
        + [_num(lv.metrics.get(m), 2 if m == "goodput" else 1) for m in SHOWN]
        + [lv.source]
        for lv in levels
    ]
    header = ["level", "kind", "rate", "requests", "valid", "SLO held", *SHOWN, "read from"]
    page.blocks.append(Table("Measured levels (ms; goodput req/s)", header, rows))


def _validation(page: _Page, plan: Plan) -> None:
    validation = plan.parts.get("validation")
    if validation is None:
        return
    page.blocks.append(Heading(2, "Validation: the prediction's error on held-out levels"))
    verdict = "every bounded error within its bound" if validation.get("passed") else "FAILED"
    page.blocks.append(Text(f"Validation {verdict}."))
    page.blocks += [Text(f"Over a bound: {f}", note=True) for f in validation.get("failures", [])]
    errors, bounds = validation.get("errors", {}), validation.get("bounds", {})
    rows = []
    for name in METRICS:
        if name in errors or f"bursty_{name}" in errors:
            bound, bursty_bound = bounds.get(name), bounds.get(f"bursty_{name}")
            steady, bursty = errors.get(name), errors.get(f"bursty_{name}")
            rows.append(
                [
                    name,
                    _pct(steady),
                    _pct(bound),
                    _within(steady, bound),
                    _pct(bursty),
                    _pct(bursty_bound),
                    _within(bursty, bursty_bound),
                ]
            )
    header = ["metric", "error (median, steady)", "bound", "within", "error (bursty)", "bound", "within"]
    page.blocks.append(Table("Error table", header, rows, "Relative error |predicted - measured| / measured."))
    page.plot("Errors against bounds", "errors", lambda p: plots.errors_vs_bounds(errors, bounds, p))
    rows = []
    for level in validation.get("levels", []):
        for m in SHOWN:
            p, v, e = level["predicted"].get(m), level["measured"].get(m), level["error"].get(m)
            rows.append([level["name"], m, _num(p, 2), _num(v, 2), _pct(e)])
    page.blocks.append(Table("Per level", ["level", "metric", "predicted", "measured", "error"], rows))
    rate = validation.get("max_rate") or {}
    if rate:
        row = [_num(rate.get(k), 2) for k in ("predicted", "measured_held", "measured_missed")]
        page.blocks.append(
            Table(
                "Highest SLO-compliant rate (req/s)",
                ["predicted", "highest measured that held", "lowest measured that missed", "error"],
                [[*row, _pct(rate.get("error"))]],
                "Error 0 when the prediction lies inside the measured bracket.",
            )
        )


def _sizing(page: _Page, plan: Plan) -> None:
    sizing = plan.parts.get("sizing")
    if sizing is None:
        return
    page.blocks.append(Heading(2, "Replicas against load"))
    page.blocks.append(
        Text(
            f"At {sizing['peak_rate']:g} req/s under {sizing['slo']} with {sizing['policy']}: N = "
            f"{sizing['replicas']} ({sizing['gpus']} GPUs at tensor-parallel size {sizing['tensor_parallel_size']}), "
            f"{sizing['headroom_replicas']} with one replica lost ({sizing['headroom_gpus']} GPUs)."
        )
    )
    page.plot("Fleet sizes tried", "replicas", lambda p: plots.replicas_vs_load(sizing, plan.objectives, p))
    rows = [
        [
            str(t["replicas"]),
            str(t["lost"]),
            _yes(t["held"]),
            _num(t["ttft_p99_ms"]),
            _num(t["itl_p99_ms"]),
            _num(t["e2e_p99_ms"]),
            _num(t["goodput_rps"], 2),
            _pct(t["error_ratio"]),
        ]
        for t in sizing.get("trials", [])
    ]
    header = ["replicas", "lost", "SLO held", "P99 TTFT ms", "P99 ITL ms", "P99 E2E ms", "goodput req/s", "errors"]
    page.blocks.append(Table("The search's runs (virtual time)", header, rows))
    trace = sizing.get("trace")
    if isinstance(trace, dict):
        page.plot("Replicas over the trace", "trace", lambda p: plots.trace_replicas(trace, p))
        rows = [
            [_num(w["start_s"] / 3600), _num(w["end_s"] / 3600), _num(w["peak_rate"], 2), str(w["replicas"])]
            for w in trace.get("windows", [])
        ]
        page.blocks.append(Table("Replicas per window", ["from h", "to h", "peak req/s", "replicas"], rows))
    speed = sizing.get("speed") or {}
    if speed:
        page.blocks.append(
            Text(
                f"Simulated {speed['simulated_requests']} requests and {speed['engine_steps']} engine steps in "
                f"{_num(speed['wall_s'], 2)} s ({_num(speed.get('requests_per_s'), 0)} requests/s).",
                note=True,
            )
        )
    rows = [
        [
            r["name"],
            "none found" if r["replicas"] is None else str(r["replicas"]),
            _num(r["ttft_p99_ms"]),
            _num(r["goodput_rps"], 2),
            _yes(r["slo_held"]),
            _pct(r["image_hit_ratio"]),
        ]
        for r in sizing.get("what_if", [])
    ]
    if rows:
        page.blocks.append(Heading(2, "What if"))
        header = ["scenario", "N needed", "P99 TTFT at base N (ms)", "goodput at base N", "holds at base N"]
        page.blocks.append(Table("What-if rows (virtual time)", [*header, "image-cache hits"], rows))


def _verify(page: _Page, plan: Plan) -> None:
    verify = plan.parts.get("verify")
    if verify is None:
        return
    page.blocks.append(Heading(2, "Verification: N and N - 1 through the real router"))
    outcome = "verified" if verify.get("passed") else "NOT verified"
    page.blocks.append(Text(f"{outcome}: {verify['replicas']} replicas at {verify['rate']:g} req/s."))
    page.blocks += [Text(f"Failure: {f}", note=True) for f in verify.get("failures", [])]
    rows = []
    for run in verify.get("runs", []):
        m, p, e = run["measured"], run["predicted"], run["error"]
        rows.append(
            [str(run["replicas"]), _opt(run["slo_held"]), _opt(run["predicted_slo_held"]), _opt(run["valid"])]
            + [f"{_num(m.get(k))} / {_num(p.get(k))} ({_pct(e.get(k))})" for k in ("ttft_p50", "ttft_p99", "e2e_p50")]
        )  # fmt: skip
    header = ["replicas", "SLO held (real)", "SLO held (virtual)", "valid"]
    header += [f"{k} real / virtual ms (error)" for k in ("ttft_p50", "ttft_p99", "e2e_p50")]
    page.blocks.append(Table("Real time against virtual time", header, rows))


def _calibration(page: _Page, plan: Plan) -> None:
    profile = plan.profile
    page.blocks.append(Heading(2, "Calibration: the fitted profile"))
    on = profile.fitted_on
    rows = [[k, str(v)] for k, v in on.model_dump(mode="json").items()]
    page.blocks.append(Table("Fitted on", ["", "value"], rows))
    rows = [
        [name, f"{e.value:.4g}", f"{e.low:.4g}", f"{e.high:.4g}", _pct((e.high - e.low) / e.value if e.value else None)]
        for name, e in profile.costs
    ]
    note = "90 % bootstrap intervals; width: (high - low) / estimate."
    page.blocks.append(
        Table("Cost terms (ms; the discount a share)", ["term", "estimate", "low", "high", "width"], rows, note)
    )
    costs = {name: e.model_dump() for name, e in profile.costs}
    page.plot("Interval widths", "intervals", lambda p: plots.intervals(costs, p))
    engine = profile.engine.model_dump()
    page.blocks.append(Table("Engine limits", ["limit", "value"], [[k, str(v)] for k, v in engine.items()]))
    fitted = plan.parts.get("calibration", {}).get("fit")
    if fitted:
        rows = [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in fitted.items()]
        page.blocks.append(Table("Fit diagnostics (calibration.json)", ["", "value"], rows))


def _data(
    plan: Plan,
    levels: Sequence[Measured],
    curve: Curve | None,
    missing: Sequence[str],
    notes: Sequence[str],
    page: _Page,
) -> dict[str, Any]:
    """report.json: the numbers behind every table and plot."""
    profile = plan.profile
    return {
        "schema": SCHEMA,
        "folder": str(plan.folder),
        "slo": plan.slo_text,
        "parts": {"profile": True, **{name: name in plan.parts for name in PARTS}},
        "missing": list(missing),
        "notes": list(notes),
        "profile": {
            "fitted_on": profile.fitted_on.model_dump(mode="json"),
            "engine": profile.engine.model_dump(),
            "costs": {name: e.model_dump() for name, e in profile.costs},
            "validation": profile.validation,
        },
        "calibration": plan.parts.get("calibration"),
        "levels": [{**asdict(lv), "folder": None if lv.folder is None else str(lv.folder)} for lv in levels],
        "curve": None if curve is None else asdict(curve),
        "validation": plan.parts.get("validation"),
        "sizing": plan.parts.get("sizing"),
        "verify": plan.parts.get("verify"),
        "plots": [p.name for p in page.plots],
        "plots_skipped": page.skipped,
    }


def _opt(value: bool | None) -> str:
    return "n/a" if value is None else _yes(value)


def _within(error: float | None, bound: float | None) -> str:
    return "" if error is None or bound is None else _yes(error <= bound)
