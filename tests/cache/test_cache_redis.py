"""RedisStore against a real redis-server (the `redis_server` fixture in conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from cache.redis_store import RedisStore
from cache.store import CacheStore, CacheUnavailable
from qvl.procs import free_port

# Generous for calls that must succeed on a loaded machine; failures are tested with FAST.
OK_TIMEOUT = 1.0
FAST = 0.1


def store_on(url: str, timeout_s: float = OK_TIMEOUT, pool_size: int = 8, prefix: str = "t:") -> RedisStore:
    return RedisStore.from_url(url, timeout_s=timeout_s, pool_size=pool_size, key_prefix=prefix)


def with_store(
    url: str,
    scenario: Callable[[RedisStore], Awaitable[None]],
    timeout_s: float = OK_TIMEOUT,
    pool_size: int = 8,
    prefix: str = "t:",
) -> None:
    """Run `scenario` on a fresh store in a fresh event loop, closing the store whatever happens."""

    async def main() -> None:
        store = store_on(url, timeout_s, pool_size, prefix)
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(main())


def test_get_set_and_ttl_expiry(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        protocol: CacheStore = store
        assert protocol.name == "redis"
        assert await store.get("k") is None
        await store.set("k", b"\x00answer\xff", ttl_s=0.2)
        assert await store.get("k") == b"\x00answer\xff"
        await asyncio.sleep(0.3)
        assert await store.get("k") is None
        assert await store.entries() is None

    with_store(redis_server.url, scenario)


def test_keys_live_under_the_prefix(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        await store.set("abc", b"v", ttl_s=60)
        assert await store.try_lock("abc", "me", ttl_s=60)
        raw = Redis.from_url(redis_server.url)
        try:
            assert await raw.get("pfx:a:abc") == b"v"
            assert await raw.get("pfx:l:abc") == b"me"
            assert 0 < await raw.pttl("pfx:a:abc") <= 60_000
        finally:
            await raw.aclose()

    with_store(redis_server.url, scenario, prefix="pfx:")


def test_lock_is_exclusive_and_expires(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        assert await store.try_lock("k", "a", ttl_s=0.3)
        assert not await store.try_lock("k", "b", ttl_s=0.3)
        assert not await store.try_lock("k", "a", ttl_s=0.3)  # not re-entrant either
        await asyncio.sleep(0.4)
        assert await store.try_lock("k", "b", ttl_s=30)

    with_store(redis_server.url, scenario)


def test_publish_drops_only_its_own_lock(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        assert await store.try_lock("k", "new-leader", ttl_s=30)
        await store.publish("k", "old-leader", b"late", ttl_s=60)  # its lock had expired and was re-taken
        assert not await store.try_lock("k", "third", ttl_s=30)
        assert await store.get("k") == b"late"
        await store.publish("k", "new-leader", None, ttl_s=60)
        assert await store.try_lock("k", "third", ttl_s=30)
        assert await store.get("k") == b"late"  # a failed leader stores nothing, overwrites nothing

    with_store(redis_server.url, scenario)


def test_publish_wakes_a_waiting_follower(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        assert await store.try_lock("k", "leader", ttl_s=30)
        follower = asyncio.create_task(store.wait_for("k", timeout_s=10))
        await asyncio.sleep(0.3)  # the follower is subscribed and polling
        assert not follower.done()
        started = time.monotonic()
        await store.publish("k", "leader", b"the answer", ttl_s=60)
        assert await follower == b"the answer"
        assert time.monotonic() - started < 0.5
        assert await store.get("k") == b"the answer"
        assert await store.try_lock("k", "next", ttl_s=30)  # the lock went with the publish

    with_store(redis_server.url, scenario)


def test_followers_on_another_store_are_woken(redis_server) -> None:
    """Two stores stand for two routers."""

    async def scenario(leader: RedisStore) -> None:
        other = store_on(redis_server.url)
        try:
            assert await leader.try_lock("k", "leader", ttl_s=30)
            followers = [asyncio.create_task(other.wait_for("k", timeout_s=10)) for _ in range(5)]
            await asyncio.sleep(0.3)
            await leader.publish("k", "leader", b"v", ttl_s=60)
            assert await asyncio.gather(*followers) == [b"v"] * 5
        finally:
            await other.close()

    with_store(redis_server.url, scenario)


def test_failed_leader_releases_followers_at_once(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        assert await store.try_lock("k", "leader", ttl_s=30)
        follower = asyncio.create_task(store.wait_for("k", timeout_s=10))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await store.publish("k", "leader", None, ttl_s=60)
        assert await follower is None
        assert time.monotonic() - started < 0.5
        assert await store.get("k") is None

    with_store(redis_server.url, scenario)


def test_answer_published_before_the_wait_is_returned(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        assert await store.try_lock("k", "leader", ttl_s=30)
        await store.publish("k", "leader", b"early", ttl_s=60)
        assert await store.wait_for("k", timeout_s=5) == b"early"

    with_store(redis_server.url, scenario)


def test_dead_leader_holds_followers_only_until_its_lock_expires(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        assert await store.try_lock("k", "leader", ttl_s=0.3)
        started = time.monotonic()
        assert await store.wait_for("k", timeout_s=10) is None  # the leader never publishes
        assert 0.25 < time.monotonic() - started < 2

    with_store(redis_server.url, scenario)


def test_wait_without_any_leader_returns_at_once(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        started = time.monotonic()
        assert await store.wait_for("k", timeout_s=10) is None
        assert time.monotonic() - started < 1

    with_store(redis_server.url, scenario)


def test_wait_gives_up_after_its_timeout(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        assert await store.try_lock("k", "leader", ttl_s=30)
        started = time.monotonic()
        assert await store.wait_for("k", timeout_s=0.3) is None
        assert 0.25 < time.monotonic() - started < 1.5

    with_store(redis_server.url, scenario)


def test_one_connection_each_is_enough_to_wait(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        assert await store.try_lock("k", "leader", ttl_s=30)
        follower = asyncio.create_task(store.wait_for("k", timeout_s=10))
        await asyncio.sleep(0.2)
        await store.publish("k", "leader", b"v", ttl_s=60)
        assert await follower == b"v"

    with_store(redis_server.url, scenario, pool_size=1)


def test_cancelled_wait_returns_its_connection(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        assert await store.try_lock("k", "leader", ttl_s=30)
        follower = asyncio.create_task(store.wait_for("k", timeout_s=10))
        await asyncio.sleep(0.2)
        follower.cancel()
        with pytest.raises(asyncio.CancelledError):
            await follower
        await asyncio.sleep(0.05)
        # Would time out if the only subscriber connection were still held.
        second = asyncio.create_task(store.wait_for("k", timeout_s=10))
        await asyncio.sleep(0.2)
        await store.publish("k", "leader", b"v", ttl_s=60)
        assert await second == b"v"

    with_store(redis_server.url, scenario, pool_size=1)


def test_an_exhausted_pool_is_unavailable_not_a_hang(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        assert await store.try_lock("k", "leader", ttl_s=30)
        follower = asyncio.create_task(store.wait_for("k", timeout_s=2))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(CacheUnavailable):
            await store.wait_for("other", timeout_s=2)  # the one subscriber connection is taken
        assert time.monotonic() - started < 1
        assert await store.get("k") is None  # commands have their own pool
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)

    with_store(redis_server.url, scenario, pool_size=1, timeout_s=FAST)


async def every_operation_fails_fast(store: RedisStore, limit_s: float) -> None:
    operations: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get("k"),
        lambda: store.set("k", b"v", 60),
        lambda: store.try_lock("k", "me", 30),
        lambda: store.publish("k", "me", b"v", 60),
        lambda: store.publish("k", "me", None, 60),
        lambda: store.wait_for("k", 5),
    ]
    for op in operations:
        started = time.monotonic()
        with pytest.raises(CacheUnavailable):
            await op()
        assert time.monotonic() - started < limit_s


def test_killed_server_makes_every_operation_unavailable_then_restart_works(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        await store.set("k", b"before", 60)
        assert await store.get("k") == b"before"  # pooled connections now exist
        await asyncio.to_thread(redis_server.kill)
        await every_operation_fails_fast(store, limit_s=FAST * 5)
        await asyncio.to_thread(redis_server.restart)
        # The same store, no new client: redis-py reconnects on the next command.
        assert await store.get("k") is None  # nothing persisted
        await store.set("k", b"after", 60)
        assert await store.get("k") == b"after"
        assert await store.try_lock("k2", "me", 30)
        follower = asyncio.create_task(store.wait_for("k2", 5))
        await asyncio.sleep(0.2)
        await store.publish("k2", "me", b"again", 60)
        assert await follower == b"again"

    with_store(redis_server.url, scenario, timeout_s=FAST)


def test_hung_server_times_out_every_operation(redis_server) -> None:
    async def scenario(store: RedisStore) -> None:
        await store.set("k", b"before", 60)
        await asyncio.to_thread(redis_server.pause)
        try:
            await every_operation_fails_fast(store, limit_s=FAST * 5)
        finally:
            await asyncio.to_thread(redis_server.resume)
        # Connections cut mid-command are dropped, not reused half-read.
        assert await store.get("k") == b"before"

    with_store(redis_server.url, scenario, timeout_s=FAST)


def test_nothing_listening_is_unavailable() -> None:
    async def scenario(store: RedisStore) -> None:
        await every_operation_fails_fast(store, limit_s=FAST * 5)

    with_store(f"redis://127.0.0.1:{free_port()}/0", scenario, timeout_s=FAST)
