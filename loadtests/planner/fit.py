"""Fit the simulated engine's step-time model to measured requests, with bootstrap intervals.

The observations are the per-request records of a calibration sweep (loadtests/runfolder.py): when each
request was sent, which replica answered, its first-token and last-token times, its prompt (text tokens,
images and their token counts, from the workload's reproducible schedule) and its output length.

The model (serving/sim/core.py) makes every step's duration a dot product θ·x of fixed weights θ with the
step's features x (decodes, KV tokens, prefills, text and image tokens). Given the schedule of steps, each
measured time is then linear in θ and in the front-end terms (fb, fi):

    first token:  TTFT_r + sent_r - sent_r0 = fb + fi * image tokens of r0 + θ · (Σ x over the busy period's
                  steps up to r's prefill step)        (r0: the request that opened the busy period)
    decode:       E2E_r - TTFT_r = θ · (Σ x over the steps after r's prefill, up to its last token)

The schedule itself depends on θ (how long steps are decides who arrives during which step), so the fit
alternates: replay every replica's arrivals through the real engine core with the current θ, solve the
non-negative least squares (rows weighted by 1/y, so each counts by its relative error), and repeat until
θ stops moving. Intervals: refits on requests resampled with replacement (both rows of a request
together), on the final schedule; the 5th and 95th percentiles.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls  # type: ignore[import-untyped]  # scipy ships no type hints (scipy-stubs not installed)

from serving.sim.core import FEATURES, CoreImage, CoreRequest, EngineCore, StepCosts

TERMS = (*FEATURES, "frontend_base", "frontend_per_image_token")
"""The fitted unknowns: the step model's weights (FEATURES), then the front-end terms."""
MIN_Y_S = 0.02  # rows are weighted by 1/max(y, this): a 1 ms measurement cannot claim 20x the weight
HUBER_K = 1.345  # residuals beyond this many robust standard deviations count linearly, not squared


@dataclass(frozen=True, slots=True)
class Observation:
    """One measured request, as the fit needs it (times in seconds)."""

    replica: str
    sent_s: float
    ttft_s: float
    e2e_s: float
    output_tokens: int
    text_tokens: int
    images: tuple[CoreImage, ...]
    level: int = 0
    """The calibration level it was measured in (0 is the lightest)."""

    @property
    def image_tokens(self) -> int:
        return sum(image.tokens for image in self.images)


@dataclass(frozen=True, slots=True)
class Limits:
    """The scheduler limits the replay runs with (not fitted by least squares)."""

    max_running: int
    max_batched_tokens: int
    mm_cache_items: int


@dataclass
class Fit:
    """The fitted terms (seconds, discount as a share), their intervals, and how well they explain the data."""

    costs: StepCosts
    frontend_base: float
    frontend_per_image_token: float
    intervals: dict[str, tuple[float, float]]
    """Name -> (low, high) for every StepCosts field and the two front-end terms."""
    iterations: int
    rows: int
    ttft_error: float
    """Median relative error of the fitted first-token times."""
    e2e_error: float
    """Median relative error of the fitted last-token times."""


@dataclass(slots=True)
class _Trace:
    """Where one request fell in a replay: its wait for a step, its prefill step, its decode steps."""

    wait: float = 0.0
    """Seconds from reaching the engine to the start of its prefill step."""
    prefill: tuple[float, ...] = ()
    """The features of its prefill step."""
    at_prefill: tuple[float, ...] = ()
    """Cumulative features of the replica's steps up to its prefill step (included)."""
    at_last: tuple[float, ...] = ()
    """... up to the step of its last token."""


def replay(
    observations: Sequence[Observation], costs: StepCosts, frontend: tuple[float, float], limits: Limits
) -> tuple[list[_Trace], int]:
    """Run every replica's arrivals through an engine core; each request's trace, and the steps taken."""
    traces = [_Trace() for _ in observations]
    by_replica: dict[str, list[int]] = defaultdict(list)
    for i, obs in enumerate(observations):
        by_replica[obs.replica].append(i)
    fb, fi = frontend

    def reaches(i: int) -> float:
        obs = observations[i]
        return obs.sent_s + fb + fi * obs.image_tokens

    steps = 0
    for indexes in by_replica.values():
        arrivals = sorted(indexes, key=reaches)
        core = EngineCore(costs, limits.max_running, limits.max_batched_tokens, limits.mm_cache_items)
        sums = (0.0,) * len(FEATURES)
        now = 0.0
        nxt = 0
        while nxt < len(arrivals) or not core.idle:
            if core.idle:
                now = max(now, reaches(arrivals[nxt]))
            while nxt < len(arrivals) and reaches(arrivals[nxt]) <= now:
                i = arrivals[nxt]
                obs = observations[i]
                core.add(CoreRequest(obs.text_tokens, obs.images, obs.output_tokens, i))
                nxt += 1
            duration = core.plan()
            if duration is None:  # everything added was already aborted: cannot happen here
                continue
            x = core.last_features
            sums = tuple(s + v for s, v in zip(sums, x, strict=True))
            outcome = core.finish()
            for request in outcome.first_tokens:
                handle = _index(request)
                trace = traces[handle]
                trace.wait = now - reaches(handle)
                trace.prefill = x
                trace.at_prefill = sums
            for request in outcome.finished:
                traces[_index(request)].at_last = sums
            now += duration
            steps += 1
    return traces, steps


