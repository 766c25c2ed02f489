from __future__ import annotations

import asyncio

import pytest

from cache.memory import MemoryStore
from cache.store import CacheStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_implements_the_protocol() -> None:
    store: CacheStore = MemoryStore(10, 1024)
    assert store.name == "memory"


def test_get_set_and_ttl() -> None:
    clock = FakeClock()
    store = MemoryStore(10, 1024, clock=clock)

    async def scenario() -> None:
        assert await store.get("k") is None
        await store.set("k", b"v", ttl_s=10)
        assert await store.get("k") == b"v"
        clock.now += 9.9
        assert await store.get("k") == b"v"
        clock.now += 0.1
        assert await store.get("k") is None
        assert await store.entries() == 0

    asyncio.run(scenario())


def test_entries_drops_expired() -> None:
    clock = FakeClock()
    store = MemoryStore(10, 1024, clock=clock)

    async def scenario() -> None:
        await store.set("short", b"1", ttl_s=1)
        await store.set("long", b"2", ttl_s=100)
        assert await store.entries() == 2
        clock.now += 5
        assert await store.entries() == 1
        assert await store.get("long") == b"2"

    asyncio.run(scenario())


def test_lru_eviction_by_count() -> None:
    store = MemoryStore(max_entries=2, max_bytes=1024, clock=FakeClock())

    async def scenario() -> None:
        await store.set("a", b"1", 60)
        await store.set("b", b"2", 60)
        assert await store.get("a") == b"1"  # a is now the most recently used
        await store.set("c", b"3", 60)
        assert await store.get("b") is None
        assert await store.get("a") == b"1"
        assert await store.get("c") == b"3"
        assert await store.entries() == 2

    asyncio.run(scenario())


def test_lru_eviction_by_bytes() -> None:
    store = MemoryStore(max_entries=100, max_bytes=10, clock=FakeClock())

    async def scenario() -> None:
        await store.set("a", b"xxxx", 60)
        await store.set("b", b"yyyy", 60)
        await store.set("c", b"zzzz", 60)  # 12 bytes > 10: a goes
        assert await store.get("a") is None
        assert await store.get("b") == b"yyyy"
        await store.set("d", b"0123456789", 60)  # exactly the limit: everything else goes
        assert await store.get("b") is None and await store.get("c") is None
        assert await store.get("d") == b"0123456789"
        await store.set("e", b"01234567890", 60)  # larger than the whole store: not stored
        assert await store.get("e") is None
        assert await store.get("d") == b"0123456789"

    asyncio.run(scenario())


def test_replacing_an_entry_keeps_byte_accounting() -> None:
    store = MemoryStore(max_entries=100, max_bytes=10, clock=FakeClock())

    async def scenario() -> None:
        for _ in range(20):
            await store.set("a", b"0123456789", 60)
        await store.set("a", b"x", 60)
        await store.set("b", b"012345678", 60)
        assert await store.get("a") == b"x"
        assert await store.entries() == 2

    asyncio.run(scenario())


def test_single_flight_methods_never_wait() -> None:
    store = MemoryStore(10, 1024, clock=FakeClock())

    async def scenario() -> None:
        assert await store.try_lock("k", "one", 30)
        assert await store.try_lock("k", "two", 30)  # one router: in-process single-flight suffices
        assert await store.wait_for("k", 30) is None
        await store.publish("k", "one", None, 60)
        assert await store.get("k") is None
        await store.publish("k", "one", b"answer", 60)
        assert await store.wait_for("k", 30) == b"answer"
        await store.close()
        assert await store.get("k") is None

    asyncio.run(scenario())


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MemoryStore(0, 10)
