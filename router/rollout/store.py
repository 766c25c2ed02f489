"""Routes, rollouts and their samples in Redis: what every router reads and the analysing one writes.

Layout (under router.rollout.key_prefix, `qvl:rollout:` by default):
    routes          hash: model -> route JSON (router/routes.py Route.to_doc)
    routes:rev      counter, raised on every change of `routes`: routers poll it and re-read on a change
    state:MODEL     the model's rollout (router/rollout/state.py), the last one kept after it ends
    samples:ID:STEP list of one line per answer during a rollout's step: "version ok ttft_s e2e_s unix"
    shadow:ID:STEP  list of one line per shadow comparison: "version same unix"
    events:MODEL    list of the rollout's decisions (JSON), newest first, the last 200
    sticky:MODEL:H  the version a session was given (SET NX; expires after sticky_ttl_s)
    lease           the analysing router's id (SET NX PX lease_s)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import orjson

from qvl.redis_client import redis_client
from qvl.redis_errors import REDIS_FAILURES, redis_unavailable
from router.routes import Route

_T = TypeVar("_T")
SAMPLES_TTL_S = 7 * 24 * 3600
EVENTS_KEPT = 200

# KEYS: lease. ARGV: owner, ttl ms. Take the lease if free, renew it if ours; 1 when we hold it.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
return 0
"""


class StoreUnavailable(Exception):
    """Redis did not answer in time or could not be reached."""


class Store(Protocol):
    """What routers keep of routes and rollouts: in Redis (RolloutStore), or in a lone router's memory
    (router/rollout/memory.py). Every method of the Redis one may raise StoreUnavailable."""

    async def routes_revision(self) -> str: ...
    async def routes(self) -> tuple[dict[str, Route], str]: ...
    async def put_route(self, route: Route) -> None: ...
    async def delete_route(self, model: str) -> None: ...
    async def state(self, model: str) -> dict[str, Any] | None: ...
    async def states(self) -> list[dict[str, Any]]: ...
    async def put_state(self, state: dict[str, Any], route: Route | None = None) -> None: ...
    async def add_event(self, model: str, event: dict[str, Any]) -> None: ...
    async def events(self, model: str, count: int = 50) -> list[dict[str, Any]]: ...
    async def add_samples(self, lines: Mapping[str, Sequence[bytes]]) -> None: ...
    async def samples(self, suffix: str) -> list[bytes]: ...
    async def pin(self, model: str, session_hash: str, version: str, ttl_s: float) -> str | None: ...
    async def repin(self, model: str, session_hash: str, version: str, ttl_s: float) -> None: ...
    async def hold_lease(self, owner: str, lease_s: float) -> bool: ...
    async def close(self) -> None: ...


