"""The replica registry in Redis: replicas announce themselves with a TTL heartbeat; routers read the live set.

Layout (under a key prefix, `qvl:` by default):
    registry:members   sorted set: replica id -> the time (Redis' clock) its announcement expires
    registry:info      hash: replica id -> JSON {model, url, tensor_parallel_size, node, started_at}

A replica whose heartbeat stops drops out of `members()` once its expiry passes, without anyone
cleaning up; readers prune expired entries as they go. Both scripts read Redis' own clock, so the
hosts' clocks never matter. Replicas on Ray announce themselves here (serving/ray/supervisor.py); every
router polls it and routes to its members beside router.replicas (router/discovery.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import orjson
from redis.exceptions import RedisError

from qvl.redis_client import redis_client
from qvl.redis_errors import redis_unavailable

log = logging.getLogger("qvl.registry")
_T = TypeVar("_T")

# KEYS: members, info. ARGV: id, ttl seconds, info JSON.
_ANNOUNCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""
# KEYS: members, info. Returns the info JSON of every live member, after dropping the expired ones.
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[2], unpack(ids))
"""


class RegistryUnavailable(Exception):
    """Redis did not answer in time or could not be reached."""


@dataclass(frozen=True, slots=True)
class Member:
    """One replica as it announces itself."""

    replica_id: str
    model: str
    url: str
    tensor_parallel_size: int
    node: str
    started_at: float


class Registry:
    """Read and write the registry; every method may raise RegistryUnavailable."""

    def __init__(self, url: str, *, ttl_s: float, timeout_s: float = 1.0, key_prefix: str = "qvl:") -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.ttl_s = ttl_s
        self._client = redis_client(url, max_connections=8, pool_timeout_s=timeout_s, socket_timeout_s=timeout_s)
        self._timeout_s = timeout_s
        self._keys = [f"{key_prefix}registry:members", f"{key_prefix}registry:info"]
        self._announce = self._client.register_script(_ANNOUNCE)
        self._live = self._client.register_script(_LIVE)

    async def announce(self, member: Member) -> None:
        """Add or refresh `member` for another ttl_s seconds."""
        info = orjson.dumps(asdict(member))
        await self._call(self._announce(keys=self._keys, args=[member.replica_id, self.ttl_s, info]))

    async def withdraw(self, replica_id: str) -> None:
        """Remove a replica at once (a clean shutdown; a crash just stops the heartbeat)."""
        members, info = self._keys

        async def both() -> None:
            await self._client.zrem(members, replica_id)
            await self._client.hdel(info, replica_id)

        await self._call(both())

    async def members(self) -> list[Member]:
        """Every replica whose announcement has not expired, sorted by replica id."""
        rows: list[Any] = await self._call(self._live(keys=self._keys))
        found = []
        for raw in rows:
            if raw is None:
                continue  # announced, then withdrawn between the two reads of the script: not a member
            found.append(Member(**orjson.loads(raw)))
        return sorted(found, key=lambda m: m.replica_id)

    async def heartbeat(self, member: Member) -> None:
        """Announce `member` every ttl_s / 3 until cancelled; a Redis outage is logged once and retried."""
        failing = False
        while True:
            try:
                await self.announce(member)
                if failing:
                    log.info("registry reachable again; %s re-announced", member.replica_id)
                failing = False
            except RegistryUnavailable as exc:
                if not failing:
                    log.warning("cannot announce %s to the registry: %s", member.replica_id, exc)
                failing = True
            await asyncio.sleep(self.ttl_s / 3)

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    async def _call(self, work: Awaitable[_T]) -> _T:
        with redis_unavailable(RegistryUnavailable):
            async with asyncio.timeout(self._timeout_s):
                return await work
