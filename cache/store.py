"""The cache store protocol: where answers live, and the cross-router single-flight lock.

An entry is the bytes of a complete, successful, non-streamed chat completion (the JSON body a
replica returns); streamed answers are recorded into that shape before they are stored, and replayed
from it (cache/replay.py). Every method may raise CacheUnavailable; callers then bypass the cache
for that request and never fail it.
"""

from __future__ import annotations

from typing import Protocol


class CacheUnavailable(Exception):
    """The store did not answer in time or could not be reached."""


class CacheStore(Protocol):
    name: str
    """Short label for metrics: memory or redis."""

    async def get(self, key: str) -> bytes | None:
        """The entry, or None when absent or expired."""
        ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store an entry for ttl_s seconds."""
        ...

    async def try_lock(self, key: str, owner: str, ttl_s: float) -> bool:
        """Become the leader for `key` across routers: True if this owner now holds the lock.
        A store with a single router (memory) always answers True."""
        ...

    async def publish(self, key: str, owner: str, value: bytes | None, ttl_s: float) -> None:
        """The leader is done: store `value` (None: it failed, store nothing), wake followers, drop the lock
        if `owner` still holds it."""
        ...

    async def wait_for(self, key: str, timeout_s: float) -> bytes | None:
        """A follower on another router: the leader's value once published, or None if the lock vanished
        (the leader died or failed) or timeout_s passed first."""
        ...

    async def ping(self) -> None:
        """Return once the store answers; raises CacheUnavailable when it does not (health checks)."""
        ...

    async def entries(self) -> int | None:
        """How many entries are stored (None if the store cannot tell cheaply)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
