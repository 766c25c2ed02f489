"""The replica registry in Redis: replicas announce themselves with a TTL heartbeat; routers read the live set.

Layout (under a key prefix, `qvl:` by default):
    registry:members   sorted set: replica id -> the time (Redis' clock) its announcement expires
    registry:info      hash: replica id -> JSON {model, url, tensor_parallel_size, node, started_at, pool, version}
    registry:routers   sorted set: router id -> expiry, as for replicas
    registry:router_info   hash: router id -> JSON {router_id, url, started_at}
    registry:epoch     when this registry's data began (set by the first announcement, never expires): a
                       reader that sees it change or vanish knows Redis lost the registry (a restart
                       without persistence), not that its members left

Routers announce themselves the same way, in keys of their own, so that each knows how many routers
share a key's quota when the quota store is down (router/quota.py).

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

from qvl.redis_client import redis_client
from qvl.redis_errors import REDIS_FAILURES, redis_unavailable

log = logging.getLogger("qvl.registry")
_T = TypeVar("_T")

# KEYS: members, info, epoch. ARGV: id, ttl seconds, info JSON.
_ANNOUNCE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SET', KEYS[3], t[1] .. '.' .. t[2], 'NX')
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
    pool: str = ""
    """The pool the replica belongs to ("" outside pools); its `model` is then the pool's public name."""
    version: str = ""
    """The pool's version label ("" outside pools)."""


@dataclass(frozen=True, slots=True)
class RouterMember:
    """One router as it announces itself."""

    router_id: str
    url: str
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
        self._router_keys = [f"{key_prefix}registry:routers", f"{key_prefix}registry:router_info"]
        self._epoch_key = f"{key_prefix}registry:epoch"
        self._announce = self._client.register_script(_ANNOUNCE)
        self._live = self._client.register_script(_LIVE)

    async def announce(self, member: Member | RouterMember) -> None:
        """Add or refresh `member` (a replica or a router) for another ttl_s seconds."""
        keys, member_id = self._keys_of(member)
        info = orjson.dumps(asdict(member))
        await self._call(self._announce(keys=[*keys, self._epoch_key], args=[member_id, self.ttl_s, info]))

    async def withdraw(self, replica_id: str) -> None:
        """Remove a replica at once (a clean shutdown; a crash just stops the heartbeat)."""
        await self._withdraw(self._keys, replica_id)

    async def withdraw_router(self, router_id: str) -> None:
        """Remove a router at once (its clean shutdown)."""
        await self._withdraw(self._router_keys, router_id)

    async def _withdraw(self, keys: list[str], member_id: str) -> None:
        members, info = keys

        async def both() -> None:
            await self._client.zrem(members, member_id)
            await self._client.hdel(info, member_id)

        await self._call(both())

    async def members(self) -> list[Member]:
        """Every replica whose announcement has not expired, sorted by replica id."""
        found = [Member(**orjson.loads(raw)) for raw in await self._live_rows(self._keys)]
        return sorted(found, key=lambda m: m.replica_id)

    async def routers(self) -> list[RouterMember]:
        """Every router whose announcement has not expired, sorted by router id."""
        found = [RouterMember(**orjson.loads(raw)) for raw in await self._live_rows(self._router_keys)]
        return sorted(found, key=lambda m: m.router_id)

    async def epoch(self) -> str | None:
        """When this registry's data began (None before the first announcement): it changes only when Redis
        lost the registry, so a reader can tell lost data from members that left."""
        raw: bytes | str | None = await self._call(self._client.get(self._epoch_key))
        return raw.decode() if isinstance(raw, bytes) else raw

    async def _live_rows(self, keys: list[str]) -> list[Any]:
        rows: list[Any] = await self._call(self._live(keys=keys))
        # None: announced, then withdrawn between the two reads of the script: not a member.
        return [raw for raw in rows if raw is not None]

    async def heartbeat(self, member: Member | RouterMember) -> None:
        """Announce `member` every ttl_s / 3 until cancelled; a Redis outage is logged once and retried."""
        _, member_id = self._keys_of(member)
        failing = False
        while True:
            try:
                await self.announce(member)
                if failing:
                    log.info("registry reachable again; %s re-announced", member_id)
                failing = False
            except RegistryUnavailable as exc:
                if not failing:
                    log.warning("cannot announce %s to the registry: %s", member_id, exc)
                failing = True
            await asyncio.sleep(self.ttl_s / 3)

    def _keys_of(self, member: Member | RouterMember) -> tuple[list[str], str]:
        if isinstance(member, RouterMember):
            return self._router_keys, member.router_id
        return self._keys, member.replica_id

    async def close(self) -> None:
        with contextlib.suppress(*REDIS_FAILURES):
            await self._client.aclose()

    async def _call(self, work: Awaitable[_T]) -> _T:
        with redis_unavailable(RegistryUnavailable):
            async with asyncio.timeout(self._timeout_s):
                return await work
