"""The operations page's data: replicas from the pool, GPUs from the exporters, the router's last minute.

`Live.run()` samples every `refresh_s` (the router's metrics registry, the replicas' media-cache counters,
each GPU exporter); `Live.snapshot()` is what GET /console/api/operations answers. A source that has not
answered for `stale_after_s` is marked stale, with its last readings kept beside the mark.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from prometheus_client.registry import Collector

from qvl.settings import ConsoleSettings
from router.console.gpus import GpuExporter, GpuExporters
from router.console.window import Window, sample_registry
from router.replicas import Replica
from router.upstream import UpstreamClient

log = logging.getLogger("qvl.router.console")


class Live:
    """Samples the console's sources in the background and composes the operations snapshot."""

    def __init__(
        self,
        settings: ConsoleSettings,
        registry: Collector,
        replicas: Callable[[], Iterable[Replica]],
        client: UpstreamClient,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._replicas = replicas
        self.window = Window(settings.window_s)
        self.gpus = GpuExporters(settings.gpu_exporters, client, timeout_s=min(2.0, settings.stale_after_s / 2))
        self._started = time.time()

    def sample(self) -> None:
        """One sample of the router's counters and the replicas' media-cache counters into the window."""
        sample = sample_registry(self._registry)
        for r in self._replicas():
            if r.engine.mm_cache_queries is not None:
                sample["mm_queries:" + r.name] = r.engine.mm_cache_queries
                sample["mm_hits:" + r.name] = r.engine.mm_cache_hits or 0.0
        self.window.add(time.monotonic(), sample)

    async def run(self) -> None:
        """Sample and scrape every refresh_s until cancelled."""
        while True:
            started = time.monotonic()
            try:
                self.sample()
                await self.gpus.scrape()
            except Exception:
                # A bug in one round must not freeze the page for good; it is logged loudly.
                log.exception("console sampling failed")
            await asyncio.sleep(max(0.0, self._settings.refresh_s - (time.monotonic() - started)))

    def snapshot(self, now: float | None = None) -> dict[str, object]:
        """The operations page's JSON: router, replicas, GPU exporters and GPUs, with staleness marked."""
        now = time.time() if now is None else now
        stale_after = self._settings.stale_after_s
        return {
            "generated_at": round(now, 3),
            "refresh_s": self._settings.refresh_s,
            "stale_after_s": stale_after,
            "router": self.window.stats().to_json(),
            "replicas": [self._replica(r, now, stale_after) for r in self._replicas()],
            "exporters": [self._exporter(e, now, stale_after) for e in self.gpus.exporters],
            "gpus": [
                {**gpu, "exporter": e.name, "stale": self._age(e.last_answer, now) > stale_after}
                for e in self.gpus.exporters
                for gpu in e.gpus
            ],
        }

    def _age(self, last: float, now: float) -> float:
        """Seconds since a source last answered (since the console started, if it never did)."""
        return max(0.0, now - (last or self._started))

    def _replica(self, r: Replica, now: float, stale_after: float) -> dict[str, object]:
        age = self._age(r.last_answer, now)
        queries, hits = r.engine.mm_cache_queries, r.engine.mm_cache_hits
        return {
            "name": r.name,
            "url": r.url,
            "models": sorted(r.models),
            "state": replica_state(r),
            "healthy": r.healthy,
            "in_flight": r.in_flight,
            "engine_running": r.engine.running,
            "engine_waiting": r.engine.waiting,
            "kv_cache_usage": r.engine.kv_cache_usage,
            # Over the window (None without image lookups in it), and since the engine started.
            "image_cache_hit_ratio": self.window.ratio("mm_hits:" + r.name, "mm_queries:" + r.name),
            "image_cache_hit_ratio_total": (hits or 0.0) / queries if queries else None,
            "last_error": r.last_error,
            "age_s": round(age, 1),
            "stale": age > stale_after,
        }

    def _exporter(self, e: GpuExporter, now: float, stale_after: float) -> dict[str, object]:
        age = self._age(e.last_answer, now)
        return {
            "name": e.name,
            "url": e.url,
            "nvml_up": e.nvml_up,
            "gpus": len(e.gpus),
            "last_error": e.last_error,
            "age_s": round(age, 1),
            "stale": age > stale_after,
        }


def replica_state(r: Replica) -> str:
    """healthy; failing (healthy, but its last check failed); ejected; or starting (never answered)."""
    if r.healthy:
        return "failing" if r.failures else "healthy"
    return "ejected" if r.last_answer else "starting"
