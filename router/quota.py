"""Per-key quotas: a request rate and an image-token rate, each a token bucket.

A bucket holds at most `rate x quota.burst_s` tokens and refills at `rate` per second. A request takes
one request token and its image tokens (Qwen3-VL's count after the processor's resize, from the edge)
from its key's two buckets, both or neither; when either is short the request gets 429 with the
seconds until it would fit as Retry-After. Buckets live in this process (`quota.backend: memory`) or in
Redis, shared by every router (one Lua script, Redis' own clock). A Redis that does not answer within
`quota.redis_timeout_s` refuses the request with 503 rather than let it through unmetered.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from qvl.redis_client import redis_client
from qvl.redis_errors import redis_unavailable
from qvl.settings import QuotaSettings
from router.auth import ApiKey
from router.errors import InvalidRequest, QuotaUnavailable, RateLimited


@dataclass(frozen=True, slots=True)
class Take:
    """Take `amount` from bucket `name` (rate per second, capacity in tokens)."""

    name: str
    rate: float
    capacity: float
    amount: float


class BucketStore(Protocol):
    async def take(self, takes: list[Take]) -> float:
        """Take from every bucket or from none: 0 when granted, else seconds until all would fit."""
        ...

    async def close(self) -> None: ...


class MemoryBuckets:
    """Buckets of this router process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    async def take(self, takes: list[Take]) -> float:
        now = self._clock()
        levels = []
        wait = 0.0
        for t in takes:
            tokens, updated = self._buckets.get(t.name, (t.capacity, now))
            tokens = min(t.capacity, tokens + (now - updated) * t.rate)
            levels.append(tokens)
            if tokens < t.amount:
                wait = max(wait, (t.amount - tokens) / t.rate)
        if wait > 0:
            return wait
        for t, tokens in zip(takes, levels, strict=True):
            self._buckets[t.name] = (tokens - t.amount, now)
        return 0.0

    async def close(self) -> None:
        self._buckets.clear()


# KEYS: bucket keys; ARGV: per key rate, capacity, amount (3 per key). Redis' TIME is the one clock of
# every router. All buckets are read first; tokens are taken only when every bucket has enough.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local levels = {}
local wait = 0
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[3 * i - 2])
  local capacity = tonumber(ARGV[3 * i - 1])
  local amount = tonumber(ARGV[3 * i])
  local state = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(state[1]) or capacity
  local ts = tonumber(state[2]) or now
  tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
  levels[i] = tokens
  if tokens < amount then wait = math.max(wait, (amount - tokens) / rate) end
end
if wait > 0 then return tostring(wait) end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[3 * i - 2])
  local capacity = tonumber(ARGV[3 * i - 1])
  redis.call('HSET', key, 'tokens', levels[i] - tonumber(ARGV[3 * i]), 'ts', now)
  redis.call('PEXPIRE', key, math.ceil(capacity / rate * 1000) + 1000)
end
return '0'
"""


class RedisBuckets:
    """Buckets in Redis, shared by every router pointing at it."""

    def __init__(self, url: str, timeout_s: float, key_prefix: str = "qvl:quota:") -> None:
        self._client = redis_client(url, max_connections=32, pool_timeout_s=timeout_s, socket_timeout_s=timeout_s)
        self._script = self._client.register_script(_TAKE)
        self._timeout_s = timeout_s
        self._prefix = key_prefix

    async def take(self, takes: list[Take]) -> float:
        keys = [self._prefix + t.name for t in takes]
        args: list[float] = []
        for t in takes:
            args += [t.rate, t.capacity, t.amount]
        with redis_unavailable(_quota_unavailable, "the quota store did not answer; try again shortly"):
            async with asyncio.timeout(self._timeout_s):
                result = await self._script(keys=keys, args=args)
        return float(result)

    async def close(self) -> None:
        await self._client.aclose()


class Quotas:
    """The quota check of a router: `charge()` or raise RateLimited."""

    def __init__(self, settings: QuotaSettings, store: BucketStore | None = None) -> None:
        self._settings = settings
        self._store = store or (
            MemoryBuckets()
            if settings.backend == "memory"
            else RedisBuckets(settings.backend, timeout_s=settings.redis_timeout_s)
        )

    async def charge(self, key: ApiKey, image_tokens: int) -> None:
        """Take one request and `image_tokens` from the key's buckets; unlimited rates are skipped."""
        per_min_requests = _pick(key.requests_per_minute, self._settings.requests_per_minute)
        per_min_images = _pick(key.image_tokens_per_minute, self._settings.image_tokens_per_minute)
        takes = []
        burst = self._settings.burst_s
        if per_min_requests > 0:
            rate = per_min_requests / 60
            takes.append(Take(f"{key.id}:requests", rate, max(1.0, rate * burst), 1))
        if per_min_images > 0 and image_tokens > 0:
            rate = per_min_images / 60
            capacity = rate * burst
            if image_tokens > capacity:
                raise InvalidRequest(
                    f"the request's {image_tokens} image tokens exceed what this API key may send at once "
                    f"({math.floor(capacity)}); send smaller or fewer images",
                    code="image_tokens_over_quota",
                    param="messages",
                )
            takes.append(Take(f"{key.id}:image_tokens", rate, capacity, image_tokens))
        if not takes:
            return
        wait = await self._store.take(takes)
        if wait > 0:
            raise RateLimited(
                f"API key '{key.id}' is over its quota; retry in {math.ceil(wait)} s",
                code="quota_exceeded",
                retry_after_s=wait,
            )

    async def close(self) -> None:
        await self._store.close()


def _quota_unavailable(message: str) -> QuotaUnavailable:
    return QuotaUnavailable(message, code="quota_unavailable", retry_after_s=1)


def _pick(own: float | None, default: float) -> float:
    return default if own is None else own
