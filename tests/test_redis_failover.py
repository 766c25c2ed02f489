"""Redis is no single point of failure: two routers with the answer cache, the quotas and the registry all
on a Sentinel URL keep serving while the Redis primary is SIGKILLed mid-load and Sentinel promotes its
replica. No non-streamed request fails, the cache hits again, the registry keeps its members, and the
time from the kill to the first shared-bucket quota decision on the new primary is measured."""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
from support.chat import image_chat, png_data_url
from support.heartbeats import Heartbeats
from support.polling import wait_for
from support.sentinel import SentinelGroup
from support.servers import Cluster, Proc

MODEL = "qwen3-vl-sim"
KEY = "sk-failover-0123456789abcdef"
KEY_ID = "failover"
QUOTA_KEY = f"qvl:quota:{KEY_ID}:requests"
WORKERS = 4
# Greedy questions about a few images, asked over and over: after the first answers, mostly cache hits.
REPEATED = [image_chat(MODEL, png_data_url((40 * i, 90, 160)), temperature=0) for i in range(3)]


@dataclass(frozen=True)
class Outcome:
    started: float
    status: int  # 0: no answer at all (connection error, timeout)
    cache: str


class Load:
    """WORKERS threads sending non-streamed requests through the routers in turn until stop()."""

    def __init__(self, routers: list[Proc]) -> None:
        self.outcomes: list[Outcome] = []
        self._routers = routers
        self._stop = threading.Event()
        self._counter = itertools.count()
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(WORKERS)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        headers = {"authorization": f"Bearer {KEY}"}
        with httpx.Client(timeout=30, headers=headers) as client:
            while not self._stop.is_set():
                n = next(self._counter)
                # One request in ten is new (a miss that goes to a replica and writes the cache).
                doc = REPEATED[n % 3] if n % 10 else image_chat(MODEL, png_data_url((n % 256, n // 256 % 256, 7)))
                started = time.monotonic()
                try:
                    response = client.post(self._routers[n % 2].url + "/v1/chat/completions", json=doc)
                    self.outcomes.append(
                        Outcome(started, response.status_code, response.headers.get("x-qvl-cache", ""))
                    )
                except httpx.HTTPError:
                    self.outcomes.append(Outcome(started, 0, ""))

    def hits_since(self, moment: float) -> int:
        return sum(1 for o in list(self.outcomes) if o.started >= moment and o.cache == "hit")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(40)


class Membership:
    """Reads GET /v1/cluster of every router every 0.1 s; keeps the fewest healthy replicas seen by each."""

    def __init__(self, routers: list[Proc]) -> None:
        self.fewest = [99] * len(routers)
        self.reads = 0
        self._routers = routers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for i, router in enumerate(self._routers):
                try:
                    healthy = _healthy(router)
                except httpx.HTTPError:
                    healthy = 0
                self.fewest[i] = min(self.fewest[i], healthy)
            self.reads += 1
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def quota_decided_since(port: int, wall: float) -> bool:
    """Whether the server on `port` (the new primary) holds a shared-bucket decision taken after `wall`:
    the Lua script stamps the bucket with Redis' own clock (the same host's clock here) on every grant."""
    try:
        with redis.Redis(port=port, socket_timeout=0.5) as client:
            stamp = client.hget(QUOTA_KEY, "ts")
    except redis.RedisError:
        return False
    return stamp is not None and float(stamp) > wall


def test_routers_ride_through_a_sentinel_failover(
    cluster: Cluster, redis_sentinels: SentinelGroup, tmp_path: Path
) -> None:
    group = redis_sentinels
    url = group.url
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - id: {KEY_ID}\n    key: {KEY}\n    requests_per_minute: 600000\n")
    config = tmp_path / "qvl.yaml"
    # Generous timeouts for a loaded 2-core test machine: a slow call is not what this test is about.
    config.write_text(
        f"cache: {{backend: '{url}', redis_timeout_s: 0.25}}\n"
        f"router: {{quota: {{backend: '{url}', redis_timeout_s: 0.25}}}}\n"
        f"registry: {{url: '{url}', ttl_s: 15, poll_interval_s: 0.25}}\n"
    )
    sims = [cluster.sim("--zero-delay"), cluster.sim("--zero-delay")]
    heartbeats = Heartbeats(url, ttl_s=15)
    try:
        for i, sim in enumerate(sims):
            heartbeats.beat(sim, f"sim-{i}", MODEL)
        routers = [
            cluster.start("router", "--config", str(config), "--keys-file", str(keys), ready_path="/ready", auth=True)
            for _ in range(2)
        ]
        wait_for(lambda: all(_healthy(r) == 2 for r in routers), 20)
        membership = Membership(routers)
        load = Load(routers)
        try:
            wait_for(lambda: load.hits_since(0) >= 20, 30)
            assert group.primary_port() == group.primary.port
            killed_at, killed_wall = time.monotonic(), time.time()
            group.primary.kill()
            promoted_s = wait_for(group.promoted, 30, interval=0.02)
            wait_for(lambda: quota_decided_since(group.replica.port, killed_wall), 30, 0.02)
            quota_s = time.monotonic() - killed_at
            after = time.monotonic()
            # Cache hits again once the new primary serves, and the load runs on a while after it.
            # ... and the membership has been read several times across it (slow on a loaded machine).
            wait_for(
                lambda: load.hits_since(after) >= 20 and time.monotonic() > after + 2 and membership.reads >= 5, 30
            )
        finally:
            load.stop()
            membership.stop()
    finally:
        heartbeats.close()

    failed = [o for o in load.outcomes if o.status != 200]
    during = [o for o in load.outcomes if killed_at <= o.started < after]
    record = {
        "requests": len(load.outcomes),
        "failed": len(failed),
        "requests_between_kill_and_first_quota_decision": len(during),
        "promoted_s": round(promoted_s, 3),
        "kill_to_first_shared_quota_decision_s": round(quota_s, 3),
        "hits_after_failover": load.hits_since(after),
        "fewest_healthy_replicas_per_router": membership.fewest,
        "membership_reads": membership.reads,
    }
    (tmp_path / "failover.json").write_text(json.dumps(record, indent=2))
    print(f"\nsentinel failover: {json.dumps(record)}")
    assert not failed, f"{len(failed)} failed requests: statuses {sorted({o.status for o in failed})}"
    assert record["hits_after_failover"] >= 20
    assert membership.fewest == [2, 2] and membership.reads >= 5


def _healthy(router: Proc) -> int:
    doc = httpx.get(router.url + "/v1/cluster", headers={"authorization": f"Bearer {KEY}"}, timeout=5).json()
    return sum(1 for r in doc["replicas"] if r["healthy"])
