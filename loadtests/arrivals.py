"""Arrival processes: the intended send times of an open-loop schedule.

Each process draws from the `random.Random` it is given, so a schedule's times depend on its seed
alone. Time-varying rates (stages, ramps, diurnal, spike) are non-homogeneous Poisson processes,
drawn by thinning: candidates at the peak rate, each kept with probability rate(t) / peak.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from loadtests.workload import Arrivals, ClosedLoop, Constant, Diurnal, Gamma, Poisson, Spike, Stages


def send_times(arrivals: Arrivals, rng: random.Random) -> list[float] | None:
    """Intended send times in seconds from the start, ascending; None for a closed loop (no times)."""
    if isinstance(arrivals, ClosedLoop):
        return None
    if isinstance(arrivals, Constant):
        gap = 1.0 / arrivals.rate
        return [i * gap for i in range(math.ceil(arrivals.duration_s * arrivals.rate - 1e-9))]
    if isinstance(arrivals, Poisson):
        return _renewal(lambda: rng.expovariate(arrivals.rate), arrivals.duration_s)
    if isinstance(arrivals, Gamma):
        # Gamma gaps with mean 1/rate and cv: shape k = 1/cv^2, scale = 1/(rate k).
        shape = 1.0 / arrivals.cv**2
        scale = 1.0 / (arrivals.rate * shape)
        return _renewal(lambda: rng.gammavariate(shape, scale), arrivals.duration_s)
    until = sum(s.duration_s for s in arrivals.stages) if isinstance(arrivals, Stages) else arrivals.duration_s
    return thinned(lambda t: rate_at(arrivals, t), max_rate(arrivals), until, rng)


def rate_at(arrivals: Stages | Diurnal | Spike, t: float) -> float:
    """The intended rate (requests/s) at time `t` of a time-varying process."""
    if isinstance(arrivals, Diurnal):
        return arrivals.mean_rate * (1.0 + arrivals.amplitude * math.sin(2 * math.pi * t / arrivals.period_s))
    if isinstance(arrivals, Spike):
        inside = arrivals.start_s <= t < arrivals.start_s + arrivals.length_s
        return arrivals.base_rate * (arrivals.multiplier if inside else 1.0)
    began = 0.0
    for stage in arrivals.stages:
        if t < began + stage.duration_s:
            end = stage.rate if stage.to_rate is None else stage.to_rate
            return stage.rate + (end - stage.rate) * (t - began) / stage.duration_s
        began += stage.duration_s
    return 0.0


def max_rate(arrivals: Stages | Diurnal | Spike) -> float:
    """The highest rate the process reaches (the thinning envelope)."""
    if isinstance(arrivals, Diurnal):
        return arrivals.mean_rate * (1.0 + arrivals.amplitude)
    if isinstance(arrivals, Spike):
        return arrivals.base_rate * arrivals.multiplier
    return max(max(s.rate, s.to_rate or 0.0) for s in arrivals.stages)


def duration_s(arrivals: Arrivals) -> float | None:
    """Length of an open-loop schedule in seconds; None for a closed loop."""
    if isinstance(arrivals, ClosedLoop):
        return None
    if isinstance(arrivals, Stages):
        return sum(s.duration_s for s in arrivals.stages)
    return arrivals.duration_s


def expected_count(arrivals: Arrivals) -> float:
    """Expected number of requests in the schedule (exact for a closed loop and a constant rate)."""
    if isinstance(arrivals, ClosedLoop):
        return float(arrivals.requests)
    if isinstance(arrivals, Constant | Poisson | Gamma):
        return arrivals.rate * arrivals.duration_s
    if isinstance(arrivals, Stages):
        return sum(s.duration_s * (s.rate + (s.rate if s.to_rate is None else s.to_rate)) / 2 for s in arrivals.stages)
    if isinstance(arrivals, Spike):
        inside = max(0.0, min(arrivals.length_s, arrivals.duration_s - arrivals.start_s))
        return arrivals.base_rate * (arrivals.duration_s + (arrivals.multiplier - 1) * inside)
    # Diurnal: the integral of mean * (1 + a sin(2 pi t / P)) over [0, D].
    d, p = arrivals.duration_s, arrivals.period_s
    swing = arrivals.amplitude * p / (2 * math.pi) * (1 - math.cos(2 * math.pi * d / p))
    return arrivals.mean_rate * (d + swing)


def _renewal(gap: Callable[[], float], until: float) -> list[float]:
    times: list[float] = []
    # The first request goes at t = 0 so that a schedule starts when the run starts.
    t = 0.0
    while t < until:
        times.append(t)
        t += gap()
    return times


def thinned(rate: Callable[[float], float], peak: float, until: float, rng: random.Random) -> list[float]:
    """Poisson send times in [0, until) at `rate(t)` (never above `peak`), by thinning."""
    times: list[float] = []
    if peak <= 0:
        return times
    t = rng.expovariate(peak)
    while t < until:
        if rng.random() * peak < rate(t):
            times.append(t)
        t += rng.expovariate(peak)
    return times
