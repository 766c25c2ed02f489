"""What a router does for routes and rollouts: apply the routes Redis holds (polled every
poll_interval_s), keep sessions on their version, buffer its answers' timings for the analysis and
write them every flush_interval_s, and, holding the lease, run the analysis (router/rollout/controller.py).

Without a store (no Redis) the routes are the settings' and nothing is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict

from qvl.periodic import every
from qvl.settings import RolloutSettings
from router.rollout.analysis import sample_line
from router.rollout.store import Store, StoreUnavailable
from router.routes import Choice, Route, RouteTable

log = logging.getLogger("qvl.router.rollout")
PINS_KEPT = 100_000


class Rollouts:
    def __init__(self, table: RouteTable, store: Store | None, settings: RolloutSettings) -> None:
        self.table = table
        self.store = store
        self._settings = settings
        self._buffer: dict[str, list[bytes]] = {}
        self._pins: OrderedDict[str, str] = OrderedDict()
        self.store_up = store is not None
        self.dropped_samples = 0

    async def pin(self, choice: Choice) -> Choice:
        """The choice, or the version this session was given before while that one still has weight."""
        route = choice.route
        if route is None or sum(1 for _, w in route.versions if w > 0) < 2:
            return choice
        digest = hashlib.blake2b(choice.key, digest_size=12).hexdigest()
        remembered = await self._remembered(route, digest, choice.version)
        if remembered is None or remembered == choice.version:
            return choice
        if route.weight_of(remembered) > 0:
            shadow = choice.shadow if choice.shadow != remembered else None
            return Choice(remembered, f"{route.model}@{remembered}", shadow, route, choice.key)
        await self._repin(route, digest, choice.version)
        return choice

    async def _remembered(self, route: Route, digest: str, version: str) -> str | None:
        ttl = self._settings.sticky_ttl_s
        if self.store is not None and self.store_up:
            try:
                return await self.store.pin(route.model, digest, version, ttl)
            except StoreUnavailable as exc:
                # Until the next route poll works, pins are this router's own: requests never wait on a
                # store that is down, and the hash still gives every router the same choice.
                log.warning("cannot read session pins (%s); pinning in this router until the store answers", exc)
                self.store_up = False
        key = f"{route.model}\x1f{digest}"
        found = self._pins.get(key)
        if found is None:
            self._pins[key] = version
            if len(self._pins) > PINS_KEPT:
                self._pins.popitem(last=False)
        else:
            self._pins.move_to_end(key)
        return found

    async def _repin(self, route: Route, digest: str, version: str) -> None:
        self._pins[f"{route.model}\x1f{digest}"] = version
        if self.store is not None and self.store_up:
            with contextlib.suppress(StoreUnavailable):
                await self.store.repin(route.model, digest, version, self._settings.sticky_ttl_s)

    def observe(self, route: Route, version: str, ok: bool, ttft_s: float, e2e_s: float) -> None:
        """One answer of a route a rollout owns, for its analysis."""
        if not route.rollout or self.store is None:
            return
        self._buffer.setdefault("samples:" + route.rollout, []).append(
            sample_line(version, ok, ttft_s, e2e_s, time.time())
        )

    def observe_shadow(self, route: Route, version: str, same: bool) -> None:
        if not route.rollout or self.store is None:
            return
        line = f"{version} {int(same)} {time.time():.3f}".encode()
        self._buffer.setdefault("shadow:" + route.rollout, []).append(line)

    async def refresh(self) -> None:
        """Read the routes when their revision moved."""
        if self.store is None:
            return
        try:
            revision = await self.store.routes_revision()
            if revision != self.table.revision:
                routes, revision = await self.store.routes()
                for model in self.table.apply(routes, revision):
                    route = self.table.routes.get(model)
                    log.info("route of %s is now %s", model, _describe(route))
            if not self.store_up:
                log.info("route store answers again")
            self.store_up = True
        except StoreUnavailable as exc:
            if self.store_up:
                log.warning("cannot read the routes (%s); keeping the last ones", exc)
            self.store_up = False

    async def flush(self) -> None:
        if self.store is None or not self._buffer:
            return
        batch, self._buffer = self._buffer, {}
        try:
            await self.store.add_samples(batch)
        except StoreUnavailable as exc:
            self.dropped_samples += sum(len(v) for v in batch.values())
            log.warning("rollout samples not written (%s): %d dropped", exc, self.dropped_samples)

    async def run(self) -> None:
        """Poll the routes and write the samples, forever; cancel to stop."""
        async with asyncio.TaskGroup() as group:
            group.create_task(every(self._settings.poll_interval_s, self.refresh, log, "rollout route poll"))
            group.create_task(every(self._settings.flush_interval_s, self.flush, log, "rollout sample flush"))

    async def close(self) -> None:
        await self.flush()
        if self.store is not None:
            await self.store.close()


def _describe(route: Route | None) -> str:
    if route is None:
        return "gone"
    return ", ".join(f"{v} {w:g}" for v, w in route.versions)
