"""Request-rate traces to replay the autoscaler against (autoscale/replay.py): each is a function of time
in seconds giving requests per second, pure and seeded, so a replay can be repeated."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

Trace = Callable[[float], float]


def diurnal(low: float, high: float, day_s: float = 86_400.0) -> Trace:
    """A day: `low` at the start (night), `high` at the middle (the afternoon peak), smooth in between."""
    return lambda t: low + (high - low) * 0.5 * (1 - math.cos(2 * math.pi * (t % day_s) / day_s))


def flash_sale(
    base: float, factor: float = 3.0, at_s: float = 1800.0, rise_s: float = 60.0, hold_s: float = 1200.0
) -> Trace:
    """`base` until `at_s`, then up to `factor` times it within `rise_s` (a linear rise), held for `hold_s`,
    then back to `base` within another `rise_s`."""

    def rate(t: float) -> float:
        if t < at_s or t > at_s + 2 * rise_s + hold_s:
            return base
        if t < at_s + rise_s:
            return base * (1 + (factor - 1) * (t - at_s) / rise_s)
        if t <= at_s + rise_s + hold_s:
            return base * factor
        return base * (factor - (factor - 1) * (t - at_s - rise_s - hold_s) / rise_s)

    return rate


def noisy_sine(
    mean: float, amplitude: float, period_s: float, noise: float, seed: int = 0, step_s: float = 5.0
) -> Trace:
    """A sine around `mean` with relative Gaussian noise of `noise`, the noise fixed per `step_s` slot."""

    def rate(t: float) -> float:
        # One draw per slot, from its own seeded generator: the same value whatever order t is asked in.
        slot = int(t // step_s)
        jitter = random.Random(seed * 1_000_003 + slot).gauss(0.0, noise)
        return max(0.0, (mean + amplitude * math.sin(2 * math.pi * t / period_s)) * (1 + jitter))

    return rate
