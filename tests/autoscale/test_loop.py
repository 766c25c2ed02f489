"""The autoscaler's loop against an in-memory fleet and engines answered by httpx.MockTransport (their
/metrics pages built from a token rate): dry-run changes nothing, min and max hold, a starting replica
goes before a serving one, silence is not mistaken for no demand, and batch lines stay out of the
interactive demand. The same loop on Ray, with real replicas and a real router:
tests/autoscale/test_ray_autoscale.py."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field, replace

import httpx
import pytest

from autoscale.fleet import FleetReplica
from autoscale.loop import Autoscaler
from autoscale.metrics import AutoscalerMetrics
from qvl.settings import load_settings

DECODE_PER_REPLICA = 100.0  # tokens/s one replica sustains at the SLO (autoscale.capacity_decode_tokens_s)
ROUTER = "http://router"


@dataclass
class World:
    """The clock, the demand (replicas' worth of decode tokens per second), batch lines, and the fleet."""

    now: float = 1000.0
    demand: float = 1.0
    batch_share: float = 0.0
    replicas: list[FleetReplica] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    _names: itertools.count[int] = field(default_factory=itertools.count)
    tokens: dict[str, float] = field(default_factory=dict)
    """Each engine's token counter."""
    admitted: dict[str, float] = field(default_factory=lambda: {"interactive": 0.0, "batch": 0.0})
    running: dict[str, int] = field(default_factory=dict)
    """Requests each engine reports running, by URL (0 when absent)."""

    def advance(self, dt: float) -> None:
        """Time passes: the serving engines share the demand's tokens, the router admits requests."""
        self.now += dt
        serving = [r for r in self.replicas if r.state == "serving"]
        for r in serving:
            self.tokens[r.url] = self.tokens.get(r.url, 0.0) + self.demand * DECODE_PER_REPLICA * dt / len(serving)
        self.admitted["batch"] += self.batch_share * dt
        self.admitted["interactive"] += (1 - self.batch_share) * dt

    # -- the fleet protocol --
    async def replicas_(self) -> list[FleetReplica]:
        return list(self.replicas)

    async def add(self, pool: str) -> None:
        name = f"r{next(self._names)}"
        self.added.append(name)
        self.replicas.append(FleetReplica(name, pool, "starting", f"http://{name}", self.now))

    async def remove(self, replica: FleetReplica) -> None:
        self.removed.append(replica.name)
        if replica.state == "starting":
            self.replicas = [r for r in self.replicas if r.name != replica.name]
        else:
            self.replicas = [replace(r, state="draining") if r.name == replica.name else r for r in self.replicas]

    def startups(self, pool: str) -> list[float]:
        return []

    def serve(self, count: int) -> None:
        for i in range(count):
            self.replicas.append(FleetReplica(f"r{next(self._names)}", "default", "serving", f"http://s{i}", 0.0))

    # -- what the engines and the router answer --
    def answer(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "router":
            series = 'qvl_admission_decisions_total{{class="{}",decision="admitted"}} {}\n'
            text = "".join(series.format(k, v) for k, v in self.admitted.items())
            return httpx.Response(200, text=text)
        url = str(request.url).removesuffix("/metrics")
        tokens, running = self.tokens.get(url, 0.0), self.running.get(url, 0)
        text = f"vllm:generation_tokens_total {tokens}\nvllm:prompt_tokens_total {tokens}\n"
        text += f"vllm:num_requests_running {running}\n"
        return httpx.Response(200, text=text)


def autoscaler(world: World, **auto: object) -> tuple[Autoscaler, AutoscalerMetrics]:
    settings = load_settings(
        None,
        {
            "autoscale": {
                "capacity_prefill_tokens_s": 1e9,
                "capacity_decode_tokens_s": DECODE_PER_REPLICA,
                "target_utilisation": 1.0,
                "smoothing_s": 1.0,
                "down_window_s": 0.0,
                **auto,
            }
        },
    )
    metrics = AutoscalerMetrics()
    client = httpx.AsyncClient(transport=httpx.MockTransport(world.answer))

    class Fleet:
        replicas = world.replicas_
        add = world.add
        remove = world.remove
        startups = world.startups

    async def routers() -> list[str]:
        return [ROUTER]

    return Autoscaler(settings, Fleet(), metrics, client, routers, clock=lambda: world.now), metrics


def ticks(scaler: Autoscaler, world: World, count: int, every_s: float = 10.0) -> list[str]:
    """Run `count` ticks `every_s` apart; the decisions as 'direction:reason:desired'."""

    async def run() -> list[str]:
        out = []
        for _ in range(count):
            world.advance(every_s)
            (d,) = await scaler.tick()
            out.append(f"{d.direction}:{d.reason}:{d.desired}")
        return out

    return asyncio.run(run())


def sample(metrics: AutoscalerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_silence_is_not_taken_for_no_demand() -> None:
    world = World(demand=0.1)
    world.serve(3)
    scaler, _ = autoscaler(world)
    first, second = ticks(scaler, world, 2)
    assert first == "hold:no_data:3"  # one scrape of each engine gives no rate yet
    assert second.startswith("down:demand_down")


def test_dry_run_decides_and_counts_but_changes_nothing() -> None:
    world = World(demand=3.5)
    world.serve(1)
    scaler, metrics = autoscaler(world, dry_run=True)
    decisions = ticks(scaler, world, 3)
    assert decisions[1] == "up:demand_up:4"
    assert world.added == [] and world.removed == []
    assert sample(metrics, "qvl_autoscaler_decisions_total", pool="default", direction="up", reason="demand_up") >= 1
    assert sample(metrics, "qvl_autoscaler_actions_total", pool="default", action="start", result="dry_run") >= 1
    assert sample(metrics, "qvl_autoscaler_dry_run") == 1
    status = scaler.status()["pools"][0]
    assert (status["last"]["applied"], status["desired"], status["serving"]) == (False, 4, 1)


def test_max_and_min_replicas_hold() -> None:
    world = World(demand=9.0)
    world.serve(1)
    scaler, metrics = autoscaler(world, max_replicas=3, min_replicas=1, cooldown_s=0, down_after_up_s=0)
    decisions = ticks(scaler, world, 3)
    assert decisions[1:] == ["up:demand_up:3", "hold:at_max:3"]
    assert len(world.added) == 2
    assert sample(metrics, "qvl_autoscaler_desired_replicas", pool="default") == 3
    assert sample(metrics, "qvl_autoscaler_actual_replicas", pool="default", state="starting") == 2


def test_min_replicas_holds_with_no_demand_and_is_restored() -> None:
    world = World(demand=0.0)
    world.serve(1)
    scaler, _ = autoscaler(world, min_replicas=2, cooldown_s=0, down_after_up_s=0)
    decisions = ticks(scaler, world, 4)
    assert decisions[0] == "up:below_min:2" and world.removed == []  # no rates yet: the bounds hold anyway
    world.replicas = [replace(r, state="serving") for r in world.replicas]
    assert ticks(scaler, world, 3)[-1] == "hold:in_band:2"
    assert world.removed == []


def test_a_starting_replica_is_removed_before_a_serving_one() -> None:
    world = World(demand=1.8)
    world.serve(2)
    scaler, _ = autoscaler(world, cooldown_s=0, down_after_up_s=0, hysteresis=0.0, forecast_window_s=1.0)
    ticks(scaler, world, 1)
    world.demand = 2.6
    assert ticks(scaler, world, 1) == ["up:demand_up:3"]
    started = world.added[-1]
    world.demand = 1.0
    assert ticks(scaler, world, 1) == ["down:demand_down:1"]
    # Two go: the starting one first, then one of the serving ones, which drains.
    assert world.removed[0] == started and world.removed[1] != started and len(world.removed) == 2
    assert [r.state for r in world.replicas].count("draining") == 1


def test_of_serving_replicas_the_one_with_the_fewest_requests_goes() -> None:
    world = World(demand=3.0)
    world.serve(3)
    world.running = {"http://s0": 4, "http://s1": 1, "http://s2": 3}
    scaler, _ = autoscaler(world, cooldown_s=0, down_after_up_s=0, forecast_window_s=1.0)
    assert ticks(scaler, world, 2)[-1] == "hold:in_band:3"
    world.demand = 1.5
    assert ticks(scaler, world, 1) == ["down:demand_down:2"]
    assert world.removed == ["r1"]  # http://s1, the least busy (all three started together)


def test_batch_lines_are_not_interactive_demand() -> None:
    world = World(demand=3.0, batch_share=0.5)
    world.serve(1)
    scaler, metrics = autoscaler(world)
    decisions = ticks(scaler, world, 3)
    # Half the tokens are batch lines': 1.5 replicas' worth of interactive demand, none of the batch's.
    assert decisions[1:] == ["up:demand_up:2", "hold:in_band:2"]
    assert sample(metrics, "qvl_autoscaler_demand_tokens_per_second", pool="default", kind="batch") == pytest.approx(
        3.0 * DECODE_PER_REPLICA, rel=0.01
    )
