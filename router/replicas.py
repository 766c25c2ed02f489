"""Replica state and the pool that keeps it fresh: active health checks, queue-depth scrapes, ejection.

A replica starts ejected and is admitted once a health check passes and its models are known.
Members are the static list (router.replicas) plus, in cluster mode, what the registry lists: `sync`
adds and drops registry members; static ones stay whatever the registry says.
It is ejected after `eject_after_failures` consecutive failures, counting failed checks and the
proxy's connection errors alike, and re-admitted after `readmit_after_successes` passed checks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

from qvl.engine_metrics import engine_series
from qvl.periodic import every
from qvl.settings import RouterSettings
from router.upstream import ConnectFailed, ConnectionLost, Origin, UpstreamClient

log = logging.getLogger("qvl.router.replicas")


@dataclass(frozen=True, slots=True)
class EngineGauges:
    """What a replica's /metrics page says about its engine, summed over label sets. None: not on the page."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float | None = None
    """vllm:kv_cache_usage_perc (0..1; the fullest engine where several report)."""
    mm_cache_queries: float | None = None
    """vllm:mm_cache_queries_total: images (and other media items) looked up in the engine's media cache."""
    mm_cache_hits: float | None = None


@dataclass(eq=False, slots=True)
class Replica:
    """One engine replica as the router sees it. `in_flight` counts requests this router has open on it."""

    url: str
    name: str
    models: frozenset[str] = frozenset()
    """Every name the replica serves: public ones and, for a pooled replica, `MODEL@VERSION`."""
    versions: dict[str, str] = field(default_factory=dict)
    """Public model -> the version this replica serves of it (from its `MODEL@VERSION` names)."""
    healthy: bool = False
    in_flight: int = 0
    batch_in_flight: int = 0
    """Of `in_flight`, batch lines (router/batch/)."""
    interactive_sent: float = 0.0
    """time.monotonic() when this router last sent the replica a request other than a batch line."""
    waiting: float = 0.0
    running: float = 0.0
    failures: int = 0
    successes: int = 0
    last_error: str | None = None
    last_check: float = 0.0
    last_answer: float = 0.0
    """time.time() of the replica's last passed health check or metrics scrape (0: never)."""
    engine: EngineGauges = EngineGauges()
    slots: int = 0
    """The most requests the engine was seen running while others waited (0: never seen full): how many it
    runs at once, learned from its own gauges (max_num_seqs, or what its KV cache holds)."""
    origin: Origin = field(init=False)

    def __post_init__(self) -> None:
        self.origin = Origin(self.url)

    @property
    def load(self) -> float:
        """What least-loaded compares: requests in flight from this router plus the engine's queue."""
        return self.in_flight + self.waiting

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "models": sorted(m for m in self.models if "@" not in m),
            "versions": dict(sorted(self.versions.items())),
            "healthy": self.healthy,
            "in_flight": self.in_flight,
            "engine_running": self.running,
            "engine_waiting": self.waiting,
            "consecutive_failures": self.failures,
            "last_error": self.last_error,
            "last_check_unix": round(self.last_check, 3) if self.last_check else None,
        }


def replica_name(url: str) -> str:
    """host:port of a replica URL: short, stable, and safe as a metric label."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


_ENGINE_SERIES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv",
    "vllm:mm_cache_queries": "mm_q",
    "vllm:mm_cache_hits": "mm_h",
}


def parse_engine_metrics(text: str) -> EngineGauges:
    """The engine's queue, KV-cache and media-cache series from a vLLM (or `qvl sim`) Prometheus text page."""
    series = engine_series(text, _ENGINE_SERIES, take_max=("vllm:kv_cache_usage_perc",))
    found = {_ENGINE_SERIES[name]: value for name, value in series.items()}
    return EngineGauges(
        running=found.get("running", 0.0),
        waiting=found.get("waiting", 0.0),
        kv_cache_usage=found.get("kv"),
        mm_cache_queries=found.get("mm_q"),
        mm_cache_hits=found.get("mm_h"),
    )


def versions_of(models: frozenset[str]) -> dict[str, str]:
    """Public model -> version, from the `MODEL@VERSION` names a pooled replica serves."""
    found = {}
    for name in models:
        model, at, version = name.rpartition("@")
        if at and model in models:
            found[model] = version
    return found


