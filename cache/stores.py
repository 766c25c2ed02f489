"""Build the store named by `cache.backend` (the one registry of store kinds)."""

from __future__ import annotations

from cache.memory import MemoryStore
from cache.redis_store import RedisStore
from cache.store import CacheStore
from qvl.settings import CacheSettings


def build_store(settings: CacheSettings) -> CacheStore | None:
    """memory, a Redis URL, or None for `off`."""
    if settings.backend == "off":
        return None
    if settings.backend == "memory":
        return MemoryStore(max_entries=settings.memory_max_entries, max_bytes=settings.memory_max_bytes)
    return RedisStore.from_url(
        settings.backend,
        timeout_s=settings.redis_timeout_s,
        pool_size=settings.redis_pool_size,
        key_prefix=settings.key_prefix,
    )