def _index(request: CoreRequest) -> int:
    """The observation index a replayed request carries as its handle (replay adds only those)."""
    handle = request.handle
    if not isinstance(handle, int):
        raise TypeError(f"replayed request has handle {handle!r}, not an observation index")
    return handle


def _design(observations: Sequence[Observation], traces: Sequence[_Trace]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (weighted), targets (weighted), and the request each row belongs to.

    A first-token row takes the replay's wait for a step as given (queueing is the scheduler's to
    reproduce, not a cost to fit) and fits the front end and the prefill step; a last-token row adds
    the steps from the first token to the last."""
    rows: list[list[float]] = []
    ys: list[float] = []
    owners: list[int] = []
    for i, (obs, trace) in enumerate(zip(observations, traces, strict=True)):
        rows.append([*trace.prefill, 1.0, float(obs.image_tokens)])
        ys.append(obs.ttft_s - trace.wait)
        owners.append(i)
        if obs.output_tokens >= 2 and trace.at_last:
            # The last token, not last minus first: a loaded client (or engine front end) that reads the
            # first tokens late sees them in one burst, but the end of the answer when it comes.
            decode = [a - b for a, b in zip(trace.at_last, trace.at_prefill, strict=True)]
            rows.append([p + d for p, d in zip(trace.prefill, decode, strict=True)] + [1.0, float(obs.image_tokens)])
            ys.append(obs.e2e_s - trace.wait)
            owners.append(i)
    x = np.asarray(rows, dtype=float)
    y = np.asarray(ys, dtype=float)
    weights = 1.0 / np.maximum(np.abs(y), MIN_Y_S)
    return x * weights[:, None], y * weights, np.asarray(owners)


def _solve(x: np.ndarray, y: np.ndarray, rounds: int = 4) -> np.ndarray:
    """Non-negative least squares, made robust by Huber reweighting (a few measurements a loaded client
    read late must not pull every term); a column with no signal (all zero) gets 0."""
    active = np.flatnonzero(np.any(x != 0, axis=0))
    scale = np.linalg.norm(x[:, active], axis=0)
    xs = x[:, active] / scale
    weights = np.ones(len(y))
    beta = np.zeros(len(active))
    for _ in range(rounds):
        beta, _ = nnls(xs * weights[:, None], y * weights, maxiter=50 * len(active))
        residual = np.abs(xs @ beta - y)
        spread = 1.4826 * float(np.median(residual)) or 1e-12
        weights = np.sqrt(np.minimum(1.0, HUBER_K * spread / np.maximum(residual, 1e-12)))
    full = np.zeros(x.shape[1])
    full[active] = beta / scale
    return full


def _to_costs(beta: Sequence[float] | np.ndarray) -> StepCosts:
    return StepCosts.from_coefficients([float(b) for b in beta[: len(FEATURES)]])


def fit(
    observations: Sequence[Observation],
    limits: Limits,
    *,
    start: StepCosts | None = None,
    iterations: int = 40,
    tolerance: float = 0.005,
    bootstrap: int = 200,
    seed: int = 0,
) -> Fit:
    """Fit θ and the front-end terms to `observations` (see the module docstring).

    Without `start`, the two lightest levels are fitted first: there requests rarely queue, so the
    alternation starts near the answer instead of at a schedule with no queueing at all, a fixed point
    that explains every wait as a front-end cost."""
    if len(observations) < len(TERMS):
        raise ValueError(f"need at least {len(TERMS)} measured requests to fit, got {len(observations)}")
    beta = np.asarray([*(start or StepCosts(0.01, 0.001, 0.0, 0.005, 0.0001, 0.0001, 0.5)).coefficients(), 0.0, 0.0])
    levels = sorted({o.level for o in observations})
    if start is None and len(levels) > 2:
        light = [o for o in observations if o.level in levels[:2]]
        if len(light) >= 4 * len(TERMS):
            beta, _ = _alternate(light, limits, beta, iterations, tolerance)
    beta, done = _alternate(observations, limits, beta, iterations, tolerance)
    traces, _ = replay(observations, _to_costs(beta), (float(beta[-2]), float(beta[-1])), limits)
    x, y, owners = _design(observations, traces)
    # The estimate is the solve on the settled schedule, the same solve the bootstrap repeats.
    beta = _solve(x, y)
    costs, frontend = _to_costs(beta), (float(beta[-2]), float(beta[-1]))
    predicted = x @ beta
    relative = np.abs(predicted - y)
    is_ttft = np.r_[True, owners[1:] != owners[:-1]]  # each request's first row is its TTFT row
    intervals = _bootstrap(x, y, owners, bootstrap, seed)
    return Fit(
        costs=costs,
        frontend_base=frontend[0],
        frontend_per_image_token=frontend[1],
        intervals=intervals,
        iterations=done,
        rows=len(y),
        ttft_error=float(np.median(relative[is_ttft])),
        e2e_error=float(np.median(relative[~is_ttft])) if np.any(~is_ttft) else math.nan,
    )


def _alternate(
    observations: Sequence[Observation],
    limits: Limits,
    beta: np.ndarray,
    iterations: int,
    tolerance: float,
) -> tuple[np.ndarray, int]:
    """Replay with `beta`, solve, repeat (damped) until it stops moving; the best round's `beta`."""
    best: tuple[float, np.ndarray] | None = None
    done = 0
    for done in range(1, iterations + 1):
        traces, _ = replay(observations, _to_costs(beta), (float(beta[-2]), float(beta[-1])), limits)
        x, y, _ = _design(observations, traces)
        error = _median_error(x, y, beta)
        if best is None or error < best[0]:
            best = (error, beta)
        new = _solve(x, y)
        if done > 1:  # damped: a schedule can flip between two fixed points
            new = 0.5 * new + 0.5 * beta
        moved = float(np.max(np.abs(new - beta) / np.maximum(np.abs(beta), 1e-6)))
        beta = new
        if moved < tolerance:
            break
    traces, _ = replay(observations, _to_costs(beta), (float(beta[-2]), float(beta[-1])), limits)
    x, y, _ = _design(observations, traces)
    assert best is not None
    return (best[1] if best[0] < _median_error(x, y, beta) else beta), done