class RolloutStore:
    """Every method may raise StoreUnavailable."""

    def __init__(self, url: str, *, key_prefix: str, timeout_s: float = 1.0) -> None:
        self._client = redis_client(url, max_connections=8, pool_timeout_s=timeout_s, socket_timeout_s=timeout_s)
        self._p = key_prefix
        self._timeout_s = timeout_s
        self._lease = self._client.register_script(_LEASE)

    # Routes ---------------------------------------------------------------------------------------
    async def routes_revision(self) -> str:
        raw = await self._call(self._client.get(self._p + "routes:rev"))
        return _text(raw) or "0"

    async def routes(self) -> tuple[dict[str, Route], str]:
        """Every stored route and the revision read with them."""

        async def both() -> tuple[Any, Any]:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._p + "routes")
                pipe.get(self._p + "routes:rev")
                found, rev = await pipe.execute()
                return found, rev

        found, rev = await self._call(both())
        routes = {_text(m): Route.from_doc(orjson.loads(doc)) for m, doc in found.items()}
        return routes, _text(rev) or "0"

    async def put_route(self, route: Route) -> None:
        await self._write_route(route.model, orjson.dumps(route.to_doc()))

    async def delete_route(self, model: str) -> None:
        await self._write_route(model, None)

    async def _write_route(self, model: str, doc: bytes | None) -> None:
        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                if doc is None:
                    pipe.hdel(self._p + "routes", model)
                else:
                    pipe.hset(self._p + "routes", model, doc)
                pipe.incr(self._p + "routes:rev")
                await pipe.execute()

        await self._call(write())

    # Rollout state --------------------------------------------------------------------------------
    async def state(self, model: str) -> dict[str, Any] | None:
        raw = await self._call(self._client.get(self._p + "state:" + model))
        return None if raw is None else dict(orjson.loads(raw))

    async def states(self) -> list[dict[str, Any]]:
        """Every model's last rollout."""

        async def read() -> list[Any]:
            keys = [k async for k in self._client.scan_iter(match=self._p + "state:*", count=100)]
            return list(await self._client.mget(keys)) if keys else []

        raws = await self._call(read())
        return [dict(orjson.loads(r)) for r in raws if r is not None]

    async def put_state(self, state: dict[str, Any], route: Route | None = None) -> None:
        """Write a rollout's state, and its route in the same transaction when given."""

        async def write() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.set(self._p + "state:" + str(state["model"]), orjson.dumps(state))
                if route is not None:
                    pipe.hset(self._p + "routes", route.model, orjson.dumps(route.to_doc()))
                    pipe.incr(self._p + "routes:rev")
                await pipe.execute()

        await self._call(write())

    async def add_event(self, model: str, event: dict[str, Any]) -> None:
        async def write() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.lpush(self._p + "events:" + model, orjson.dumps(event))
                pipe.ltrim(self._p + "events:" + model, 0, EVENTS_KEPT - 1)
                await pipe.execute()

        await self._call(write())

    async def events(self, model: str, count: int = 50) -> list[dict[str, Any]]:
        raws = await self._call(self._client.lrange(self._p + "events:" + model, 0, count - 1))
        return [dict(orjson.loads(r)) for r in raws]

    # Samples --------------------------------------------------------------------------------------
    async def add_samples(self, lines: Mapping[str, Sequence[bytes]]) -> None:
        """Append sample lines to their lists (key suffix -> lines), in one round trip."""

        async def write() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for suffix, batch in lines.items():
                    pipe.rpush(self._p + suffix, *batch)
                    pipe.expire(self._p + suffix, SAMPLES_TTL_S)
                await pipe.execute()

        await self._call(write())

    async def samples(self, suffix: str) -> list[bytes]:
        raws = await self._call(self._client.lrange(self._p + suffix, 0, -1))
        return [r if isinstance(r, bytes) else r.encode() for r in raws]

    # Stickiness and the lease ---------------------------------------------------------------------
    async def pin(self, model: str, session_hash: str, version: str, ttl_s: float) -> str | None:
        """Remember `version` for the session unless one is remembered; returns the remembered one
        (None: none was, `version` is now)."""
        key = f"{self._p}sticky:{model}:{session_hash}"
        raw = await self._call(self._client.set(key, version, nx=True, get=True, ex=max(1, int(ttl_s))))
        return _text(raw) if raw is not None else None

    async def repin(self, model: str, session_hash: str, version: str, ttl_s: float) -> None:
        key = f"{self._p}sticky:{model}:{session_hash}"
        await self._call(self._client.set(key, version, ex=max(1, int(ttl_s))))

    async def hold_lease(self, owner: str, lease_s: float) -> bool:
        held = await self._call(self._lease(keys=[self._p + "lease"], args=[owner, int(lease_s * 1000)]))
        return bool(held)

    async def close(self) -> None:
        with contextlib.suppress(*REDIS_FAILURES):
            await self._client.aclose()

    async def _call(self, work: Awaitable[_T]) -> _T:
        with redis_unavailable(StoreUnavailable):
            async with asyncio.timeout(self._timeout_s):
                return await work


def _text(raw: Any) -> str:
    if raw is None:
        return ""
    return raw.decode() if isinstance(raw, bytes) else str(raw)
