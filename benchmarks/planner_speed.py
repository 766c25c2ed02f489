"""How fast the capacity planner simulates: a 10-minute scenario of 32 replicas at peak load, in virtual time.

The profile has GPU-like costs (below, `PROFILE_MS`): a 15 ms step, 0.3 ms per decoding request, prefill
0.05 ms per text token and 0.08 ms per image token, 64 requests running at once, a 256-photo mm cache, 2 ms
of front end. The workload is loadtests/workloads/storefront.yaml: Poisson arrivals of streamed questions
(sampled) and captions (greedy, so the answer cache serves repeats) about photos of three sizes.

Peak load is the highest rate at which the replicas, behind the router's default policy, still hold
`ttft_p99<=1.5s,errors<=0.1%` over the whole scenario: found by bisection to within 1 % (the probes are
not timed). The scenario at that rate is then planned from the workload file and simulated afresh, each
phase timed in wall and CPU seconds:
the schedule (`build_schedule`), preparing the requests (token counts, digests, cache keys), the simulation
and the summary. Target (issue 15): the whole at most 60 s on this 2-core machine. Unless `--no-search`, one
sizing search (`size_scenario` with headroom) over the same 10 minutes is timed too: what `qvl plan size`
costs at that scale.

    python -m benchmarks.planner_speed [--replicas 32] [--minutes 10] [--no-search]

Writes benchmarks/results/planner_speed.json and .md (the Markdown derived from the JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.common import RESULTS
from loadtests.planner.scenario import prepare
from loadtests.planner.size import size_scenario
from loadtests.planner.vtime import DEFAULT_POLICY, simulate
from loadtests.schedule import build_schedule
from loadtests.slo import parse_slo
from loadtests.workload import Workload, load_workload, with_load
from serving.sim.profile import CapacityProfile, Estimate

WORKLOAD = Path(__file__).resolve().parents[1] / "loadtests" / "workloads" / "storefront.yaml"
SLO = "ttft_p99<=1.5s,errors<=0.1%"
TARGET_S = 60.0
PEAK_PRECISION = 0.01
PROFILE_MS = {
    "step_base_ms": 15.0,
    "per_decode_ms": 0.3,
    "per_kv_ktoken_ms": 0.0,
    "prefill_base_ms": 0.0,
    "per_text_token_ms": 0.05,
    "per_image_token_ms": 0.08,
    "image_hit_discount": 1.0,
    "frontend_base_ms": 2.0,
    "frontend_per_image_token_ms": 0.001,
}
ENGINE = {"max_running": 64, "max_batched_tokens": 8192, "mm_cache_items": 256, "tensor_parallel_size": 1}
T = TypeVar("T")


def gpu_like_profile() -> CapacityProfile:
    """The benchmark's profile: fixed costs, not fitted (see PROFILE_MS and ENGINE)."""
    return CapacityProfile.model_validate(
        {
            "fitted_on": {
                "model": "none (benchmark)",
                "hardware": "GPU-like costs, chosen",
                "engine": "sim",
                "engine_version": "0",
                "date": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
                "workload": WORKLOAD.stem,
                "rates": [],
                "requests": 0,
                "replicas": 1,
            },
            "engine": ENGINE,
            "costs": {name: Estimate.fixed(value) for name, value in PROFILE_MS.items()},
        }
    )


def timed(work: Callable[[], T]) -> tuple[T, float, float]:
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def holds(
    workload: Workload, profile: CapacityProfile, replicas: int, rate: float, duration_s: float
) -> tuple[bool, float | None]:
    """Whether `replicas` hold the SLO at `rate` over `duration_s`, and the run's P99 TTFT (ms)."""
    scenario = prepare(with_load(workload, rate=rate, duration_s=duration_s))
    summary = simulate(scenario, profile, replicas).summary(parse_slo(SLO))
    return bool(summary.slo_held), summary.ttft_ms.p99