class ReplicaPool:
    """The replicas this router knows, with their health; background checks run inside `run()`."""

    def __init__(self, urls: list[str], settings: RouterSettings, client: UpstreamClient) -> None:
        self.replicas = [Replica(url=url, name=replica_name(url)) for url in urls]
        self._static = frozenset(urls)
        self._settings = settings
        self._client = client
        self._check_timeout_s = settings.health.timeout_s
        self._known_models: frozenset[str] = frozenset()
        self._membership = frozenset(r.name for r in self.replicas)

    @property
    def membership(self) -> frozenset[str]:
        """Names of every member, healthy or not: what the consistent-hash ring is built from, so every
        router with the same static list and registry builds the same ring."""
        return self._membership

    def sync(self, registered: set[str]) -> list[Replica]:
        """Make the registry's URLs the dynamic members: add new ones (ejected until a check passes), drop
        those gone. Returns the added replicas; requests in flight on a dropped one finish normally."""
        added = [Replica(url=url, name=replica_name(url)) for url in sorted(registered) if url not in self._urls()]
        dropped = [r for r in self.replicas if r.url not in self._static and r.url not in registered]
        if not added and not dropped:
            return []
        for replica in dropped:
            log.info("replica %s left the registry; no longer routed to", replica.name)
        for replica in added:
            log.info("replica %s joined from the registry", replica.name)
        self.replicas = [r for r in self.replicas if r not in dropped] + added
        self._membership = frozenset(r.name for r in self.replicas)
        self._known_models = frozenset(m for r in self.replicas for m in r.models)
        return added

    def _urls(self) -> set[str]:
        return {r.url for r in self.replicas}

    def candidates(self, model: str) -> list[Replica]:
        """Healthy replicas that serve `model`."""
        return [r for r in self.replicas if r.healthy and model in r.models]

    @property
    def known_models(self) -> frozenset[str]:
        """Models served by any replica, healthy or not (an ejected replica keeps what it last reported)."""
        return self._known_models

    def report_failure(self, replica: Replica, reason: str) -> None:
        """A failed check or a connection error from the proxy; ejects the replica past the threshold."""
        replica.failures += 1
        replica.successes = 0
        replica.last_error = reason
        if replica.healthy and replica.failures >= self._settings.health.eject_after_failures:
            replica.healthy = False
            log.warning("ejected replica %s after %d failures: %s", replica.name, replica.failures, reason)

    def _report_success(self, replica: Replica) -> None:
        replica.failures = 0
        replica.successes += 1
        replica.last_error = None
        if (
            not replica.healthy
            and replica.models
            and (replica.successes >= self._settings.health.readmit_after_successes)
        ):
            replica.healthy = True
            log.info("admitted replica %s serving %s", replica.name, ", ".join(sorted(replica.models)))

    async def check_all(self, replicas: list[Replica] | None = None) -> None:
        """One round of health checks over every replica (or the given ones), concurrently."""
        await asyncio.gather(*(self.check(r) for r in (self.replicas if replicas is None else replicas)))

    async def check(self, replica: Replica) -> None:
        """GET /health, and /v1/models while the replica's models are unknown or it is ejected."""
        replica.last_check = time.time()
        try:
            status, _ = await self._get(replica, b"/health")
            if status != 200:
                self.report_failure(replica, f"health check answered {status}")
                return
            if not replica.healthy or not replica.models:
                replica.models = await self._fetch_models(replica)
                replica.versions = versions_of(replica.models)
                self._known_models = frozenset(m for r in self.replicas for m in r.models)
        except (ConnectFailed, ConnectionLost, TimeoutError, ValueError) as exc:
            self.report_failure(replica, f"health check failed: {exc}")
            return
        replica.last_answer = time.time()
        self._report_success(replica)

    async def _fetch_models(self, replica: Replica) -> frozenset[str]:
        status, body = await self._get(replica, b"/v1/models")
        if status != 200:
            raise ValueError(f"/v1/models answered {status}")
        doc = orjson.loads(body)
        models = frozenset(str(m["id"]) for m in doc.get("data", []) if isinstance(m, dict) and "id" in m)
        if not models:
            raise ValueError("replica lists no models")
        return models

    async def scrape_load(self, replica: Replica) -> None:
        """Read the engine's queue, KV-cache and media-cache series from its /metrics page."""
        try:
            status, body = await self._get(replica, b"/metrics")
            if status == 200:
                gauges = parse_engine_metrics(body.decode("utf-8", "replace"))
                replica.engine = gauges
                replica.running, replica.waiting = gauges.running, gauges.waiting
                if gauges.waiting > 0:
                    replica.slots = max(replica.slots, int(gauges.running))
                replica.last_answer = time.time()
        except (ConnectFailed, ConnectionLost, TimeoutError, ValueError, IndexError):
            # A stale queue depth only weakens least-loaded; health checks decide ejection.
            return

    async def _get(self, replica: Replica, path: bytes) -> tuple[int, bytes]:
        return await self._client.get(replica.origin, path, deadline_s=self._check_timeout_s)

    async def run(self) -> None:
        """Check health and scrape load forever, each on its own interval; cancel to stop."""
        async with asyncio.TaskGroup() as group:
            group.create_task(every(self._settings.health.interval_s, self.check_all, log, "replica health checks"))
            group.create_task(
                every(self._settings.load_scrape_interval_s, self._scrape_healthy, log, "replica load scrape")
            )

    async def _scrape_healthy(self) -> None:
        await asyncio.gather(*(self.scrape_load(r) for r in self.replicas if r.healthy))