def _median_error(x: np.ndarray, y: np.ndarray, beta: np.ndarray) -> float:
    """Median relative error of the rows (they are weighted by 1/y: the weighted residual is relative)."""
    return float(np.median(np.abs(x @ beta - y)))


def _bootstrap(
    x: np.ndarray, y: np.ndarray, owners: np.ndarray, rounds: int, seed: int
) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    requests = np.unique(owners)
    rows_of = [np.flatnonzero(owners == r) for r in requests]
    estimates = []
    for _ in range(rounds):
        picked = rng.integers(0, len(requests), len(requests))
        index = np.concatenate([rows_of[p] for p in picked])
        beta = _solve(x[index], y[index])
        costs = _to_costs(beta)
        estimates.append(
            [
                costs.step_base,
                costs.per_decode,
                costs.per_kv_ktoken,
                costs.prefill_base,
                costs.per_text_token,
                costs.per_image_token,
                costs.image_hit_discount,
                beta[-2],
                beta[-1],
            ]
        )
    table = np.asarray(estimates)
    names = (*(f for f in StepCosts.__dataclass_fields__), "frontend_base", "frontend_per_image_token")
    low, high = np.percentile(table, [5, 95], axis=0) if rounds else (table, table)
    return {name: (float(lo), float(hi)) for name, lo, hi in zip(names, low, high, strict=True)}


def lru_hits(observations: Sequence[Observation], items: int) -> int:
    """Image hits an LRU of `items` per replica gives over the requests in send order."""
    caches: dict[str, dict[bytes, None]] = defaultdict(dict)
    hits = 0
    for obs in sorted(observations, key=lambda o: o.sent_s):
        cache = caches[obs.replica]
        for image in obs.images:
            if image.digest in cache:
                hits += 1
                del cache[image.digest]
            elif items and len(cache) >= items:
                del cache[next(iter(cache))]
            if items:
                cache[image.digest] = None
    return hits


def cache_items_for(
    observations: Sequence[Observation], measured_hits: int, upper: int = 4096
) -> tuple[int, int | None]:
    """The LRU sizes per replica whose hits over the requests match `measured_hits`: (smallest, largest),
    the largest None when any size up to `upper` does (the runs never made the cache evict). A planner
    takes the smallest: the fewest hits the measurements allow."""

    def smallest(at_least: int) -> int:
        lo, hi = 0, upper
        while lo < hi:
            mid = (lo + hi) // 2
            if lru_hits(observations, mid) >= at_least:
                hi = mid
            else:
                lo = mid + 1
        return lo

    # The counters may count a request the records lack (one that failed): never more than any size gives.
    measured_hits = min(measured_hits, lru_hits(observations, upper))
    low = smallest(measured_hits)
    if lru_hits(observations, upper) <= measured_hits:
        return low, None
    return low, max(low, smallest(measured_hits + 1) - 1)
