"""The replicas the autoscaler sizes, behind one small async protocol, and its implementation on Ray.

`Fleet` has four methods: `replicas()` (every replica with its pool and state), `add(pool)` (one more
replica, started in the background: it shows as `starting` until it serves), `startups(pool)` (how long
the ones it started took to serve) and `remove(replica)` (a starting one is stopped at once; a serving
one leaves the registry, drains its requests in flight and is stopped, in the background, showing as
`draining` meanwhile). `RayFleet` places replicas as `qvl cluster up` does (serving/ray/cluster.py); its
Ray calls block, so each runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ray.exceptions import RayError

from autoscale.metrics import AutoscalerMetrics
from qvl.settings import DEFAULT_POOL, PoolSettings, Settings
from serving.ray import cluster

log = logging.getLogger("qvl.autoscale.fleet")
FleetState = Literal["starting", "serving", "draining"]


class FleetError(RuntimeError):
    """A replica could not be placed, started or stopped; the message says which and why."""


@dataclass(frozen=True, slots=True)
class FleetReplica:
    name: str
    pool: str
    state: FleetState
    url: str
    asked_at: float
    """When it was asked for (time.time()); for a replica this fleet did not start, when it started."""


class Fleet(Protocol):
    async def replicas(self) -> list[FleetReplica]: ...

    async def add(self, pool: str) -> None: ...

    async def remove(self, replica: FleetReplica) -> None: ...

    def startups(self, pool: str) -> list[float]:
        """Seconds from asking to serving of the replicas this fleet started, oldest first."""
        ...


# The supervisor's states (serving/ray/supervisor.py) as the autoscaler counts them. A replica that is
# restarting serves nothing but holds its GPUs: it is removed first, like a starting one.
_STATES: dict[str, FleetState] = {
    "starting": "starting",
    "restarting": "starting",
    "unhealthy": "starting",
    "healthy": "serving",
    "draining": "draining",
}


class RayFleet:
    """Pools' replicas on the Ray cluster `ray.init` connected this process to (serving/ray/cluster.py)."""

    def __init__(self, settings: Settings, metrics: AutoscalerMetrics, settle_s: float | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._pools: dict[str, PoolSettings | None] = {p.name: p for p in settings.pools} or {DEFAULT_POOL: None}
        # Routers read the registry every poll_interval_s: after twice that (and a second), none sends more.
        self._settle_s = settle_s if settle_s is not None else 2 * settings.registry.poll_interval_s + 1.0
        self._placing: dict[str, float] = {}
        """Replicas asked for whose placement group is not placed yet: a key per request, when asked."""
        self._asked: dict[str, float] = {}
        self._starting: set[str] = set()
        self._draining: dict[str, asyncio.Task[None]] = {}
        self._startups: dict[str, list[float]] = defaultdict(list)
        self._tasks: set[asyncio.Task[None]] = set()
        self._launched: dict[str, str] = {}
        """Placing key -> the replica's name, once placed (for a removal asked while it was placing)."""
        self._failed: set[str] = set()
        self._placed: dict[str, asyncio.Event] = {}
        self._reserved: set[int] = set()
        self._indexing = asyncio.Lock()

    async def replicas(self) -> list[FleetReplica]:
        infos: list[dict[str, Any]] = await asyncio.to_thread(cluster.replica_infos, self._settings.cluster)
        now = time.time()
        out = []
        for info in infos:
            name = str(info["replica"])
            state = _STATES.get(str(info["state"]))
            if name in self._draining:
                state = "draining"
            if state is None:  # failed or stopped: it serves nothing and will not; stop it
                if name not in self._failed:
                    self._failed.add(name)
                    self._spawn(self._stop_failed(name, str(info["state"])))
                continue
            pool = str(info.get("pool") or DEFAULT_POOL)
            asked = self._asked.get(name, float(info.get("started_at") or now))
            if state == "serving" and name in self._starting:
                self._starting.discard(name)
                self._startups[pool].append(now - asked)
            out.append(FleetReplica(name, pool, state, str(info["url"]), asked))
        for key, asked in self._placing.items():
            pool = key.partition("#")[0]
            out.append(FleetReplica(key, pool, "starting", "", asked))
        return out

    async def add(self, pool: str) -> None:
        if pool not in self._pools:
            raise FleetError(f"no pool {pool!r}: pools are {', '.join(sorted(self._pools))}")
        key = f"{pool}#{len(self._placing)}#{time.monotonic()}"
        self._placing[key] = time.time()
        self._placed[key] = asyncio.Event()
        self._spawn(self._launch(pool, key))

    async def _launch(self, pool: str, key: str) -> None:
        # Indexes are handed out one at a time on the event loop, and held until placed: two launches
        # in worker threads must never pick the same free index.
        async with self._indexing:
            taken = {int(n.rpartition("-replica-")[2]) for n in self._asked} | self._reserved
            index = await asyncio.to_thread(cluster.free_index, self._settings.cluster, taken)
            self._reserved.add(index)
        try:
            name, ref = await asyncio.to_thread(cluster.launch, self._settings, self._pools[pool], index, log.info)
        except (cluster.ClusterError, RayError) as exc:
            log.error("could not start a replica of pool %s: %s", pool, exc)
            self._metrics.record_action(pool, "start", "failed")
            return
        finally:
            asked = self._placing.pop(key, time.time())
            self._placed.pop(key).set()
            self._reserved.discard(index)
        self._asked[name] = asked
        self._starting.add(name)
        self._launched[key] = name
        try:
            await ref
        except RayError as exc:
            if name in self._starting:  # not removed on purpose meanwhile
                log.error("replica %s of pool %s did not start: %s", name, pool, cluster.cause(exc))
                self._metrics.record_action(pool, "start", "failed")
            return
        self._metrics.record_action(pool, "start", "ok")

    async def remove(self, replica: FleetReplica) -> None:
        if replica.state == "draining":
            return
        if replica.name in self._placing:
            # Not placed yet: its launch cannot be taken back midway, so it is removed once it exists.
            self._spawn(self._remove_when_placed(replica))
            return
        if replica.state == "starting":
            self._starting.discard(replica.name)
            self._spawn(self._stop(replica, drain=False))
            return
        self._draining[replica.name] = self._spawn(self._stop(replica, drain=True))

    async def _remove_when_placed(self, replica: FleetReplica) -> None:
        placed = self._placed.get(replica.name)
        if placed is not None:
            await placed.wait()
        name = self._launched.pop(replica.name, None)
        if name is not None:
            self._starting.discard(name)
            await self._stop(FleetReplica(name, replica.pool, "starting", "", replica.asked_at), drain=False)

    async def _stop(self, replica: FleetReplica, *, drain: bool) -> None:
        conf, auto = self._settings.cluster, self._settings.autoscale
        action = "drain" if drain else "stop_starting"
        try:
            report = await asyncio.to_thread(
                cluster.remove, conf, replica.name, drain=drain, settle_s=self._settle_s, timeout_s=auto.drain_timeout_s
            )
        except RayError as exc:
            log.error("could not stop %s: %s", replica.name, exc)
            self._metrics.record_action(replica.pool, action, "failed")
            return
        finally:
            self._draining.pop(replica.name, None)
            self._asked.pop(replica.name, None)
        result = "ok" if not drain or report.get("drained") else "timeout"
        log.info("%s %s: %s %s", action, replica.name, result, report or "")
        self._metrics.record_action(replica.pool, action, result)

    async def _stop_failed(self, name: str, state: str) -> None:
        log.warning("replica %s is %s; stopping it", name, state)
        try:
            await asyncio.to_thread(cluster.remove, self._settings.cluster, name, drain=False, settle_s=0, timeout_s=1)
        finally:
            self._failed.discard(name)

    def startups(self, pool: str) -> list[float]:
        return list(self._startups[pool])

    def _spawn(self, work: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Wait for the drains and starts under way (a drain is never cut short)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
