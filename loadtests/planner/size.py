"""Sizing: the smallest fleet whose simulated run holds an SLO at a peak rate, with failure headroom.

The search assumes that compliance is monotone in the number of replicas N (more replicas never break an
SLO that fewer held). It doubles N from 1 (or gallops from a hint) until a run holds, then bisects between
the last failing and the first holding N, so the answer's N - 1 is always simulated too and seen to fail:
`Sizing.below` is that run. Simulated runs are deterministic (the schedule and the policy's random choices
are seeded), so the same question gets the same answer.

Headroom: the smallest M >= N whose run with one replica lost from the start (M - 1 serving the same load;
the lost one stays on the consistent-hash ring, as an ejected replica does) still holds.
A day's trace is sized window by window in loadtests/planner/trace.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loadtests.planner.scenario import Scenario, prepare
from loadtests.planner.vtime import DEFAULT_POLICY, simulate
from loadtests.slo import Objective
from loadtests.summary import RunSummary
from loadtests.workload import (
    ClosedLoop,
    Constant,
    Gamma,
    Poisson,
    Workload,
    parse_workload,
    with_load,
)
from qvl.settings import PolicyName, RouterSettings
from serving.sim.profile import CapacityProfile

DEFAULT_MAX_REPLICAS = 4096
DEFAULT_SAMPLE_S = 180.0
"""Seconds simulated at a rate when the workload's arrivals give no length of their own (a trace's window)."""
Progress = Callable[[str], None]


class SizingError(ValueError):
    """No fleet up to the limit holds the SLO, or the inputs cannot be sized (a closed loop, a bad curve)."""


@dataclass(frozen=True)
class Trial:
    """One simulated run of the search."""

    replicas: int
    lost: int
    held: bool
    summary: RunSummary
    image_hit_ratio: float | None
    engine_steps: int
    wall_s: float


@dataclass(frozen=True)
class Sizing:
    """The answer for one load: N, N with failure headroom, GPUs, and every run the search made."""

    peak_rate: float
    policy: PolicyName
    replicas: int
    """N: the smallest fleet whose run held every objective."""
    headroom_replicas: int | None
    """M: the smallest fleet that still holds with one replica lost; None when not asked for."""
    tensor_parallel_size: int
    trials: tuple[Trial, ...] = field(repr=False)

    @property
    def gpus(self) -> int:
        return self.replicas * self.tensor_parallel_size

    @property
    def headroom_gpus(self) -> int | None:
        return None if self.headroom_replicas is None else self.headroom_replicas * self.tensor_parallel_size

    def trial(self, replicas: int, lost: int = 0) -> Trial | None:
        """The search's run with that many replicas (and lost), if it made one."""
        return next((t for t in self.trials if t.replicas == replicas and t.lost == lost), None)

    @property
    def at_n(self) -> Trial:
        found = self.trial(self.replicas)
        assert found is not None  # the search ends on a run at N
        return found

    @property
    def below(self) -> Trial | None:
        """The run at N - 1, which failed (None when N is 1)."""
        return self.trial(self.replicas - 1)


def at_rate(workload: Workload, rate: float, duration_s: float | None = None) -> Workload:
    """The workload at `rate` requests/s: constant, Poisson and Gamma arrivals keep their kind (and cv);
    time-varying ones become Poisson at that rate for `duration_s` (default DEFAULT_SAMPLE_S). Raises
    SizingError for a closed loop."""
    arrivals = workload.arrivals
    if isinstance(arrivals, ClosedLoop):
        raise SizingError(f"workload {workload.name}: a closed loop has no rate to size for; use open-loop arrivals")
    if isinstance(arrivals, Constant | Poisson | Gamma):
        return with_load(workload, rate=rate, duration_s=duration_s)
    data = workload.model_dump()
    data["arrivals"] = {"process": "poisson", "rate": rate, "duration_s": duration_s or DEFAULT_SAMPLE_S}
    return parse_workload(data, workload.name)


