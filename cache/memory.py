"""The in-process answer store: a bounded LRU with a TTL per entry, for a single router."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class MemoryStore:
    """CacheStore kept in this process, bounded by entry count and total bytes (least recently used go first).

    With one router, in-process single-flight is enough, so `try_lock` always grants the lock and
    `wait_for` answers at once with what is stored. Never raises CacheUnavailable. Not thread-safe:
    use it from one event loop (no method awaits, so each runs atomically there).
    """

    name: str = "memory"

    def __init__(self, max_entries: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        # key -> (value, expiry on `clock`); order is least recently used first.
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        """The entry, or None when absent or expired (an expired entry is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if self._clock() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store an entry for ttl_s seconds; one larger than max_bytes (or ttl_s <= 0) is not stored."""
        self._drop(key)
        if ttl_s <= 0 or len(value) > self._max_bytes:
            return
        self._entries[key] = (value, self._clock() + ttl_s)
        self._bytes += len(value)
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            _, (old, _) = self._entries.popitem(last=False)
            self._bytes -= len(old)

    async def try_lock(self, key: str, owner: str, ttl_s: float) -> bool:
        """Always True: one router, whose in-process single-flight already serialises a key."""
        return True

    async def publish(self, key: str, owner: str, value: bytes | None, ttl_s: float) -> None:
        """Store `value` unless it is None; there are no followers elsewhere to wake."""
        if value is not None:
            await self.set(key, value, ttl_s)

    async def wait_for(self, key: str, timeout_s: float) -> bytes | None:
        """What is stored for `key` now, or None; never waits (no leader elsewhere to wait for)."""
        return await self.get(key)

    async def ping(self) -> None:
        """Always answers: the store is this process's memory."""

    async def entries(self) -> int:
        """How many live entries are stored (expired ones are dropped first, O(entries))."""
        now = self._clock()
        for key in [key for key, (_, expires) in self._entries.items() if now >= expires]:
            self._drop(key)
        return len(self._entries)

    async def close(self) -> None:
        """Drop every entry."""
        self._entries.clear()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[0])
