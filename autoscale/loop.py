"""The autoscaler: every interval, each pool's load is observed, its policy decides, the fleet acts.

One `tick()` per `autoscale.interval_s`, for every pool (settings.pools, or the one pool `default` of a
cluster without pools):
1. the pool's replicas from the fleet: starting and serving ones count as its size, draining ones do not;
2. the serving replicas' engines are scraped (autoscale/observe.py) and the routers' batch share read;
3. the capacity estimate learns from replicas at the SLO (autoscale/capacity.py), and the measured
   start-up times lengthen the forecast's horizon;
4. the policy decides (autoscale/policy.py); with no rates yet from any serving replica it holds
   (`no_data`) rather than mistake silence for no demand;
5. unless dry_run, the fleet adds replicas or removes what `victim` picks (a starting one first);
6. every decision is counted with its reason, logged (holds at debug), and kept for the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from autoscale.capacity import CapacityEstimate
from autoscale.fleet import Fleet, FleetError, FleetReplica
from autoscale.metrics import AutoscalerMetrics
from autoscale.observe import ClassWatch, EngineWatch, pool_load
from autoscale.policy import Decision, Load, Policy, ReplicaView, build_policy, victim
from qvl.settings import DEFAULT_POOL, Settings
from qvl.settings.autoscale import PoolBounds

log = logging.getLogger("qvl.autoscale")
Routers = Callable[[], Awaitable[list[str]]]
"""The routers' base URLs, whose /metrics give the batch share."""


@dataclass
class PoolState:
    name: str
    policy: Policy
    capacity: CapacityEstimate
    history: deque[dict[str, Any]]
    last: dict[str, Any] | None = None
    current: Counter[str] | None = None
    load: dict[str, float] | None = None
    needed: float = math.nan
    desired: int = 0
    startup_s: float = 0.0


