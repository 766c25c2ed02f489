"""The autoscaler as a process' parts: /metrics, /status and /health on its port, and the status written
to the registry's Redis in the shape the console reads (router/console/autoscaling.py), with dry-run
starting nothing. The fleet is an in-memory one whose replicas answer nothing (their rates stay unknown);
the decisions here are the bounds' and the silence's."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import redis

from autoscale.fleet import FleetReplica
from autoscale.metrics import AutoscalerMetrics
from autoscale.service import run_autoscaler, status_key
from qvl.procs import free_port
from qvl.settings import load_settings
from router.console.autoscaling import AutoscalerStatus, StatusDoc


class Fleet:
    def __init__(self) -> None:
        self.added = 0
        self.serving = [FleetReplica("r0", "default", "serving", "http://127.0.0.1:9", 0.0)]

    async def replicas(self) -> list[FleetReplica]:
        return list(self.serving)

    async def add(self, pool: str) -> None:
        self.added += 1

    async def remove(self, replica: FleetReplica) -> None:
        raise AssertionError("nothing is removed here")

    def startups(self, pool: str) -> list[float]:
        return []


def test_the_status_is_served_and_written_where_the_console_reads_it(redis_server) -> None:
    port = free_port("127.0.0.1")
    settings = load_settings(
        None,
        {
            "registry": {"url": redis_server.url, "key_prefix": "shop:"},
            "autoscale": {"dry_run": True, "min_replicas": 2, "interval_s": 0.2, "host": "127.0.0.1", "port": port},
        },
    )
    fleet, metrics = Fleet(), AutoscalerMetrics()

    async def scenario() -> tuple[bytes, dict, StatusDoc | None]:
        stop = asyncio.Event()
        running = asyncio.create_task(run_autoscaler(settings, fleet, metrics, stop))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(100):
                await asyncio.sleep(0.1)
                try:
                    status = (await client.get("/status")).json()
                except httpx.HTTPError:
                    continue
                if status["pools"][0]["last"] is not None:
                    break
            page = (await client.get("/metrics")).content
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/nope")).json()["error"]["type"] == "not_found"
        reader = AutoscalerStatus.from_settings(settings.registry)
        assert reader is not None
        doc = await reader.read()
        await reader.close()
        stop.set()
        await running
        return page, status, doc

    page, status, doc = asyncio.run(scenario())
    pool = status["pools"][0]
    # One serving replica under min_replicas 2: up, but dry-run starts nothing.
    assert (pool["last"]["direction"], pool["last"]["reason"], pool["last"]["applied"]) == ("up", "below_min", False)
    assert fleet.added == 0
    assert b'qvl_autoscaler_decisions_total{direction="up",pool="default",reason="below_min"}' in page
    assert b"qvl_autoscaler_dry_run 1.0" in page
    assert doc is not None and doc.dry_run and doc.pools[0].pool == "default"
    stored = redis.Redis.from_url(redis_server.url)
    assert 0 < stored.ttl(status_key(settings)) <= 31
    assert orjson.loads(stored.get(status_key(settings)))["policy"] == "demand"
