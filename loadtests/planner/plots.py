"""The capacity-planning report's figures: each draws one PNG from numbers the report also writes to
report.json, and raises `NoData` (the load-test report's) with the reason when it has nothing to draw.

Drawn on `matplotlib.figure.Figure` without pyplot, with the load-test figures' size, decoration and PNG
writer (loadtests/plots.py), so both reports look alike and the same numbers give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from loadtests.planner.planfolder import Curve, Measured
from loadtests.plots import NoData, _decorate, _figure, _save, _text
from loadtests.slo import Objective

PREDICTED = "C0"
P50, P99, HIGHEST = "C2", "C3", "purple"
MARKERS = {"calibration": "o", "between": "s", "above": "D", "bursty": "^"}
KIND_LABELS = {
    "calibration": "calibration level",
    "between": "validation (held out)",
    "above": "validation (held out)",
    "bursty": "bursty level (Gamma cv 3)",
}


def headline(curve: Curve, levels: Sequence[Measured], objectives: Sequence[Objective], out: Path) -> Path:
    """TTFT and end-to-end P50/P99 against offered rate: predicted lines, measured points, SLO bounds, and
    the predicted highest SLO-compliant rate. Colour is the percentile (line: predicted, marker: measured),
    the marker's shape the kind of level; one legend for both panels, below them."""
    if not curve.points:
        raise NoData("no predicted point")
    figure = _figure(2)
    figure.set_size_inches(11, 4.8)
    panels = figure.subplots(1, 2)
    for axes, metric, title in zip(panels, ("ttft", "e2e"), ("Time to first token", "End-to-end latency"), strict=True):
        _rate_panel(axes, curve, levels, metric)
        for objective in objectives:
            if objective.metric == metric:
                axes.axhline(objective.bound, color="red", linewidth=1)
                axes.annotate(f"SLO {_text(objective.text)}", (0, objective.bound), (4, 3), textcoords="offset points",
                              xycoords=("axes fraction", "data"), color="red", fontsize=8)  # fmt: skip
        _highest(axes, curve, label=False)
        axes.set_ylim(0, None)
        _decorate(axes, f"{title}: predicted vs measured", "offered rate (requests/s)", "ms")
    kinds = {("between" if lv.kind == "above" else lv.kind) for lv in levels}
    handles = [
        Line2D([], [], color=P50, linestyle="-", label="predicted P50"),
        Line2D([], [], color=P99, linestyle="--", label="predicted P99"),
        *(
            Line2D([], [], color="grey", marker=MARKERS[k], linestyle="", label=f"measured: {KIND_LABELS[k]}")
            for k in MARKERS
            if k in kinds
        ),
    ]
    if any(lv.kind == "bursty" and lv.predicted for lv in levels):
        handles.append(Line2D([], [], color="black", marker="x", linestyle="", label="predicted: bursty level"))
    if curve.highest_rate is not None:
        handles.append(
            Line2D(
                [], [], color=HIGHEST, linestyle=":", label=f"predicted highest compliant {curve.highest_rate:.3g}/s"
            )
        )
    figure.legend(handles=handles, loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    figure.suptitle(
        f"{curve.replicas} replicas, {curve.policy}: lines simulated in virtual time with the profile, "
        "markers measured (green P50, red P99)",
        fontsize=9,
    )
    return _save(figure, out)


def goodput(curve: Curve, levels: Sequence[Measured], out: Path) -> Path:
    """Goodput (requests/s meeting the SLO) against offered rate: predicted line, measured points."""
    ys = [p.get("goodput") for p in curve.points]
    if all(y is None for y in ys):
        raise NoData("no SLO recorded in the folder, so no goodput")
    figure = _figure(1)
    axes = figure.subplots()
    xs = [p["rate"] for p in curve.points]
    axes.plot(xs, [math.nan if y is None else y for y in ys], "-", color=PREDICTED, label="predicted goodput")
    axes.plot([0, max(xs)], [0, max(xs)], "-", color="grey", alpha=0.4, label="offered")
    for kind, group in _by_kind(levels).items():
        points = [(lv.rate, g) for lv in group if (g := lv.metrics.get("goodput")) is not None]
        if points:
            axes.plot(*zip(*points, strict=True), MARKERS[kind], color="C2", label=f"measured: {KIND_LABELS[kind]}")
    _highest(axes, curve)
    _decorate(axes, "Goodput against offered rate", "offered rate (requests/s)", "requests/s meeting the SLO")
    return _save(figure, out)


def replicas_vs_load(sizing: Mapping[str, Any], objectives: Sequence[Objective], out: Path) -> Path:
    """The sizing search's runs: P99 TTFT and goodput by fleet size at the peak rate, all replicas serving
    and one lost; the SLO bound, N and N with headroom marked."""
    trials = sizing.get("trials") or []
    if not trials:
        raise NoData("the sizing has no trial runs")
    figure = _figure(2)
    latency, rates = figure.subplots(1, 2)
    for lost, style, label in ((0, "o-", "all serving"), (1, "s--", "one replica lost")):
        runs = sorted((t for t in trials if t["lost"] == lost), key=lambda t: t["replicas"])
        if not runs:
            continue
        xs = [t["replicas"] for t in runs]
        latency.plot(xs, [_nan(t["ttft_p99_ms"]) for t in runs], style, label=f"P99 TTFT, {label}")
        rates.plot(xs, [_nan(t["goodput_rps"]) for t in runs], style, label=f"goodput, {label}")
    latency.set_yscale("log")
    for objective in objectives:
        if objective.metric == "ttft":
            latency.axhline(objective.bound, color="red", linewidth=1, label=f"SLO {_text(objective.text)}")
    rates.axhline(sizing["peak_rate"], color="grey", linestyle=":", label=f"peak {sizing['peak_rate']:g} req/s")
    for axes in (latency, rates):
        axes.axvline(sizing["replicas"], color="C2", linestyle=":", label=f"N = {sizing['replicas']}")
        if sizing.get("headroom_replicas") is not None:
            axes.axvline(
                sizing["headroom_replicas"],
                color="C4",
                linestyle="-.",
                label=f"with headroom {sizing['headroom_replicas']}",
            )
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    _decorate(latency, f"P99 TTFT by fleet size at {sizing['peak_rate']:g} req/s", "replicas", "ms (log)")
    _decorate(rates, "Goodput by fleet size", "replicas", "requests/s")
    return _save(figure, out)


def trace_replicas(trace: Mapping[str, Any], out: Path) -> Path:
    """Replicas needed per window of a day's trace, with each window's peak rate on a second axis."""
    windows = trace.get("windows") or []
    if not windows:
        raise NoData("the trace has no windows")
    figure = _figure(1)
    axes = figure.subplots()
    hours = [w["start_s"] / 3600 for w in windows] + [windows[-1]["end_s"] / 3600]
    needed = [w["replicas"] for w in windows]
    axes.step(hours, [*needed, needed[-1]], where="post", color="C0", label="replicas needed")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylim(0, max(needed) + 1)
    peaks = axes.twinx()
    peaks.step(hours, [*(w["peak_rate"] for w in windows), windows[-1]["peak_rate"]], where="post", color="C1")
    peaks.set_ylabel("peak rate in the window (requests/s)", color="C1")
    peaks.set_ylim(0, None)
    _decorate(axes, f"Replicas over the trace ({trace['window_s'] / 3600:g} h windows)", "hour", "replicas")
    return _save(figure, out)


def intervals(costs: Mapping[str, Mapping[str, float]], out: Path) -> Path:
    """Each fitted term's 90 % bootstrap interval relative to its estimate (a forest plot); terms estimated
    at 0 have no relative width and are left out (the table shows them)."""
    terms = [(name, c) for name, c in costs.items() if c["value"] > 0]
    if not terms:
        raise NoData("every term is 0")
    figure = _figure(1)
    axes = figure.subplots()
    for row, (_, c) in enumerate(terms):
        low, high = 100 * (c["low"] / c["value"] - 1), 100 * (c["high"] / c["value"] - 1)
        axes.plot([low, high], [row, row], "-", color="C0", linewidth=2)
        axes.plot([0], [row], "o", color="C0")
    axes.axvline(0, color="grey", linewidth=0.8)
    axes.set_yticks(range(len(terms)), [_text(name) for name, _ in terms])
    axes.invert_yaxis()
    skipped = [name for name, c in costs.items() if c["value"] <= 0]
    note = f"\n(estimated at 0, not drawn: {', '.join(skipped)})" if skipped else ""
    _decorate(axes, "Fitted terms: 90 % bootstrap interval", f"% of the estimate{_text(note)}", "")
    return _save(figure, out)


def errors_vs_bounds(errors: Mapping[str, float], bounds: Mapping[str, float], out: Path) -> Path:
    """Validation's median relative error per metric (steady levels) and the bursty level's, with the bounds."""
    metrics = [m for m in errors if not m.startswith("bursty_")]
    if not metrics:
        raise NoData("the validation measured no error")
    figure = _figure(2)
    axes = figure.subplots()
    xs = range(len(metrics))
    axes.bar([x - 0.2 for x in xs], [100 * errors[m] for m in metrics], 0.4, label="steady levels (median)")
    axes.bar([x + 0.2 for x in xs], [100 * errors.get(f"bursty_{m}", math.nan) for m in metrics], 0.4, label="bursty")
    for x, m in enumerate(metrics):
        for offset, name in ((-0.2, m), (0.2, f"bursty_{m}")):
            if name in bounds:
                axes.plot([x + offset - 0.2, x + offset + 0.2], [100 * bounds[name]] * 2, color="red", linewidth=2)
    axes.plot([], [], color="red", linewidth=2, label="bound")
    axes.set_xticks(list(xs), [_text(m) for m in metrics], rotation=30)
    _decorate(axes, "Prediction error on held-out levels", "", "|predicted - measured| / measured, %")
    return _save(figure, out)


def _rate_panel(axes: Axes, curve: Curve, levels: Sequence[Measured], metric: str) -> None:
    xs = [p["rate"] for p in curve.points]
    for q, style, colour in (("p50", "-", P50), ("p99", "--", P99)):
        axes.plot(xs, [_nan(p.get(f"{metric}_{q}")) for p in curve.points], style, color=colour)
        for kind, group in _by_kind(levels).items():
            points = [(lv.rate, v) for lv in group if (v := lv.metrics.get(f"{metric}_{q}")) is not None]
            if points:
                axes.plot(*zip(*points, strict=True), MARKERS[kind], color=colour, markersize=5)
    for lv in levels:
        if lv.kind == "bursty" and lv.predicted:
            shown = [(lv.rate, y) for q in ("p50", "p99") if (y := lv.predicted.get(f"{metric}_{q}")) is not None]
            if shown:
                axes.plot(*zip(*shown, strict=True), "x", color="black")


def _highest(axes: Axes, curve: Curve, label: bool = True) -> None:
    if curve.highest_rate is not None:
        text = f"predicted highest compliant rate {curve.highest_rate:.3g}/s" if label else "_nolegend_"
        axes.axvline(curve.highest_rate, color=HIGHEST, linestyle=":", label=text)


def _by_kind(levels: Sequence[Measured]) -> dict[str, list[Measured]]:
    """Levels by kind, between and above drawn as one kind (both are held-out steady levels)."""
    groups: dict[str, list[Measured]] = {}
    for level in levels:
        kind = "between" if level.kind == "above" else level.kind
        groups.setdefault(kind, []).append(level)
    return groups


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)
