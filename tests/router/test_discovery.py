"""Routers that find replicas in the registry (real Redis, real `qvl sim` replicas, real routers):
members join and leave routing without a restart, two routers agree on image affinity and count each
other, and a registry outage keeps the last membership (and router count) instead of emptying the pool."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from support.chat import image_chat, png_data_url
from support.heartbeats import Heartbeats
from support.metrics import metric_sum
from support.polling import wait_for
from support.servers import Cluster, Proc

from serving.registry import Member, Registry

MODEL = "qwen3-vl-sim"
TTL_S = 2.0
POLL_S = 0.25


def announce(url: str, replica: Proc, replica_id: str, ttl_s: float = TTL_S) -> None:
    """One announcement, never renewed: the entry lasts ttl_s."""

    async def run() -> None:
        registry = Registry(url, ttl_s=ttl_s)
        await registry.announce(Member(replica_id, MODEL, replica.url, 1, "node-a", time.time()))
        await registry.close()

    asyncio.run(run())


def routed(router: Proc) -> set[str]:
    """Names of the replicas this router routes to now (healthy members)."""
    doc = httpx.get(router.url + "/v1/cluster", timeout=5).json()
    return {r["name"] for r in doc["replicas"] if r["healthy"]}


def registry_router(cluster: Cluster, url: str) -> Proc:
    """A router with no static replicas: everything it routes to comes from the registry."""
    return cluster.start("router", "--registry", url, "--policy", "image-affinity", ready_path="/health")


def test_members_join_and_leave_routing_within_the_ttl(cluster: Cluster, redis_server, monkeypatch) -> None:
    monkeypatch.setenv("QVL_REGISTRY__POLL_INTERVAL_S", str(POLL_S))
    a, b = cluster.sim(), cluster.sim()
    router = registry_router(cluster, redis_server.url)
    assert routed(router) == set()
    announce(redis_server.url, a, "a")
    announce(redis_server.url, b, "b")
    wait_for(lambda: routed(router) == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}, timeout=5)
    answer = httpx.post(router.url + "/v1/chat/completions", json=image_chat(MODEL, png_data_url()), timeout=10)
    assert answer.status_code == 200
    # Nobody re-announces: both stay healthy (their servers run) but their entries expire.
    took = wait_for(lambda: routed(router) == set(), timeout=TTL_S + 3)
    # The registry's contract (registry.ttl_s), not a speed target: gone within ttl + poll (+ slack).
    assert took <= TTL_S + POLL_S + 1.0
    assert a.popen.poll() is None and httpx.get(a.url + "/health").status_code == 200


def test_two_routers_send_the_same_image_to_the_same_replica(
    cluster: Cluster, redis_server, monkeypatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setenv("QVL_REGISTRY__POLL_INTERVAL_S", str(POLL_S))
    sims = [cluster.sim() for _ in range(3)]
    beats = Heartbeats(redis_server.url, ttl_s=TTL_S)
    request.addfinalizer(beats.close)
    for i, sim in enumerate(sims):
        beats.beat(sim, f"r{i}", MODEL)
    routers = [registry_router(cluster, redis_server.url) for _ in range(2)]
    names = {f"127.0.0.1:{s.port}" for s in sims}
    for router in routers:
        wait_for(lambda r=router: routed(r) == names, timeout=5)
        wait_for(lambda r=router: metric_sum(r.url, "qvl_registry_routers") == 2, timeout=5)
    owners = set()
    for i in range(12):
        body = image_chat(MODEL, png_data_url((i * 20, 40, 90)), temperature=0.7)
        picked = {
            httpx.post(r.url + "/v1/chat/completions", json=body, timeout=10).headers["x-qvl-replica"]
            for r in routers
            for _ in range(2)
        }
        if len(picked) != 1:
            texts = [httpx.post(r.url + "/v1/chat/completions", json=body).text[:300] for r in routers]
            raise AssertionError(f"image {i} went to {picked}: {texts}")
        owners |= picked
    assert len(owners) >= 2  # affinity spreads images; it does not pin everything on one replica


def test_a_registry_outage_keeps_the_last_membership(cluster: Cluster, redis_server, monkeypatch) -> None:
    monkeypatch.setenv("QVL_REGISTRY__POLL_INTERVAL_S", str(POLL_S))
    monkeypatch.setenv("QVL_REGISTRY__TIMEOUT_S", "0.3")
    sim = cluster.sim()
    announce(redis_server.url, sim, "only", ttl_s=60)
    router = registry_router(cluster, redis_server.url)
    wait_for(lambda: routed(router) == {f"127.0.0.1:{sim.port}"}, timeout=5)
    assert metric_sum(router.url, "qvl_registry_up") == 1 and metric_sum(router.url, "qvl_registry_routers") == 1
    redis_server.kill()
    wait_for(lambda: metric_sum(router.url, "qvl_registry_up") == 0, timeout=5)
    time.sleep(1.0)
    assert routed(router) == {f"127.0.0.1:{sim.port}"}
    assert metric_sum(router.url, "qvl_registry_routers") == 1
    body = image_chat(MODEL, png_data_url(), temperature=0.7)
    assert httpx.post(router.url + "/v1/chat/completions", json=body, timeout=10).status_code == 200


def test_a_registry_that_comes_back_empty_keeps_members_until_they_could_re_announce(
    cluster: Cluster, redis_server, monkeypatch
) -> None:
    # Redis restarted without its data (no persistence): for one ttl_s the router keeps the members it
    # knew, the time their heartbeats need to announce them again, instead of dropping every replica.
    ttl_s = 6.0
    monkeypatch.setenv("QVL_REGISTRY__POLL_INTERVAL_S", str(POLL_S))
    monkeypatch.setenv("QVL_REGISTRY__TTL_S", str(ttl_s))
    sim = cluster.sim()
    name = f"127.0.0.1:{sim.port}"
    announce(redis_server.url, sim, "only", ttl_s=60)
    router = registry_router(cluster, redis_server.url)
    wait_for(lambda: routed(router) == {name}, timeout=5)
    redis_server.restart()
    assert asyncio.run(_members(redis_server.url)) == []
    wait_for(lambda: metric_sum(router.url, "qvl_registry_up") == 1, timeout=5)
    time.sleep(4 * POLL_S)  # several reads of the empty registry
    assert routed(router) == {name}
    body = image_chat(MODEL, png_data_url(), temperature=0.7)
    assert httpx.post(router.url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
    # Nobody announces it again: once the grace has passed it leaves routing, as an expired member does.
    wait_for(lambda: routed(router) == set(), timeout=ttl_s + 5)


def test_a_member_that_re_announces_after_the_registry_lost_its_data_stays(
    cluster: Cluster, redis_server, monkeypatch
) -> None:
    monkeypatch.setenv("QVL_REGISTRY__POLL_INTERVAL_S", str(POLL_S))
    monkeypatch.setenv("QVL_REGISTRY__TTL_S", "2")
    sim = cluster.sim()
    name = f"127.0.0.1:{sim.port}"
    announce(redis_server.url, sim, "only", ttl_s=60)
    router = registry_router(cluster, redis_server.url)
    wait_for(lambda: routed(router) == {name}, timeout=5)
    redis_server.restart()
    announce(redis_server.url, sim, "only", ttl_s=60)  # its heartbeat, after the restart
    time.sleep(2 + 8 * POLL_S)  # past the grace
    assert routed(router) == {name}


async def _members(url: str) -> list[Member]:
    registry = Registry(url, ttl_s=TTL_S)
    try:
        return await registry.members()
    finally:
        await registry.close()
