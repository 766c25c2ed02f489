"""The shared answer store: Redis, with a cross-router single-flight lock and pub/sub wake-ups.

Keys, for a cache key K and the configured prefix P: `P a:K` holds the answer (with a PX TTL),
`P l:K` the leader's lock (its value is the owner, with a PX TTL) and channel `P c:K` carries the
leader's result to followers: the answer's bytes, or b"" meaning "the leader failed, go yourself".

Every Redis call runs under `asyncio.timeout(timeout_s)` and every failure of the store (timeout,
refused or reset connection, an error reply, an exhausted pool) comes out as CacheUnavailable, so
callers have one exception to catch and a slow or dead Redis costs a request at most timeout_s per
call. redis-py reconnects on the next command, so a restarted Redis needs no new store, and a store on
a Sentinel URL asks the sentinels for the new primary after a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from cache.store import CacheUnavailable
from qvl.redis_client import redis_client
from qvl.redis_errors import REDIS_FAILURES, redis_unavailable

_T = TypeVar("_T")

POLL_S = 0.05
"""How long a follower waits for a message before checking that the leader's lock still exists."""

# Store the answer (if any), wake followers, then drop the lock only if this owner still holds it
# (it may have expired and been taken by a new leader). One script: one round trip, and followers
# can never see the lock gone before the answer is there.
_PUBLISH = """
if ARGV[4] == '1' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
redis.call('PUBLISH', ARGV[5], ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('DEL', KEYS[2])
end
return 1
"""


class RedisStore:
    """CacheStore in Redis, shared by every router of a cluster; every method may raise CacheUnavailable."""

    name: str = "redis"

    def __init__(self, client: Redis, subscriber: Redis, *, timeout_s: float, key_prefix: str) -> None:
        """Wrap two clients: `client` runs commands, `subscriber` lends the connections followers listen on.

        They must not share a pool: a follower holds its subscribed connection while it waits, and
        still needs another for GET and EXISTS. The store closes both in close().
        """
        self._client = client
        self._subscriber = subscriber
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._publish = client.register_script(_PUBLISH)

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float, pool_size: int, key_prefix: str) -> RedisStore:
        """A store on `url` (any form of qvl/redis_client.py: redis://, rediss://, unix://, redis+sentinel://).

        Up to pool_size connections run commands and up to pool_size more hold waiting followers.
        Nothing connects until the first call. A call that finds every connection busy waits up to
        timeout_s for one, then raises CacheUnavailable. On Sentinel, a failover is followed by itself.
        """

        def client() -> Redis:
            return redis_client(url, max_connections=pool_size, pool_timeout_s=timeout_s, socket_timeout_s=timeout_s)

        return cls(client(), client(), timeout_s=timeout_s, key_prefix=key_prefix)

    async def get(self, key: str) -> bytes | None:
        """The answer, or None when absent or expired."""
        return _bytes_or_none(await self._call(lambda: self._client.get(self._answer(key))))

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store the answer for ttl_s seconds (at least 1 ms)."""
        await self._call(lambda: self._client.set(self._answer(key), value, px=_ms(ttl_s)))

    async def try_lock(self, key: str, owner: str, ttl_s: float) -> bool:
        """SET NX PX: True if `owner` is now the leader for `key` (until it publishes or ttl_s passes)."""
        return bool(await self._call(lambda: self._client.set(self._lock(key), owner, nx=True, px=_ms(ttl_s))))

    async def publish(self, key: str, owner: str, value: bytes | None, ttl_s: float) -> None:
        """Store `value` (unless None), wake every follower with it (b"" for None), drop `owner`'s lock."""
        keys = [self._answer(key), self._lock(key)]
        stored = 1 if value is not None else 0
        args: list[str | bytes | int] = [owner, value or b"", _ms(ttl_s), stored, self._channel(key)]
        await self._call(lambda: self._publish(keys=keys, args=args))

    async def wait_for(self, key: str, timeout_s: float) -> bytes | None:
        """Wait up to timeout_s for the leader's answer; None if it failed, its lock vanished, or time ran out.

        Holds one subscriber connection while it waits; each Redis call inside is bounded by the
        store's timeout, the whole wait by timeout_s.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pubsub = self._subscriber.pubsub()
        try:
            await self._call(lambda: _subscribe(pubsub, self._channel(key)))
            # Subscribed before this GET: an answer published earlier is stored, a later one is a message.
            value = await self.get(key)
            while value is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                wait = min(POLL_S, remaining)
                listen = functools.partial(pubsub.get_message, ignore_subscribe_messages=True, timeout=wait)
                message = await self._call(listen, extra_s=wait)
                if message is not None and message.get("type") in ("message", b"message"):
                    # b"" is the leader saying it failed: the follower goes to a replica itself.
                    return _bytes_or_none(message.get("data")) or None
                if message is None and not await self._call(lambda: self._client.exists(self._lock(key))):
                    # No leader any more (it published while we were not looking, or died and its lock
                    # expired): whatever is stored now is all there will be.
                    return await self.get(key)
            return value
        finally:
            # Shielded so that a cancelled follower still returns its connection to the pool.
            await asyncio.shield(self._close_pubsub(pubsub))

    async def ping(self) -> None:
        """PING under the store's timeout."""
        await self._call(self._client.ping)

    async def entries(self) -> int | None:
        """None: counting this prefix's keys needs a SCAN of the whole keyspace, too slow for a gauge."""
        return None

    async def close(self) -> None:
        """Disconnect every pooled connection; the store is unusable afterwards."""
        for client in (self._client, self._subscriber):
            # Closing a connection to a dead server can fail; there is nothing left to release then.
            with contextlib.suppress(*REDIS_FAILURES):
                await client.aclose()

    async def _call(self, op: Callable[[], Awaitable[_T]], extra_s: float = 0.0) -> _T:
        with redis_unavailable(CacheUnavailable):
            async with asyncio.timeout(self._timeout_s + extra_s):
                return await op()

    async def _close_pubsub(self, pubsub: PubSub) -> None:
        with contextlib.suppress(*REDIS_FAILURES):
            # redis-py leaves PubSub.aclose unannotated.
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _answer(self, key: str) -> str:
        return f"{self._prefix}a:{key}"

    def _lock(self, key: str) -> str:
        return f"{self._prefix}l:{key}"

    def _channel(self, key: str) -> str:
        return f"{self._prefix}c:{key}"


async def _subscribe(pubsub: PubSub, channel: str) -> None:
    # SUBSCRIBE only sends the command; its confirmation proves Redis registered us, so that no
    # publish after our next GET can be missed.
    await pubsub.subscribe(channel)
    while True:
        message: dict[str, Any] | None = await pubsub.get_message(timeout=None)
        if message is not None and message.get("type") in ("subscribe", b"subscribe"):
            return


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _bytes_or_none(value: object) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise CacheUnavailable(f"redis: unexpected reply type {type(value).__name__}")
