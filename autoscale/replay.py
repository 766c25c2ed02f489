"""Replay a rate trace against an autoscaling policy in virtual time: a fleet model for tuning the
settings on a trace (and for the tests), not a measurement.

The fleet: replicas asked for become serving `startup_s` later; a scale-down removes the replica
`victim` picks (a starting one first). Each serving replica sustains `capacity_rps` requests per second
at the SLO; a tick whose rate exceeds the serving replicas' capacity counts as time in violation of the
SLO. A request costs `prompt_tokens` prefill and `output_tokens` decode tokens, so the demand policy sees
token rates; the reactive baseline sees the requests in flight, by Little's law the rate times
`latency_s` (stretched by the overload when the fleet is short). Replica-hours count starting replicas
too (they hold their GPUs). The oracle knows the trace: it has exactly the replicas each moment needs,
started in time, and is the yardstick for cost.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from autoscale.policy import Capacity, Decision, Load, Policy, ReplicaView, victim
from autoscale.traces import Trace


@dataclass(frozen=True, slots=True)
class Fleet:
    capacity_rps: float
    startup_s: float
    prompt_tokens: float = 1000.0
    output_tokens: float = 100.0
    latency_s: float = 2.0

    def capacity(self) -> Capacity:
        """One replica's capacity in tokens, as the demand policy takes it."""
        return Capacity(self.capacity_rps * self.prompt_tokens, self.capacity_rps * self.output_tokens)


@dataclass(slots=True)
class Replay:
    """What a replay saw, one entry per tick."""

    capacity_rps: float
    tick_s: float
    times: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    serving: list[int] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    """Replicas serving or starting (what is paid for)."""
    decisions: list[Decision] = field(default_factory=list)

    @property
    def violation_s(self) -> float:
        """Seconds whose rate the serving replicas could not take at the SLO."""
        short = sum(r > 0 and r > s * self.capacity_rps for r, s in zip(self.rates, self.serving, strict=True))
        return short * self.tick_s

    @property
    def replica_hours(self) -> float:
        return sum(self.held) * self.tick_s / 3600

    def direction_changes_per_hour(self) -> float:
        """How often the fleet turned around (an up after a down, or a down after an up), per hour."""
        moves = [d.direction for d in self.decisions if d.direction != "hold"]
        changes = sum(a != b for a, b in itertools.pairwise(moves))
        hours = (self.times[-1] - self.times[0] + self.tick_s) / 3600 if self.times else 1.0
        return changes / hours


def replay(trace: Trace, policy: Policy, fleet: Fleet, duration_s: float, start: int, tick_s: float = 5.0) -> Replay:
    """Run `policy` every `tick_s` over `duration_s` of `trace`, from `start` serving replicas."""
    out = Replay(fleet.capacity_rps, tick_s)
    replicas = [ReplicaView(f"r{i}", "serving", 0, -fleet.startup_s) for i in range(start)]
    ready_at: dict[str, float] = {r.name: 0.0 for r in replicas}
    made = start
    t = 0.0
    while t < duration_s:
        replicas = [
            ReplicaView(r.name, "serving", r.in_flight, r.started_at)
            if r.state == "starting" and ready_at[r.name] <= t
            else r
            for r in replicas
        ]
        serving = sum(r.state == "serving" for r in replicas)
        rate = trace(t)
        overload = rate / (serving * fleet.capacity_rps) if serving else math.inf
        latency = fleet.latency_s * max(1.0, min(overload, 30.0))
        load = Load(t, rate * fleet.prompt_tokens, rate * fleet.output_tokens, in_flight=rate * latency)
        decision = policy.decide(load, len(replicas))
        out.decisions.append(decision)
        while decision.desired > len(replicas):
            name = f"r{made}"
            made += 1
            replicas.append(ReplicaView(name, "starting", 0, t))
            ready_at[name] = t + fleet.startup_s
        while decision.desired < len(replicas):
            gone = victim(replicas)
            if gone is None:
                break
            replicas.remove(gone)
        out.times.append(t)
        out.rates.append(rate)
        out.serving.append(sum(r.state == "serving" for r in replicas))
        out.held.append(len(replicas))
        t += tick_s
    return out


def oracle(trace: Trace, fleet: Fleet, duration_s: float, tick_s: float = 5.0) -> Replay:
    """The replicas each tick needs, there in time: no violation, the least replica-hours a fleet of
    whole replicas can have (starting ones counted for startup_s before they serve)."""
    out = Replay(fleet.capacity_rps, tick_s)
    ticks = int(duration_s // tick_s)
    need = [math.ceil(trace(i * tick_s) / fleet.capacity_rps - 1e-9) for i in range(ticks)]
    ahead = math.ceil(fleet.startup_s / tick_s)
    for i in range(ticks):
        # What serves now, plus what must already be starting for the next startup_s.
        out.times.append(i * tick_s)
        out.rates.append(trace(i * tick_s))
        out.serving.append(need[i])
        out.held.append(max(need[i : i + ahead + 1]))
    return out
