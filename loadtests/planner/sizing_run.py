"""`qvl plan size` end to end: check the profile may recommend, size the peak (or a day's trace), add the
what-if rows, and write sizing.json and sizing.md (loadtests/planner/size.py does the search itself).

A profile may recommend when `qvl plan validate` recorded its errors and each is within the bounds; a
profile never validated is refused unless the caller says `unvalidated` (then every output says so).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtests.planner.size import Sizing, Trial, size
from loadtests.planner.trace import RateCurve, TraceSizing, curve_of, load_rate_curve, size_trace
from loadtests.planner.whatif import WhatIf, what_ifs
from loadtests.slo import Objective
from loadtests.workload import Workload
from qvl.settings import PolicyName
from serving.sim.profile import CapacityProfile

Say = Callable[[str], None]
SIZING_JSON = "sizing.json"
SIZING_MD = "sizing.md"


class RefusedError(Exception):
    """The profile's measured error is over a bound (or was never measured); the message says which."""


def refusals(profile: CapacityProfile, bounds: dict[str, float]) -> list[str]:
    """Why the profile may not recommend: each bounded error over its bound, or no validation at all."""
    recorded = profile.validation
    if not recorded:
        return ["the profile was never validated (run `qvl plan validate`, or pass --unvalidated)"]
    reasons = []
    for name, bound in bounds.items():
        error = recorded.get(name)
        if error is None:
            reasons.append(f"the profile's validation has no {name} error to check against its bound {bound:.0%}")
        elif error > bound:
            reasons.append(f"the profile's {name} error {error:.1%} is over its bound {bound:.0%}")
    return reasons


@dataclass(frozen=True)
class SizeOptions:
    profile_path: Path
    profile: CapacityProfile
    workload: Workload
    objectives: tuple[Objective, ...]
    slo_text: str
    out: Path
    bounds: dict[str, float]
    peak_rate: float | None = None
    trace: Path | None = None
    duration_s: float = 600.0
    policy: PolicyName = "least-loaded"
    what_if: bool = True
    unvalidated: bool = False


def run_size(options: SizeOptions, say: Say) -> dict[str, object]:
    """Size, write sizing.json and sizing.md; returns what sizing.json holds. Raises RefusedError."""
    reasons = refusals(options.profile, options.bounds)
    if reasons and not options.unvalidated:
        raise RefusedError("; ".join(reasons))
    started = time.perf_counter()
    result: dict[str, object] = {
        "profile": str(options.profile_path),
        "workload": options.workload.name,
        "slo": options.slo_text,
        "policy": options.policy,
        "validated": not reasons,
        "caveats": reasons,
    }
    if options.trace is not None or options.peak_rate is None:
        curve: RateCurve = load_rate_curve(options.trace) if options.trace else curve_of(options.workload)
        say(f"size: a trace of {curve.duration_s / 3600:.1f} h, window by window")
        traced: TraceSizing = size_trace(
            options.workload, options.profile, options.objectives, curve, policy=options.policy, progress=say
        )
        result["trace"] = {
            "window_s": traced.window_s,
            "sample_s": traced.sample_s,
            "replicas": traced.replicas,
            "windows": [asdict(w) for w in traced.windows],
        }
        peak = max(w.peak_rate for w in traced.windows)
    else:
        peak = options.peak_rate
    say(f"size: {options.duration_s / 60:.0f} simulated minutes at {peak:g} req/s per fleet size tried")
    sizing = size(
        options.workload,
        options.profile,
        options.objectives,
        peak,
        duration_s=options.duration_s,
        policy=options.policy,
        progress=say,
    )
    result.update(_sizing(sizing))
    if options.what_if:
        say("size: what-if rows")
        rows = what_ifs(
            options.workload,
            options.profile,
            options.objectives,
            peak,
            sizing,
            duration_s=options.duration_s,
            progress=say,
        )
        result["what_if"] = [asdict(r) for r in rows]
    result["wall_s"] = time.perf_counter() - started
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / SIZING_JSON).write_text(json.dumps(result, indent=2) + "\n")
    (options.out / SIZING_MD).write_text(markdown(result))
    return result


