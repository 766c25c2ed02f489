"""The replica registry against a real redis-server: announce, expire, withdraw, survive a Redis restart;
routers announce themselves beside the replicas, in keys of their own."""

from __future__ import annotations

import asyncio

import pytest

from serving.registry import Member, Registry, RegistryUnavailable, RouterMember


def member(i: int, model: str = "Qwen/Qwen3-VL-8B-Instruct") -> Member:
    return Member(f"r{i}", model, f"http://10.0.0.{i}:8100", 2, f"node-{i}", 1_700_000_000.0 + i)


def test_members_are_shared_and_expire_when_the_heartbeat_stops(redis_server) -> None:
    async def run() -> None:
        replica_side, router_side = (Registry(redis_server.url, ttl_s=1.5) for _ in range(2))
        beating = asyncio.create_task(replica_side.heartbeat(member(1)))
        await replica_side.announce(member(2))  # announced once, then silent: a crashed replica
        await asyncio.sleep(0.1)
        assert await router_side.members() == [member(1), member(2)]
        await asyncio.sleep(1.8)  # past r2's TTL; r1 keeps beating every 0.5 s
        assert await router_side.members() == [member(1)]
        await router_side.withdraw("r1")
        beating.cancel()
        assert await router_side.members() == []
        for registry in (replica_side, router_side):
            await registry.close()

    asyncio.run(run())


def test_a_heartbeat_re_announces_after_redis_restarts(redis_server) -> None:
    async def run() -> None:
        registry = Registry(redis_server.url, ttl_s=0.9, timeout_s=0.2)
        beating = asyncio.create_task(registry.heartbeat(member(3)))
        await asyncio.sleep(0.1)
        assert await registry.members() == [member(3)]
        redis_server.kill()
        with pytest.raises(RegistryUnavailable):
            await registry.members()
        await asyncio.to_thread(redis_server.start)  # comes back empty: nothing is persisted
        for _ in range(30):  # the next beat (every 0.3 s) re-announces
            if await registry.members() == [member(3)]:
                break
            await asyncio.sleep(0.1)
        assert await registry.members() == [member(3)]
        beating.cancel()
        await registry.close()

    asyncio.run(run())


def test_routers_are_counted_apart_from_replicas_and_expire_the_same_way(redis_server) -> None:
    async def run() -> None:
        registry = Registry(redis_server.url, ttl_s=1.5)
        routers = [RouterMember(f"router-{i}", f"http://10.0.1.{i}:8000", 1_700_000_000.0) for i in range(3)]
        beating = asyncio.create_task(registry.heartbeat(routers[0]))
        await registry.announce(routers[1])  # announced once, then silent: a crashed router
        await registry.announce(routers[2])
        await registry.announce(member(1))
        await asyncio.sleep(0.1)
        assert await registry.routers() == routers and await registry.members() == [member(1)]
        await registry.withdraw_router("router-2")
        assert await registry.routers() == routers[:2]
        await asyncio.sleep(1.8)  # past router-1's TTL; router-0 keeps beating every 0.5 s
        assert await registry.routers() == routers[:1]
        beating.cancel()
        await registry.close()

    asyncio.run(run())