def size(
    workload: Workload,
    profile: CapacityProfile,
    objectives: Sequence[Objective],
    peak_rate: float,
    *,
    duration_s: float | None = None,
    policy: PolicyName = DEFAULT_POLICY,
    answer_cache: bool = True,
    router: RouterSettings | None = None,
    seed: int = 0,
    headroom: bool = True,
    max_replicas: int = DEFAULT_MAX_REPLICAS,
    progress: Progress | None = None,
) -> Sizing:
    """The smallest N holding every objective at `peak_rate` (see `size_scenario` for the options), on
    the workload's arrivals at that rate (`at_rate`) for `duration_s` (default: the workload's own length)."""
    return size_scenario(
        prepare(at_rate(workload, peak_rate, duration_s), tokens=profile.tokens),
        profile,
        objectives,
        peak_rate,
        policy=policy,
        answer_cache=answer_cache,
        router=router,
        seed=seed,
        headroom=headroom,
        max_replicas=max_replicas,
        progress=progress,
    )


def size_scenario(
    scenario: Scenario,
    profile: CapacityProfile,
    objectives: Sequence[Objective],
    peak_rate: float,
    *,
    policy: PolicyName = DEFAULT_POLICY,
    answer_cache: bool = True,
    router: RouterSettings | None = None,
    seed: int = 0,
    hint: int | None = None,
    headroom: bool = True,
    max_replicas: int = DEFAULT_MAX_REPLICAS,
    progress: Progress | None = None,
) -> Sizing:
    """Size a prepared scenario (`peak_rate` is only reported). `hint`: a guess of N to start from (a
    what-if row starts from the base answer); `headroom`: also find M. Raises SizingError when
    `max_replicas` does not hold."""
    goals = tuple(objectives)
    trials: dict[tuple[int, int], Trial] = {}

    def run(replicas: int, lost: int = 0) -> Trial:
        if (replicas, lost) not in trials:
            trial = trials[replicas, lost] = run_trial(
                scenario,
                profile,
                goals,
                replicas,
                lost,
                policy=policy,
                answer_cache=answer_cache,
                router=router,
                seed=seed,
            )
            if progress is not None:
                lose = f" ({lost} lost)" if lost else ""
                progress(
                    f"{policy}: {replicas} replicas{lose} at {peak_rate:g} req/s: "
                    f"{'held' if trial.held else 'missed'} ({trial.wall_s:.1f} s)"
                )
        return trials[replicas, lost]

    n = search(lambda k: run(k).held, hint, max_replicas)
    m = None
    if headroom:
        # k >= 2: one replica lost must leave one serving.
        m = search(lambda k: k >= max(n, 2) and run(k, 1).held, n + 1, max_replicas + 1)
    ordered = tuple(trials[key] for key in trials)
    return Sizing(peak_rate, policy, n, m, profile.engine.tensor_parallel_size, ordered)


def run_trial(
    scenario: Scenario,
    profile: CapacityProfile,
    objectives: Sequence[Objective],
    replicas: int,
    lost: int = 0,
    *,
    policy: PolicyName = DEFAULT_POLICY,
    answer_cache: bool = True,
    router: RouterSettings | None = None,
    seed: int = 0,
) -> Trial:
    """One simulated run, judged against the objectives."""
    result = simulate(
        scenario, profile, replicas, policy, answer_cache=answer_cache, lost=lost, router=router, seed=seed
    )
    summary = result.summary(tuple(objectives))
    return Trial(
        replicas, lost, bool(summary.slo_held), summary, result.image_hit_ratio, result.engine_steps, result.wall_s
    )


def search(holds: Callable[[int], bool], hint: int | None, limit: int) -> int:
    """The smallest n in 1..limit with holds(n), for a monotone `holds`: gallop (doubling) from `hint` or
    1 to bracket it, then bisect. holds(n - 1) is always evaluated (and false) for the answer n > 1.
    Raises SizingError when holds(limit) is false."""
    start = 1 if hint is None else min(max(hint, 1), limit)
    low, high = 0, None  # holds(low) is false (0 by definition), holds(high) is true
    if holds(start):
        high, step = start, 1
        while high > 1:
            probe = max(high - step, 1)
            if holds(probe):
                high, step = probe, step * 2
            else:
                low = probe
                break
    else:
        low, step = start, 1
        while high is None:
            if low >= limit:
                raise SizingError(f"no fleet of up to {limit} replicas holds the SLO")
            probe = min(low + step if hint is not None else low * 2, limit)
            if holds(probe):
                high = probe
            else:
                low, step = probe, step * 2
    while high - low > 1:
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid
    return high