def _sizing(sizing: Sizing) -> dict[str, object]:
    trials = sorted(sizing.trials, key=lambda t: (t.lost, t.replicas))
    steps = sum(t.engine_steps for t in trials)
    requests = sum(t.summary.requests for t in trials)
    wall = sum(t.wall_s for t in trials)
    return {
        "peak_rate": sizing.peak_rate,
        "replicas": sizing.replicas,
        "headroom_replicas": sizing.headroom_replicas,
        "tensor_parallel_size": sizing.tensor_parallel_size,
        "gpus": sizing.gpus,
        "headroom_gpus": sizing.headroom_gpus,
        "trials": [_trial(t) for t in trials],
        "speed": {
            "simulated_requests": requests,
            "engine_steps": steps,
            "wall_s": wall,
            "requests_per_s": requests / wall if wall else None,
            "steps_per_s": steps / wall if wall else None,
        },
    }


def _trial(trial: Trial) -> dict[str, object]:
    s = trial.summary
    return {
        "replicas": trial.replicas,
        "lost": trial.lost,
        "held": trial.held,
        "ttft_p50_ms": s.ttft_ms.p50,
        "ttft_p99_ms": s.ttft_ms.p99,
        "itl_p99_ms": s.itl_ms.p99,
        "e2e_p99_ms": s.e2e_ms.p99,
        "goodput_rps": s.goodput_rps,
        "throughput_rps": s.throughput_rps,
        "error_ratio": s.error_ratio,
        "image_hit_ratio": trial.image_hit_ratio,
        "engine_steps": trial.engine_steps,
        "wall_s": trial.wall_s,
    }


def markdown(result: dict[str, object]) -> str:
    """sizing.md: the answer, the search's runs, the what-if rows, a trace's windows."""
    lines = [f"# Sizing: {result['workload']} at {result['peak_rate']:g} req/s, SLO `{result['slo']}`", ""]
    if not result["validated"]:
        lines += ["**Unvalidated profile**: " + "; ".join(result["caveats"]), ""]  # type: ignore[arg-type]
    lines += [
        f"- **N = {result['replicas']}** replicas ({result['gpus']} GPUs at tensor-parallel size "
        f"{result['tensor_parallel_size']}), routing policy {result['policy']}",
        f"- with one replica of failure headroom: **{result['headroom_replicas']}** ({result['headroom_gpus']} GPUs)",
    ]
    speed = result["speed"]
    assert isinstance(speed, dict)
    lines += [
        f"- simulated {speed['simulated_requests']} requests and {speed['engine_steps']} engine steps in "
        f"{speed['wall_s']:.1f} s ({speed['requests_per_s'] or 0:.0f} requests/s, "
        f"{speed['steps_per_s'] or 0:.0f} steps/s)",
        "",
        "| replicas | lost | SLO held | P99 TTFT ms | P99 ITL ms | P99 e2e ms | goodput req/s | errors |",
        "|---:|---:|:--:|---:|---:|---:|---:|---:|",
    ]
    for t in result["trials"]:  # type: ignore[attr-defined]
        lines.append(
            f"| {t['replicas']} | {t['lost']} | {'yes' if t['held'] else 'no'} | {_n(t['ttft_p99_ms'])} | "
            f"{_n(t['itl_p99_ms'])} | {_n(t['e2e_p99_ms'])} | {_n(t['goodput_rps'])} | {t['error_ratio']:.2%} |"
        )
    rows: Sequence[dict[str, object]] = result.get("what_if", [])  # type: ignore[assignment]
    if rows:
        lines += [
            "",
            "## What if",
            "",
            "| scenario | N needed | P99 TTFT at base N, ms | goodput at base N | holds at base N | image-cache hits |",
            "|---|---:|---:|---:|:--:|---:|",
        ]
        for r in rows:
            hits = r["image_hit_ratio"]
            needed = r["replicas"] if r["replicas"] is not None else "none found"
            shown = "n/a" if hits is None else f"{hits:.0%}"
            lines.append(
                f"| {r['name']} | {needed} | {_n(r['ttft_p99_ms'])} | {_n(r['goodput_rps'])} | "
                f"{'yes' if r['slo_held'] else 'no'} | {shown} |"
            )
    trace = result.get("trace")
    if isinstance(trace, dict):
        lines += [
            "",
            f"## Replicas over the day ({trace['window_s'] / 3600:g} h windows)",
            "",
            "| from h | to h | peak req/s | replicas |",
            "|---:|---:|---:|---:|",
        ]
        for w in trace["windows"]:
            lines.append(
                f"| {w['start_s'] / 3600:.1f} | {w['end_s'] / 3600:.1f} | {w['peak_rate']:.3g} | {w['replicas']} |"
            )
    return "\n".join(lines) + "\n"


def _n(value: object) -> str:
    return "n/a" if value is None else f"{value:.4g}"


__all__ = ["SIZING_JSON", "RefusedError", "SizeOptions", "WhatIf", "refusals", "run_size"]
