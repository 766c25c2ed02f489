"""`qvl plan calibrate`: measure replicas with a short sweep and fit the simulated engine to them.

1. Probe: a closed loop of 4 users per replica for `probe_s` seconds; its throughput X stands for the
   replicas' capacity (unless `max_rate` is given).
2. Sweep: `levels` Poisson levels from 10 % to 90 % of X, spaced evenly on a log scale, each an
   ordinary load-test run folder under `runs/` (a different workload seed each, so every level starts
   with caches that have not seen its photos).
3. Fit (loadtests/planner/fit.py) on every answered streamed request; the mm cache's size is the smallest
   LRU size that reproduces the hits the replicas' own counters show (every size up to the largest that
   does is recorded in calibration.json: a cache that never had to evict shows only a lower bound); the
   running cap is what the replicas' gauges show when requests waited while the most ever seen ran, else
   `max_running`.
4. Write the profile (serving/sim/profile.py) and calibration.json (levels, fit diagnostics) beside it.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from loadtests.planner.fit import Fit, Limits, cache_items_for, fit
from loadtests.planner.observe import engine_facts, fit_tokens, natural_output_tokens, observations, read_levels
from loadtests.runner import LoadtestError, LoadtestOptions, run_loadtest
from loadtests.scrape import ClusterView, discover
from loadtests.workload import ClosedLoop, Workload, with_load
from serving.sim.core import StepCosts
from serving.sim.profile import CapacityProfile, Costs, EngineLimits, Estimate, FittedOn, write_profile

Say = Callable[[str], None]
CALIBRATION_JSON = "calibration.json"
PROBE_USERS_PER_REPLICA = 4


class CalibrationError(Exception):
    """The calibration could not be made; the message says why and what to do."""


@dataclass(frozen=True)
class CalibrateOptions:
    workload: Workload
    workload_file: str
    target: str
    out: Path
    """The profile to write; the runs go to `<out without suffix>-runs/` unless `runs` is given."""
    runs: Path | None = None
    levels: int = 7
    level_s: float = 40.0
    probe_s: float = 20.0
    max_rate: float | None = None
    rates: tuple[float, ...] = ()
    """Explicit level rates (overrides the probe and `levels`)."""
    max_running: int | None = None
    max_batched_tokens: int = 8192
    mm_cache_items: int | None = None
    hardware: str | None = None
    bootstrap: int = 200
    api_key: str | None = None


def level_rates(capacity: float, levels: int) -> list[float]:
    """`levels` rates from 10 % to 90 % of `capacity`, evenly spaced on a log scale, 3 significant digits."""
    if levels < 2:
        raise ValueError("a calibration needs at least 2 levels")
    low, high = 0.1 * capacity, 0.9 * capacity
    step = (high / low) ** (1 / (levels - 1))
    return [float(f"{low * step**i:.3g}") for i in range(levels)]


def calibrate(options: CalibrateOptions, say: Say) -> tuple[CapacityProfile, Fit]:
    """Run the sweep, fit, write the profile; raises CalibrationError or LoadtestError."""
    runs = options.runs or options.out.with_name(options.out.stem + "-runs")
    if runs.exists() and any(runs.iterdir()):
        raise CalibrationError(f"{runs} exists and is not empty: give a new --runs folder (or remove it)")
    cluster = discover(options.target, options.api_key)
    if cluster.replicas == 0:
        raise CalibrationError(f"cannot see the replicas behind {options.target}: {cluster.warning}")
    rates = list(options.rates)
    if not rates:
        capacity = options.max_rate or _probe(options, runs / "probe", cluster.replicas, say)
        rates = level_rates(capacity, options.levels)
    say(
        f"calibration: {len(rates)} levels, {options.level_s:.0f} s each: "
        + ", ".join(f"{r:g}" for r in rates)
        + " req/s"
    )
    folders: list[Path] = []
    for number, rate in enumerate(rates, 1):
        say(f"[level {number}/{len(rates)}] {rate:g} req/s " + _bar(number - 1, len(rates)))
        workload = with_load(options.workload, rate, options.level_s).model_copy(
            update={"seed": options.workload.seed + number}
        )
        folder = runs / f"level-{number}-{rate:g}"
        run_loadtest(_run_options(options, workload, folder, f"calibration level {number}"), say)
        folders.append(folder)
    say(f"calibration: sweep done {_bar(len(rates), len(rates))}; fitting")
    levels = read_levels(folders)
    # One count of tokens for all levels: the fit prices requests with the profile's own counting.
    tokens = fit_tokens(options.workload, [r for level in levels for r in level.records])
    tokens = tokens.model_copy(update={"natural_output_tokens": natural_output_tokens(levels)})
    observed = observations(levels, tokens)
    facts = engine_facts(folders)
    max_running = facts.running_cap or options.max_running
    if max_running is None:
        raise CalibrationError(
            f"the replicas never had requests waiting (at most {facts.most_running} ran at once), so their "
            "running cap was not seen: give --max-running (vLLM's max_num_seqs)"
        )
    items_range: tuple[int, int | None] | None = None
    if options.mm_cache_items is not None:
        items = options.mm_cache_items
    elif facts.mm_queries:
        items_range = cache_items_for(observed, facts.mm_hits)
        items = items_range[0]
    else:
        raise CalibrationError("the replicas report no mm-cache counters: give --mm-cache-items")
    limits = Limits(max_running, options.max_batched_tokens, items)
    fitted = fit(observed, limits, bootstrap=options.bootstrap)
    model, version = _engine_facts(options.target, cluster, say)
    profile = _profile(options, fitted, limits, rates, len(observed), cluster.replicas, model, version)
    profile = profile.model_copy(update={"tokens": tokens})
    options.out.parent.mkdir(parents=True, exist_ok=True)
    write_profile(profile, options.out)
    (options.out.parent / CALIBRATION_JSON).write_text(
        json.dumps(
            {
                "profile": str(options.out),
                "runs": [str(f) for f in folders],
                "rates": rates,
                "requests": len(observed),
                "limits": {
                    "max_running": max_running,
                    "running_cap_seen": facts.running_cap is not None,
                    "mm_cache_items": items,
                    "mm_cache_items_consistent": None if items_range is None else list(items_range),
                },
                "mm_cache": {"queries": facts.mm_queries, "hits": facts.mm_hits},
                "fit": {
                    "iterations": fitted.iterations,
                    "rows": fitted.rows,
                    "ttft_median_relative_error": fitted.ttft_error,
                    "e2e_median_relative_error": fitted.e2e_error,
                },
            },
            indent=2,
        )
        + "\n"
    )
    return profile, fitted


def _run_options(options: CalibrateOptions, workload: Workload, folder: Path, label: str) -> LoadtestOptions:
    return LoadtestOptions(
        workload=workload,
        workload_file=options.workload_file,
        target=options.target,
        out=folder,
        label=label,
        drain_s=60.0,
        run_time_s=options.probe_s if isinstance(workload.arrivals, ClosedLoop) else None,
        scrape_interval_s=0.5,
    )


def _probe(options: CalibrateOptions, folder: Path, replicas: int, say: Say) -> float:
    users = PROBE_USERS_PER_REPLICA * replicas
    say(f"calibration: probing capacity with {users} users for {options.probe_s:.0f} s")
    arrivals = ClosedLoop(process="closed", users=users, requests=100_000)
    workload = options.workload.model_copy(update={"arrivals": arrivals})
    summary = run_loadtest(_run_options(options, workload, folder, "calibration probe"), say)
    if summary.throughput_rps <= 0:
        raise LoadtestError("the capacity probe got no answer")
    say(f"calibration: the replicas answered {summary.throughput_rps:.2f} req/s with {users} users")
    return summary.throughput_rps


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = math.floor(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def _engine_facts(target: str, cluster: ClusterView, say: Say) -> tuple[str, str]:
    """The served model (GET /v1/models) and the engine version (GET /version of the first replica);
    "unknown", said aloud, where a replica does not tell."""
    model = version = "unknown"
    try:
        models = httpx.get(f"{target.rstrip('/')}/v1/models", timeout=10).json()
        model = str(models["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        say(f"warning: cannot read the served model from {target}/v1/models ({exc}); the profile says unknown")
    replicas = [s for s in cluster.sources if s.name.startswith("replica")]
    if replicas:
        base = replicas[0].url.removesuffix("/metrics")
        try:
            version = str(httpx.get(f"{base}/version", timeout=10).json()["version"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            say(f"warning: cannot read the engine version from {base}/version ({exc}); the profile says unknown")
    return model, version


def _engine_name(version: str) -> str:
    """vllm, or sim for the simulated engine (its /version says qvl-sim), from a replica's version."""
    if version.startswith("qvl-sim"):
        return "sim"
    return "unknown" if version == "unknown" else "vllm"


