"""The routes and rollouts of a lone router without Redis: the same operations as the Redis store
(router/rollout/store.py), in this process. Nothing survives a restart and no other router sees them;
for a cluster, or to keep a rollout across restarts, give `router.rollout.store` (or `registry.url`)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from router.rollout.store import EVENTS_KEPT
from router.routes import Route

SAMPLES_KEPT = 200_000
"""Per list; the oldest go first (a step's analysis reads the last window_s seconds anyway)."""


class MemoryRolloutStore:
    def __init__(self) -> None:
        self._routes: dict[str, Route] = {}
        self._revision = 0
        self._states: dict[str, dict[str, Any]] = {}
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._samples: dict[str, list[bytes]] = {}
        self._pins: dict[str, tuple[str, float]] = {}

    async def routes_revision(self) -> str:
        return str(self._revision)

    async def routes(self) -> tuple[dict[str, Route], str]:
        return dict(self._routes), str(self._revision)

    async def put_route(self, route: Route) -> None:
        self._routes[route.model] = route
        self._revision += 1

    async def delete_route(self, model: str) -> None:
        self._routes.pop(model, None)
        self._revision += 1

    async def state(self, model: str) -> dict[str, Any] | None:
        found = self._states.get(model)
        return dict(found) if found is not None else None

    async def states(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self._states.values()]

    async def put_state(self, state: dict[str, Any], route: Route | None = None) -> None:
        self._states[str(state["model"])] = dict(state)
        if route is not None:
            await self.put_route(route)

    async def add_event(self, model: str, event: dict[str, Any]) -> None:
        events = self._events.setdefault(model, [])
        events.insert(0, event)
        del events[EVENTS_KEPT:]

    async def events(self, model: str, count: int = 50) -> list[dict[str, Any]]:
        return list(self._events.get(model, [])[:count])

    async def add_samples(self, lines: Mapping[str, Sequence[bytes]]) -> None:
        for suffix, batch in lines.items():
            kept = self._samples.setdefault(suffix, [])
            kept.extend(batch)
            if len(kept) > SAMPLES_KEPT:
                del kept[: len(kept) - SAMPLES_KEPT]

    async def samples(self, suffix: str) -> list[bytes]:
        return list(self._samples.get(suffix, []))

    async def pin(self, model: str, session_hash: str, version: str, ttl_s: float) -> str | None:
        key = f"{model}\x1f{session_hash}"
        now = time.monotonic()
        found = self._pins.get(key)
        if found is not None and found[1] > now:
            return found[0]
        if len(self._pins) > 100_000:
            self._pins = {k: v for k, v in self._pins.items() if v[1] > now}
        self._pins[key] = (version, now + ttl_s)
        return None

    async def repin(self, model: str, session_hash: str, version: str, ttl_s: float) -> None:
        self._pins[f"{model}\x1f{session_hash}"] = (version, time.monotonic() + ttl_s)

    async def hold_lease(self, owner: str, lease_s: float) -> bool:
        return True

    async def close(self) -> None:
        return None
