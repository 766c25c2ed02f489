"""`qvl cluster autoscale`: the autoscaler as a process, on the Ray cluster `qvl cluster up` placed.

It serves GET /metrics (autoscale/metrics.py), /status (the JSON the console shows) and /health on
autoscale.host:port, and writes the same status to Redis (registry.url) under `{key_prefix}autoscale:status`
every interval, with a TTL of three intervals and 30 s, so the routers' console can show it. The routers
whose batch share it reads are the ones announced in the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import uvicorn

from autoscale.fleet import Fleet
from autoscale.loop import Autoscaler
from autoscale.metrics import AutoscalerMetrics
from qvl.redis_client import redis_client
from qvl.redis_errors import REDIS_FAILURES
from qvl.settings import Settings
from router.console.autoscaling import STATUS_KEY
from serving.registry import Registry, RegistryUnavailable

log = logging.getLogger("qvl.autoscale")
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def status_key(settings: Settings) -> str:
    """Where the console reads the status (router/console/autoscaling.py)."""
    return settings.registry.key_prefix + STATUS_KEY


class StatusApp:
    """GET /metrics, /status and /health of a running autoscaler, as a raw ASGI app."""

    def __init__(self, autoscaler: Autoscaler, metrics: AutoscalerMetrics) -> None:
        self._autoscaler = autoscaler
        self._metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/metrics":
            status, body, kind = 200, self._metrics.render(), b"text/plain; version=0.0.4; charset=utf-8"
        elif path == "/status":
            status, body, kind = 200, orjson.dumps(self._autoscaler.status()), b"application/json"
        elif path == "/health":
            status, body, kind = 200, b"", b"text/plain"
        else:
            error = {"error": {"message": f"no such path: {path}", "type": "not_found", "code": "not_found"}}
            status, body, kind = 404, orjson.dumps(error), b"application/json"
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})


async def run_autoscaler(
    settings: Settings, fleet: Fleet, metrics: AutoscalerMetrics, stop: asyncio.Event, *, once: bool = False
) -> Autoscaler:
    """Run until `stop` is set (or one tick with `once`); returns the autoscaler (its last status)."""
    auto, reg = settings.autoscale, settings.registry
    registry = (
        Registry(reg.url, ttl_s=reg.ttl_s, timeout_s=reg.timeout_s, key_prefix=reg.key_prefix) if reg.url else None
    )
    store = (
        redis_client(reg.url, max_connections=2, pool_timeout_s=reg.timeout_s, socket_timeout_s=reg.timeout_s)
        if reg.url
        else None
    )

    async def routers() -> list[str]:
        if registry is None:
            return []
        try:
            return [r.url for r in await registry.routers() if r.url]
        except RegistryUnavailable as exc:
            log.warning("cannot read the routers from the registry: %s", exc)
            return []

    async with httpx.AsyncClient() as client:
        autoscaler = Autoscaler(settings, fleet, metrics, client, routers)
        server = None
        serving: asyncio.Task[None] | None = None
        if auto.port and not once:
            config = uvicorn.Config(
                StatusApp(autoscaler, metrics), host=auto.host, port=auto.port, lifespan="off", log_level="warning"
            )
            server = uvicorn.Server(config)
            serving = asyncio.create_task(server.serve())
        publishing = asyncio.create_task(_publish(autoscaler, store, status_key(settings), stop)) if store else None
        log.info(
            "autoscaling %s every %.0fs (policy %s%s)",
            ", ".join(autoscaler.pools),
            auto.interval_s,
            auto.policy,
            ", dry run: nothing is started or stopped" if auto.dry_run else "",
        )
        try:
            if once:
                await autoscaler.tick()
                await _write(store, status_key(settings), autoscaler, auto.interval_s)
            else:
                await autoscaler.run(stop)
        finally:
            stop.set()
            if publishing is not None:
                await publishing
            if server is not None and serving is not None:
                server.should_exit = True
                await serving
            if registry is not None:
                await registry.close()
            if store is not None:
                with contextlib.suppress(*REDIS_FAILURES):
                    await store.aclose()
    return autoscaler


async def _publish(autoscaler: Autoscaler, store: Any, key: str, stop: asyncio.Event) -> None:
    interval = autoscaler.settings.autoscale.interval_s
    while not stop.is_set():
        await _write(store, key, autoscaler, interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def _write(store: Any, key: str, autoscaler: Autoscaler, interval_s: float) -> None:
    if store is None:
        return
    try:
        await store.set(key, orjson.dumps(autoscaler.status()), ex=int(3 * interval_s + 30))
    except REDIS_FAILURES as exc:
        log.warning("cannot write the autoscaler's status to Redis: %s", exc)


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set `stop` on SIGINT and SIGTERM (drains under way finish before the process ends)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
