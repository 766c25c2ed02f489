"""A day's rate curve sized window by window: the replicas each window's peak needs.

The curve is a workload's own time-varying arrivals (stages, diurnal, spike) or a CSV of `t_s,rate` rows,
rate linear between rows. It is cut into windows (default one hour); each window is sized (without
headroom) on `sample_s` seconds (default 180) of the workload's requests at the window's peak rate
(`at_rate`: Poisson for a time-varying workload, the workload's own kind otherwise), the previous
window's answer serving as the next one's hint and equal peaks sized once.
"""

from __future__ import annotations

import bisect
import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtests.arrivals import rate_at
from loadtests.planner.scenario import prepare
from loadtests.planner.size import (
    DEFAULT_MAX_REPLICAS,
    DEFAULT_SAMPLE_S,
    Progress,
    SizingError,
    at_rate,
    size_scenario,
)
from loadtests.planner.vtime import DEFAULT_POLICY
from loadtests.slo import Objective
from loadtests.workload import Diurnal, Spike, Stages, Workload
from qvl.settings import PolicyName, RouterSettings
from serving.sim.profile import CapacityProfile

DEFAULT_WINDOW_S = 3600.0


@dataclass(frozen=True)
class RateCurve:
    """Requests per second over time: `rate(t)`, its length, and where it may jump (the peak search
    looks there as well as on a fine grid)."""

    rate: Callable[[float], float]
    duration_s: float
    breakpoints: tuple[float, ...] = ()

    def peak(self, start: float, end: float, grid: int = 240) -> float:
        """The highest rate within [start, end)."""
        points = [start + (end - start) * i / grid for i in range(grid)]
        points += [b for b in self.breakpoints if start <= b < end]
        points += [b - 1e-9 for b in self.breakpoints if start < b <= end]
        return max(self.rate(t) for t in points)


def curve_of(workload: Workload) -> RateCurve:
    """The rate curve of a time-varying workload; raises SizingError for stationary arrivals."""
    arrivals = workload.arrivals
    if isinstance(arrivals, Diurnal):
        return RateCurve(lambda t: rate_at(arrivals, t), arrivals.duration_s)
    if isinstance(arrivals, Spike):
        edges = (arrivals.start_s, arrivals.start_s + arrivals.length_s)
        return RateCurve(lambda t: rate_at(arrivals, t), arrivals.duration_s, edges)
    if isinstance(arrivals, Stages):
        bounds: list[float] = []
        for stage in arrivals.stages:
            bounds.append((bounds[-1] if bounds else 0.0) + stage.duration_s)
        return RateCurve(lambda t: rate_at(arrivals, t), bounds[-1], tuple(bounds))
    raise SizingError(f"workload {workload.name}: {arrivals.process} arrivals are not a trace; give --peak-rate")


def load_rate_curve(path: Path) -> RateCurve:
    """A CSV of `t_s,rate` rows (a header line allowed), rate linear between rows; raises SizingError
    naming the file and the row on a bad one."""
    points: list[tuple[float, float]] = []
    try:
        with path.open(newline="") as f:
            for number, row in enumerate(csv.reader(f), start=1):
                if not row or (number == 1 and not _numeric(row[0])):
                    continue
                if len(row) != 2 or not _numeric(row[0]) or not _numeric(row[1]):
                    raise SizingError(f"rate curve {path}: row {number}: expected t_s,rate, got {','.join(row)}")
                t, value = float(row[0]), float(row[1])
                if value < 0 or (points and t <= points[-1][0]):
                    raise SizingError(f"rate curve {path}: row {number}: times must increase and rates be >= 0")
                points.append((t, value))
    except OSError as exc:
        raise SizingError(f"cannot read rate curve {path}: {exc.strerror}") from None
    if len(points) < 2:
        raise SizingError(f"rate curve {path}: needs at least two rows")

    origin = points[0][0]
    times = [t - origin for t, _ in points]
    rates = [r for _, r in points]

    def rate(t: float) -> float:
        i = bisect.bisect_right(times, t)
        if i == 0 or i == len(times):
            return rates[-1] if t == times[-1] else 0.0
        t0, t1, r0, r1 = times[i - 1], times[i], rates[i - 1], rates[i]
        return r0 + (r1 - r0) * (t - t0) / (t1 - t0)

    return RateCurve(rate, times[-1], tuple(times))


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Window:
    """One window of a trace: its peak rate and the replicas that peak needs."""

    start_s: float
    end_s: float
    peak_rate: float
    replicas: int
    gpus: int


@dataclass(frozen=True)
class TraceSizing:
    """Replicas needed window by window over a trace; `replicas` is the most any window needs."""

    windows: tuple[Window, ...]
    window_s: float
    sample_s: float

    @property
    def replicas(self) -> int:
        return max((w.replicas for w in self.windows), default=0)


def size_trace(
    workload: Workload,
    profile: CapacityProfile,
    objectives: Sequence[Objective],
    curve: RateCurve | None = None,
    *,
    window_s: float = DEFAULT_WINDOW_S,
    sample_s: float = DEFAULT_SAMPLE_S,
    policy: PolicyName = DEFAULT_POLICY,
    answer_cache: bool = True,
    router: RouterSettings | None = None,
    seed: int = 0,
    max_replicas: int = DEFAULT_MAX_REPLICAS,
    progress: Progress | None = None,
) -> TraceSizing:
    """Replicas per window of `curve` (default: the workload's own time-varying arrivals), each window
    sized at its peak rate on `sample_s` seconds of the workload's requests (without headroom)."""
    if window_s <= 0 or sample_s <= 0:
        raise SizingError("the window and the sample must be longer than 0 s")
    curve = curve_of(workload) if curve is None else curve
    by_rate: dict[float, int] = {}
    windows, hint, start = [], None, 0.0
    tp = profile.engine.tensor_parallel_size
    while start < curve.duration_s:
        end = min(start + window_s, curve.duration_s)
        peak = curve.peak(start, end)
        if peak <= 0:
            needed = 0
        elif peak in by_rate:
            needed = by_rate[peak]
        else:
            sizing = size_scenario(
                prepare(at_rate(workload, peak, sample_s), tokens=profile.tokens),
                profile,
                objectives,
                peak,
                policy=policy,
                answer_cache=answer_cache,
                router=router,
                seed=seed,
                hint=hint,
                headroom=False,
                max_replicas=max_replicas,
                progress=progress,
            )
            needed = by_rate[peak] = hint = sizing.replicas
        windows.append(Window(start, end, peak, needed, needed * tp))
        start = end
    return TraceSizing(tuple(windows), window_s, sample_s)
