"""Replay a rate trace against the real autoscaler, the real router and simulated replicas on a local Ray
cluster, in compressed time: the check of what autoscale/replay.py's fleet model predicts.

Everything is real except the engines: a local Ray head, `qvl cluster` replicas of the simulated engine
(`qvl sim`, with `sim.startup_delay_s` as the cold start) announced in a Redis registry, one `qvl router`
that finds them there, and the autoscaler's own loop (autoscale/loop.py) acting through `RayFleet`. An
open-loop sender draws Poisson arrivals at the trace's rate and streams each request through the router.

Compression: a trace second lasts 1/speed seconds. The trace is read at t * speed, and every duration the
autoscaler or the fleet knows (interval, start-up, cool-downs, forecast window, the reactive delays, the
replicas' cold start) is divided by `speed`; request rates and the engines' speed are not, so what a
replica sustains stays real. Reported times are trace times. Scheduled events (autoscale.schedule) name
wall-clock times, which a compressed replay does not have: they are left out here (the virtual replay,
autoscale/replay.py, takes them with trace seconds as epoch seconds).

A window of one autoscaler interval is in violation of the SLO when a request sent in it failed, or the
95th percentile of their times to first token exceeds autoscale.slo_ttft_s.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from autoscale.fleet import RayFleet
from autoscale.loop import Autoscaler
from autoscale.metrics import AutoscalerMetrics
from autoscale.traces import Trace
from loadtests.arrivals import thinned
from qvl.procs import Child, free_port, spawn
from qvl.settings import Settings
from serving.ray import cluster as ray_cluster
from serving.ray import local as ray_local

log = logging.getLogger("qvl.autoscale.live")
Say = Callable[[str], None]
PROMPT = "Describe this product in one sentence."


@dataclass(slots=True)
class Sent:
    """One request: when it was meant to go (trace seconds), its outcome and timings (real seconds)."""

    at: float
    status: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    error: str = ""

    @property
    def failed(self) -> bool:
        return self.status != 200 or bool(self.error)


@dataclass(slots=True)
class LiveRun:
    """What a live replay saw: every request, and the fleet and decision after every autoscaler tick."""

    speed: float
    tick_s: float
    """One autoscaler interval, in trace seconds."""
    slo_ttft_s: float
    sent: list[Sent] = field(default_factory=list)
    ticks: list[dict[str, Any]] = field(default_factory=list)

    def windows(self) -> list[bool]:
        """Per tick window, whether it violated the SLO (see the module's docstring)."""
        out = []
        for tick in self.ticks:
            inside = [s for s in self.sent if tick["at"] - self.tick_s <= s.at < tick["at"]]
            ttfts = sorted(s.ttft_s for s in inside if s.ttft_s is not None)
            p95 = ttfts[min(len(ttfts) - 1, math.ceil(0.95 * len(ttfts)) - 1)] if ttfts else 0.0
            out.append(any(s.failed for s in inside) or p95 > self.slo_ttft_s)
        return out

    def summary(self) -> dict[str, Any]:
        moves = [t["direction"] for t in self.ticks if t["direction"] != "hold" and t["applied"]]
        turns = sum(a != b for a, b in itertools.pairwise(moves))
        hours = len(self.ticks) * self.tick_s / 3600 or 1.0
        return {
            "requests": len(self.sent),
            "failed": sum(s.failed for s in self.sent),
            "errors": sorted({s.error or str(s.status) for s in self.sent if s.failed}),
            "violation_min": sum(self.windows()) * self.tick_s / 60,
            "replica_hours": sum(t["held"] for t in self.ticks) * self.tick_s / 3600,
            "ups": moves.count("up"),
            "downs": moves.count("down"),
            "direction_changes_per_hour": turns / hours,
            "max_serving": max((t["serving"] for t in self.ticks), default=0),
        }

    def dump(self, folder: Path) -> None:
        """requests.jsonl and ticks.jsonl (raw records, trace seconds) and summary.json under `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "requests.jsonl").write_text("".join(json.dumps(asdict(s)) + "\n" for s in self.sent))
        (folder / "ticks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in self.ticks))
        (folder / "summary.json").write_text(json.dumps(self.summary(), indent=2) + "\n")


def compressed(settings: Settings, speed: float, cold_start_s: float) -> Settings:
    """`settings` with every duration the autoscaler and the fleet know divided by `speed`, and the
    simulated replicas' cold start set to `cold_start_s` trace seconds."""
    a = settings.autoscale
    auto = a.model_copy(
        update={
            name: getattr(a, name) / speed
            for name in (
                "interval_s",
                "startup_s",
                "cooldown_s",
                "down_after_up_s",
                "forecast_window_s",
                "smoothing_s",
                "down_window_s",
                "reactive_up_delay_s",
                "reactive_down_delay_s",
            )
        }
    )
    auto = auto.model_copy(update={"schedule": []})
    sim = settings.sim.model_copy(update={"startup_delay_s": cold_start_s / speed})
    return settings.model_copy(update={"autoscale": auto, "sim": sim})


def run_live(
    settings: Settings,
    trace: Trace,
    duration_s: float,
    *,
    speed: float,
    cold_start_s: float,
    start: int,
    run_dir: Path,
    say: Say,
    max_tokens: int = 32,
    seed: int = 0,
) -> LiveRun:
    """Replay `duration_s` trace seconds of `trace` from `start` serving replicas (see the module's
    docstring); settings name the registry (registry.url) and the simulated replicas (sim.*)."""
    fast = compressed(settings, speed, cold_start_s)
    conf = fast.cluster.model_copy(
        update={
            "engine": "sim",
            "address": "local",
            "run_dir": str(run_dir / "ray"),
            "replicas": start,
            "gpus_per_replica": 0,
            "cpus_per_replica": 0.1,
            "local_cpus": max(fast.cluster.local_cpus, 16),
        }
    )
    fast = fast.model_copy(update={"cluster": conf, "pools": []})
    target = ray_cluster.connect(conf, start_local=True, say=say)
    router: Child | None = None
    try:
        say(f"starting {start} replica(s) (cold start {cold_start_s / speed:.1f} s)")
        ray_cluster.up(fast, say)
        router = _router(fast, run_dir)
        say(f"router at {router.url}; replaying {duration_s:.0f} trace seconds at {speed:g}x")
        return asyncio.run(_drive(fast, trace, duration_s, speed, router.url, max_tokens, seed, say))
    finally:
        if router is not None:
            router.stop(grace_s=5)
        ray_cluster.down(conf, target, say)
        import ray

        ray.shutdown()
        if target.local_head is not None:
            ray_local.stop_head(target.local_head)
            ray_local.forget(conf)


def _router(settings: Settings, run_dir: Path) -> Child:
    port = free_port("127.0.0.1")
    env = {
        **os.environ,
        "QVL_REGISTRY__URL": settings.registry.url,
        "QVL_REGISTRY__TTL_S": str(settings.registry.ttl_s),
        "QVL_REGISTRY__POLL_INTERVAL_S": str(settings.registry.poll_interval_s),
        "QVL_REGISTRY__KEY_PREFIX": settings.registry.key_prefix,
        "QVL_ROUTER__HEALTH__INTERVAL_S": "0.5",
        # A replay on loopback, its own router: no keys to hand out.
        "QVL_ROUTER__AUTH__ENABLED": "false",
    }
    argv = [sys.executable, "-m", "qvl", "router", "--host", "127.0.0.1", "--port", str(port)]
    child = spawn("router", argv, url=f"http://127.0.0.1:{port}", log=run_dir / "router.log", env=env)
    child.wait_ready(60, "/ready")
    return child


async def _drive(
    settings: Settings, trace: Trace, duration_s: float, speed: float, router: str, max_tokens: int, seed: int, say: Say
) -> LiveRun:
    auto = settings.autoscale
    run = LiveRun(speed, auto.interval_s * speed, auto.slo_ttft_s)
    metrics = AutoscalerMetrics()
    fleet = RayFleet(settings, metrics)
    peak = max(trace(t) for t in _grid(duration_s))
    times = thinned(lambda t: trace(t * speed), peak, duration_s / speed, random.Random(seed))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client, httpx.AsyncClient() as scraper:

        async def routers() -> list[str]:
            return [router]

        autoscaler = Autoscaler(settings, fleet, metrics, scraper, routers)
        began = time.monotonic()
        sender = asyncio.create_task(
            _send_all(client, router, settings.sim.model, times, began, speed, max_tokens, run)
        )
        next_tick = began
        while time.monotonic() - began < duration_s / speed:
            decisions = await autoscaler.tick()
            replicas = await fleet.replicas()
            d = decisions[0]
            held = sum(r.state in ("starting", "serving") for r in replicas)
            tick = {
                "at": (time.monotonic() - began) * speed,
                "rate": trace((time.monotonic() - began) * speed),
                "direction": d.direction,
                "reason": d.reason,
                "applied": not auto.dry_run,
                "desired": d.desired,
                "needed": None if math.isnan(d.needed) else d.needed,
                "held": held,
                "serving": sum(r.state == "serving" for r in replicas),
                "draining": sum(r.state == "draining" for r in replicas),
            }
            run.ticks.append(tick)
            if d.direction != "hold":
                say(f"t={tick['at']:.0f}s: {d.direction} {d.current} -> {d.desired} ({d.reason})")
            next_tick += auto.interval_s
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        await sender
        await fleet.close()
    return run


async def _send_all(
    client: httpx.AsyncClient,
    router: str,
    model: str,
    times: list[float],
    began: float,
    speed: float,
    max_tokens: int,
    run: LiveRun,
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.7,
    }
    tasks = []
    for offset in times:
        await asyncio.sleep(max(0.0, began + offset - time.monotonic()))
        sent = Sent(offset * speed)
        run.sent.append(sent)
        tasks.append(asyncio.create_task(_one(client, router, body, sent)))
    await asyncio.gather(*tasks)


async def _one(client: httpx.AsyncClient, router: str, body: dict[str, Any], sent: Sent) -> None:
    began = time.monotonic()
    try:
        async with client.stream("POST", router + "/v1/chat/completions", json=body) as answer:
            sent.status = answer.status_code
            async for line in answer.aiter_lines():
                if line.startswith("data:") and sent.ttft_s is None:
                    sent.ttft_s = time.monotonic() - began
                if line.startswith("data:") and '"error"' in line:
                    sent.error = "stream_error"
    except httpx.HTTPError as exc:
        sent.error = type(exc).__name__
    sent.e2e_s = time.monotonic() - began


def _grid(duration_s: float, points: int = 2000) -> list[float]:
    return [duration_s * i / points for i in range(points + 1)]