class Autoscaler:
    def __init__(
        self,
        settings: Settings,
        fleet: Fleet,
        metrics: AutoscalerMetrics,
        client: httpx.AsyncClient,
        routers: Routers,
        clock: Callable[[], float] = time.time,
    ) -> None:
        auto = settings.autoscale
        self.settings = settings
        self._fleet = fleet
        self._metrics = metrics
        self._routers = routers
        self._clock = clock
        self._engines = EngineWatch(client, clock=clock)
        self._classes = ClassWatch(client)
        names = [p.name for p in settings.pools] or [DEFAULT_POOL]
        self.pools: dict[str, PoolState] = {}
        for name in names:
            bounds = auto.bounds(name)
            events = [e for e in auto.schedule if not e.pools or name in e.pools]
            own = auto.model_copy(
                update={"min_replicas": bounds.min_replicas, "max_replicas": bounds.max_replicas, "schedule": events}
            )
            estimate = CapacityEstimate(own)
            self.pools[name] = PoolState(
                name,
                build_policy(own, estimate.capacity),
                estimate,
                deque(maxlen=auto.history),
                startup_s=auto.startup_s,
            )
        metrics.set_dry_run(auto.dry_run)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every interval_s until `stop` is set (a tick that fails is logged; the next one tries again)."""
        interval = self.settings.autoscale.interval_s
        while not stop.is_set():
            began = time.monotonic()
            try:
                await self.tick()
            except (httpx.HTTPError, FleetError, OSError) as exc:
                log.error("autoscaling tick failed: %s", exc)
            with_rest = max(0.0, interval - (time.monotonic() - began))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), with_rest)

    async def tick(self) -> list[Decision]:
        """One look at every pool and one decision each (acted on unless dry_run); returns the decisions."""
        replicas = await self._fleet.replicas()
        serving = [r for r in replicas if r.state == "serving" and r.url]
        rates = await self._engines.scrape([r.url for r in serving])
        share = await self._classes.batch_share(await self._routers())
        at = self._clock()
        decisions = []
        for state in self.pools.values():
            mine = [r for r in replicas if r.pool == state.name]
            decisions.append(await self._decide(state, mine, rates, share, at))
        return decisions

    async def _decide(
        self, state: PoolState, mine: list[FleetReplica], rates: dict[str, Any], share: float, at: float
    ) -> Decision:
        auto = self.settings.autoscale
        counts: Counter[str] = Counter(r.state for r in mine)
        current = counts["starting"] + counts["serving"]
        serving = [r for r in mine if r.state == "serving"]
        seen = {r.url: rates[r.url] for r in serving if r.url in rates}
        startups = self._fleet.startups(state.name)
        state.startup_s = max([auto.startup_s, *startups[-5:]])
        observed = pool_load(at, seen, share, state.startup_s)
        state.capacity.learn(seen.values())
        state.policy.tune(state.capacity.capacity, state.startup_s)
        load = observed.load
        if serving and not seen:
            decision = _bounded_without_data(at, current, auto.bounds(state.name))
        else:
            if seen and len(seen) < len(serving):  # a scrape failed: the others stand for it
                load = _scaled(load, len(serving) / len(seen))
            decision = state.policy.decide(load, current)
        applied = False
        if decision.direction != "hold" and not auto.dry_run:
            busy = {url: round(r.running + r.waiting) for url, r in seen.items()}
            applied = await self._act(state.name, decision, mine, busy)
        self._record(state, decision, counts, load, observed.batch_tokens_s, applied)
        return decision

    async def _act(self, pool: str, decision: Decision, mine: list[FleetReplica], busy: dict[str, int]) -> bool:
        """Add replicas, or remove `victim`'s picks: a starting one first, else the serving one with the
        fewest requests on its engine (`busy`, by URL, from this tick's scrape)."""
        try:
            for _ in range(decision.desired - decision.current):
                await self._fleet.add(pool)
            views = [
                ReplicaView(r.name, r.state, busy.get(r.url, 0), r.asked_at)
                for r in mine
                if r.state in ("starting", "serving")
            ]
            for _ in range(decision.current - decision.desired):
                gone = victim(views)
                if gone is None:
                    break
                views.remove(gone)
                await self._fleet.remove(next(r for r in mine if r.name == gone.name))
        except FleetError as exc:
            log.error("pool %s: could not scale %s to %d: %s", pool, decision.direction, decision.desired, exc)
            return False
        return True

    def _record(
        self, state: PoolState, d: Decision, counts: Counter[str], load: Load, batch: float, applied: bool
    ) -> None:
        auto = self.settings.autoscale
        state.current, state.needed, state.desired = counts, d.needed, d.desired
        state.load = {
            "prefill_tokens_s": load.prefill_tokens_s,
            "decode_tokens_s": load.decode_tokens_s,
            "in_flight": load.in_flight,
            "batch_tokens_s": batch,
        }
        self._metrics.record_decision(state.name, d.direction, d.reason, d.desired, d.needed)
        self._metrics.record_fleet(state.name, dict(counts))
        capacity = state.capacity.capacity
        self._metrics.record_load(
            state.name,
            load.prefill_tokens_s,
            load.decode_tokens_s,
            batch,
            (capacity.prefill_tokens_s, capacity.decode_tokens_s) if capacity else (0.0, 0.0),
            state.startup_s,
        )
        actual = counts["starting"] + counts["serving"]
        state.history.append(
            {
                "at": d.at,
                "desired": d.desired,
                "actual": actual,
                "serving": counts["serving"],
                "needed": _finite(d.needed),
                "prefill_tokens_s": load.prefill_tokens_s,
                "decode_tokens_s": load.decode_tokens_s,
            }
        )
        if d.direction == "hold":
            log.debug("pool %s: hold at %d (%s, needed %.2f)", state.name, d.current, d.reason, d.needed)
            return
        state.last = {
            "at": d.at,
            "direction": d.direction,
            "reason": d.reason,
            "from": d.current,
            "to": d.desired,
            "applied": applied,
        }
        log.info(
            "pool %s: %s %d -> %d (%s; needed %.2f; prefill %.0f, decode %.0f tokens/s)%s",
            state.name,
            d.direction,
            d.current,
            d.desired,
            d.reason,
            d.needed,
            load.prefill_tokens_s,
            load.decode_tokens_s,
            " [dry run: nothing done]" if auto.dry_run else "" if applied else " [not done: see the error above]",
        )
        if auto.dry_run:
            self._metrics.record_action(state.name, "start" if d.direction == "up" else "drain", "dry_run")

    def status(self) -> dict[str, Any]:
        """What /status and the console show (the shape router/console/autoscaling.py reads)."""
        auto = self.settings.autoscale
        pools = []
        for state in self.pools.values():
            counts = state.current or Counter()
            bounds = auto.bounds(state.name)
            pools.append(
                {
                    "pool": state.name,
                    "min": bounds.min_replicas,
                    "max": bounds.max_replicas,
                    "desired": state.desired,
                    "starting": counts["starting"],
                    "serving": counts["serving"],
                    "draining": counts["draining"],
                    "needed": _finite(state.needed),
                    **(
                        state.load
                        or {"prefill_tokens_s": 0.0, "decode_tokens_s": 0.0, "in_flight": 0.0, "batch_tokens_s": 0.0}
                    ),
                    "capacity": state.capacity.describe(),
                    "startup_s": state.startup_s,
                    "last": state.last,
                    "history": list(state.history),
                }
            )
        return {
            "updated_at": self._clock(),
            "interval_s": auto.interval_s,
            "dry_run": auto.dry_run,
            "policy": auto.policy,
            "pools": pools,
        }


def _bounded_without_data(at: float, current: int, bounds: PoolBounds) -> Decision:
    """Without rates the demand is unknown, but the bounds still hold."""
    if current < bounds.min_replicas:
        return Decision(at, current, bounds.min_replicas, "up", "below_min", math.nan)
    if current > bounds.max_replicas:
        return Decision(at, current, bounds.max_replicas, "down", "above_max", math.nan)
    return Decision(at, current, current, "hold", "no_data", math.nan)


def _scaled(load: Load, factor: float) -> Load:
    return Load(
        load.at,
        load.prefill_tokens_s * factor,
        load.decode_tokens_s * factor,
        load.in_flight * factor,
        load.batch_prefill_tokens_s * factor,
        load.batch_decode_tokens_s * factor,
    )


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value