def _hardware() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} (the host qvl plan ran on)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} (the host qvl plan ran on)"


def _estimate(value: float, interval: tuple[float, float], scale: float) -> Estimate:
    low, high = sorted(interval)
    return Estimate(value=value * scale, low=min(low, value) * scale, high=max(high, value) * scale)


def _profile(
    options: CalibrateOptions,
    fitted: Fit,
    limits: Limits,
    rates: list[float],
    requests: int,
    replicas: int,
    model: str,
    version: str,
) -> CapacityProfile:
    c: StepCosts = fitted.costs
    iv = fitted.intervals
    ms = 1000.0
    costs = Costs(
        step_base_ms=_estimate(c.step_base, iv["step_base"], ms),
        per_decode_ms=_estimate(c.per_decode, iv["per_decode"], ms),
        per_kv_ktoken_ms=_estimate(c.per_kv_ktoken, iv["per_kv_ktoken"], ms),
        prefill_base_ms=_estimate(c.prefill_base, iv["prefill_base"], ms),
        per_text_token_ms=_estimate(c.per_text_token, iv["per_text_token"], ms),
        per_image_token_ms=_estimate(c.per_image_token, iv["per_image_token"], ms),
        image_hit_discount=_estimate(c.image_hit_discount, iv["image_hit_discount"], 1.0),
        frontend_base_ms=_estimate(fitted.frontend_base, iv["frontend_base"], ms),
        frontend_per_image_token_ms=_estimate(fitted.frontend_per_image_token, iv["frontend_per_image_token"], ms),
    )
    return CapacityProfile(
        fitted_on=FittedOn(
            model=model,
            hardware=options.hardware or _hardware(),
            engine=_engine_name(version),
            engine_version=version,
            date=datetime.datetime.now(datetime.UTC).replace(microsecond=0),
            workload=options.workload.name,
            rates=rates,
            requests=requests,
            replicas=replicas,
        ),
        engine=EngineLimits(
            max_running=limits.max_running,
            max_batched_tokens=limits.max_batched_tokens,
            mm_cache_items=limits.mm_cache_items,
        ),
        costs=costs,
    )