def find_peak(
    workload: Workload, profile: CapacityProfile, replicas: int, duration_s: float
) -> tuple[float, list[dict[str, Any]]]:
    """The highest rate `replicas` hold over `duration_s` (bisection to PEAK_PRECISION), and every probe."""
    probes: list[dict[str, Any]] = []

    def probe(rate: float) -> bool:
        held, p99 = holds(workload, profile, replicas, rate, duration_s)
        probes.append({"rate": round(rate, 3), "held": held, "ttft_p99_ms": p99})
        print(f"  {rate:8.2f} req/s: P99 TTFT {p99 or 0:8.1f} ms, {'held' if held else 'missed'}", flush=True)
        return held

    low, high = 0.0, 4.0 * replicas
    while probe(high):
        low, high = high, high * 2
    while (high - low) > PEAK_PRECISION * high:
        mid = (low + high) / 2
        low, high = (mid, high) if probe(mid) else (low, mid)
    return low, probes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=32, help="replicas of the scenario")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the scenario")
    parser.add_argument("--no-search", action="store_true", help="skip timing a sizing search")
    args = parser.parse_args()

    profile = gpu_like_profile()
    base = load_workload(WORKLOAD)
    load_before = os.getloadavg()
    print(f"planner_speed: peak load of {args.replicas} replicas ({SLO} over {args.minutes:g} min)", flush=True)
    peak, probes = find_peak(base, profile, args.replicas, args.minutes * 60)
    print(f"planner_speed: {args.minutes:g} minutes of {args.replicas} replicas at {peak:.1f} req/s", flush=True)
    workload = with_load(base, rate=peak, duration_s=args.minutes * 60)
    plans, schedule_s, schedule_cpu = timed(lambda: build_schedule(workload))
    scenario, prepare_s, prepare_cpu = timed(lambda: prepare(workload, plans))
    result, simulate_s, simulate_cpu = timed(lambda: simulate(scenario, profile, args.replicas))
    summary, summary_s, summary_cpu = timed(lambda: result.summary(parse_slo(SLO)))
    total_s = schedule_s + prepare_s + simulate_s + summary_s
    doc: dict[str, Any] = {
        "benchmark": "planner_speed",
        "workload": WORKLOAD.name,
        "profile_ms": PROFILE_MS,
        "engine": ENGINE,
        "policy": DEFAULT_POLICY,
        "slo": SLO,
        "replicas": args.replicas,
        "peak": {"rate": round(peak, 3), "precision": PEAK_PRECISION, "probes": probes},
        "scenario": {
            "minutes": args.minutes,
            "requests": result.requests,
            "engine_steps": result.engine_steps,
            "simulated_s": round(result.simulated_s, 3),
            "ttft_p99_ms": summary.ttft_ms.p99,
            "itl_p99_ms": summary.itl_ms.p99,
            "error_ratio": summary.error_ratio,
            "slo_held": summary.slo_held,
            "cache": summary.cache,
            "image_hit_ratio": result.image_hit_ratio,
        },
        "phases": {
            "schedule": {"wall_s": schedule_s, "cpu_s": schedule_cpu},
            "prepare": {"wall_s": prepare_s, "cpu_s": prepare_cpu},
            "simulate": {"wall_s": simulate_s, "cpu_s": simulate_cpu},
            "summarise": {"wall_s": summary_s, "cpu_s": summary_cpu},
        },
        "total_wall_s": total_s,
        "target_s": TARGET_S,
        "requests_per_s": result.requests / simulate_s,
        "steps_per_s": result.engine_steps / simulate_s,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    if not args.no_search:
        print("planner_speed: one sizing search with headroom over the same scenario", flush=True)
        sizing, search_s, search_cpu = timed(
            lambda: size_scenario(scenario, profile, parse_slo(SLO), peak, progress=lambda line: print(" ", line))
        )
        doc["search"] = {
            "replicas": sizing.replicas,
            "headroom_replicas": sizing.headroom_replicas,
            "runs": [
                {"replicas": t.replicas, "lost": t.lost, "held": t.held, "wall_s": t.wall_s} for t in sizing.trials
            ],
            "wall_s": search_s,
            "cpu_s": search_cpu,
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "planner_speed.json").write_text(json.dumps(doc, indent=2) + "\n")
    report = render(doc)
    (RESULTS / "planner_speed.md").write_text(report)
    print(report)
    return 0


def render(doc: dict[str, Any]) -> str:
    """The Markdown report, from the JSON document alone."""
    scenario, phases, peak = doc["scenario"], doc["phases"], doc["peak"]
    costs = ", ".join(f"{k.removesuffix('_ms')} {v:g}" for k, v in doc["profile_ms"].items())
    verdict = "within" if doc["total_wall_s"] <= doc["target_s"] else "OVER"
    lines = [
        "# Capacity planner speed",
        "",
        f"{scenario['minutes']:g} minutes of {doc['workload']} traffic through {doc['replicas']} simulated replicas",
        f"behind the `{doc['policy']}` policy, in virtual time, on a {doc['machine']['cpus']}-core machine shared "
        f"with other work (load average {doc['machine']['load_average_before'][0]:g} before the run).",
        "",
        f"- Profile (ms; the discount a share): {costs}; engine {doc['engine']}.",
        f"- Peak load: {peak['rate']:g} req/s, the highest rate holding `{doc['slo']}` with {doc['replicas']} "
        f"replicas over the whole scenario ({len(peak['probes'])} probes, bisection to {peak['precision']:.0%}).",
        f"- The scenario: {scenario['requests']:,} requests, {scenario['engine_steps']:,} engine steps; P99 TTFT "
        f"{scenario['ttft_p99_ms']:.0f} ms, P99 ITL {scenario['itl_p99_ms']:.1f} ms, errors (503 overloaded) "
        f"{scenario['error_ratio']:.2%}: SLO {'held' if scenario['slo_held'] else 'missed'} over the "
        f"{scenario['minutes']:g} minutes; answer cache {scenario['cache']}; "
        f"engine image-cache hit ratio {scenario['image_hit_ratio']:.1%}.",
        "",
        "| phase | wall s | CPU s |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {p['wall_s']:.2f} | {p['cpu_s']:.2f} |" for name, p in phases.items()]
    lines += [
        f"| **total** | **{doc['total_wall_s']:.2f}** | {sum(p['cpu_s'] for p in phases.values()):.2f} |",
        "",
        f"Simulation alone: {doc['requests_per_s']:,.0f} simulated requests/s and {doc['steps_per_s']:,.0f} engine "
        f"steps/s. Total {doc['total_wall_s']:.1f} s: {verdict} the {doc['target_s']:g} s target.",
    ]
    search = doc.get("search")
    if search is not None:
        runs = ", ".join(
            f"{r['replicas']}{'-1' if r['lost'] else ''}{'+' if r['held'] else '-'}" for r in search["runs"]
        )
        lines += [
            "",
            f"One sizing search (`size_scenario` with headroom, same scenario and SLO): N = {search['replicas']}, "
            f"with headroom {search['headroom_replicas']}, {len(search['runs'])} simulated runs in "
            f"{search['wall_s']:.1f} s wall ({search['cpu_s']:.1f} s CPU). Runs in order (replicas, -1: one lost, "
            f"+ held, - missed): {runs}.",
        ]
    lines += ["", f"Measured {doc['machine']['when']} with Python {doc['machine']['python']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
