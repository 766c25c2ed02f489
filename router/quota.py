"""Per-key quotas: a request rate and an image-token rate, each a token bucket.

A bucket holds at most `rate x quota.burst_s` tokens and refills at `rate` per second. A request takes
one request token and its image tokens (Qwen3-VL's count after the processor's resize, from the edge)
from its key's two buckets, both or neither; when either is short the request gets 429 with the
seconds until it would fit as Retry-After. Buckets live in this process (`quota.backend: memory`) or in
Redis, shared by every router (one Lua script, Redis' own clock).

A Redis that fails or does not answer within `quota.redis_timeout_s` makes the quotas *degraded* until a
probe in the background (every `quota.probe_interval_s`) finds it answering again; meanwhile no request
waits on it. What a degraded router does is `quota.on_store_failure`: `local` enforces every key's limits
in buckets of its own, each holding this router's share of the key's rate and burst (divided by the
number of live routers: `quota.routers`, else the registry's count), so that all routers together still
admit about the key's rate; `open` admits everything; `closed` refuses with 503 (and keeps asking Redis
with each request, as it did before there was a choice).
"""

from __future__ import annotations

import asyncio
import logging
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

log = logging.getLogger("qvl.router.quota")


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


# Takes nothing, on a name no API key's bucket has (theirs end in :requests or :image_tokens): a probe of
# the store that runs the real script, writes included (a Redis failed over to a read-only replica fails it).
PROBE = Take("_probe", 1.0, 1.0, 0)


def local_share(takes: list[Take], routers: int) -> list[Take]:
    """This router's part of each bucket while the shared store is down: 1/routers of its rate and capacity.

    The capacity never drops below the take itself: a request that fits the whole bucket must fit some day.
    """
    n = max(1, routers)
    return [Take(t.name, t.rate / n, max(t.capacity / n, t.amount), t.amount) for t in takes]


class Quotas:
    """The quota check of a router: `charge()` or raise RateLimited (or QuotaUnavailable when closed)."""

    def __init__(
        self,
        settings: QuotaSettings,
        store: BucketStore | None = None,
        routers: Callable[[], int] = lambda: 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._store = store or (
            MemoryBuckets()
            if settings.backend == "memory"
            else RedisBuckets(settings.backend, timeout_s=settings.redis_timeout_s)
        )
        self._routers = routers
        self._clock = clock
        self._local = MemoryBuckets(clock)
        self._degraded_since: float | None = None
        self._degraded_before = 0.0
        self._probe: asyncio.Task[None] | None = None

    def degradation(self) -> tuple[bool, float] | None:
        """(degraded now, seconds spent degraded since start) for the metrics; None for buckets in this
        process, which cannot fail."""
        if isinstance(self._store, MemoryBuckets):
            return None
        since = self._degraded_since
        return since is not None, self._degraded_before + (0.0 if since is None else self._clock() - since)

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
        wait = await self._take(takes)
        if wait > 0:
            raise RateLimited(
                f"API key '{key.id}' is over its quota; retry in {math.ceil(wait)} s",
                code="quota_exceeded",
                retry_after_s=wait,
            )

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self._store.close()

    async def _take(self, takes: list[Take]) -> float:
        mode = self._settings.on_store_failure
        if self._degraded_since is None or mode == "closed":
            try:
                wait = await self._store.take(takes)
            except QuotaUnavailable:
                self._degrade()
                if mode == "closed":
                    raise
            else:
                self._recover()
                return wait
        if mode == "open":
            return 0.0
        return await self._local.take(local_share(takes, self._routers()))

    def _degrade(self) -> None:
        if self._degraded_since is not None:
            return
        self._degraded_since = self._clock()
        # Fresh buckets: each starts with this router's share of the burst, as the shared one would be full
        # for a key that had idled.
        self._local = MemoryBuckets(self._clock)
        doing = {
            "local": f"each key gets 1/{max(1, self._routers())} of its rate here",
            "open": "every request is admitted unmetered",
            "closed": "requests are refused with 503",
        }[self._settings.on_store_failure]
        log.warning("the quota store does not answer; until it does, %s", doing)
        self._probe = asyncio.get_running_loop().create_task(self._probe_until_up(), name="quota-probe")

    def _recover(self) -> None:
        if self._degraded_since is None:
            return
        took = self._clock() - self._degraded_since
        self._degraded_before += took
        self._degraded_since = None
        log.info("the quota store answers again after %.1f s; back to the shared buckets", took)
        if self._probe is not None and self._probe is not asyncio.current_task():
            self._probe.cancel()
        self._probe = None

    async def _probe_until_up(self) -> None:
        while self._degraded_since is not None:
            await asyncio.sleep(self._settings.probe_interval_s)
            try:
                await self._store.take([PROBE])
            except QuotaUnavailable:
                continue
            self._recover()


def _quota_unavailable(message: str) -> QuotaUnavailable:
    return QuotaUnavailable(message, code="quota_unavailable", retry_after_s=1)


def _pick(own: float | None, default: float) -> float:
    return default if own is None else own
