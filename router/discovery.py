"""Replica discovery from the registry: poll it, and make its members the pool's dynamic replicas.

While the registry cannot be read the last membership stays (health checks still eject dead replicas):
dropping every replica because Redis blinked would turn a cache outage into a full outage. For the same
reason, when the registry comes back after an outage, or comes back empty (its epoch changed: Redis
restarted without its data), members that have not re-announced yet are kept for one ttl_s, the time
their heartbeats take to fill it again. The router
announces itself there too (with the replicas' TTL heartbeat), and counts the live routers: while the
quota store is down each router enforces its share of a key's rate (router/quota.py). That count too
stays at its last value while the registry cannot be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from router.replicas import ReplicaPool
from serving.registry import Registry, RegistryUnavailable, RouterMember

log = logging.getLogger("qvl.router.discovery")


class RegistryWatch:
    """Polls the registry every `interval_s`; `up` tells whether the last read worked (a metric), `routers`
    how many routers were live at the last read that worked (0 before the first)."""

    def __init__(self, registry: Registry, pool: ReplicaPool, interval_s: float, me: RouterMember) -> None:
        self._registry = registry
        self._pool = pool
        self._interval_s = interval_s
        self._me = me
        self.up = False
        self.routers = 0
        self._read_once = False
        self._epoch: str | None = None
        self._kept: set[str] = set()
        self._grace_until = 0.0

    async def announce(self) -> None:
        """Announce this router once, so that the first read counts it; a failure is left to the heartbeat."""
        with contextlib.suppress(RegistryUnavailable):
            await self._registry.announce(self._me)

    async def refresh(self) -> None:
        """One read of the registry applied to the pool; new members get a health check at once."""
        try:
            epoch = await self._registry.epoch()
            members = await self._registry.members()
            routers = await self._registry.routers()
        except RegistryUnavailable as exc:
            if self.up:
                log.warning(
                    "cannot read the replica registry (%s); keeping the last membership of %d replica(s) "
                    "and %d router(s)",
                    exc,
                    len(self._pool.replicas),
                    self.routers,
                )
            self.up = False
            return
        if not self.up:
            log.info("replica registry read: %d member(s), %d router(s)", len(members), len(routers))
        now = time.monotonic()
        if self._read_once and (not self.up or epoch != self._epoch):
            self._grace_until = now + self._registry.ttl_s
            if epoch != self._epoch:
                log.warning("the replica registry lost its data; keeping members for %.0fs", self._registry.ttl_s)
        self._read_once, self._epoch, self.up = True, epoch, True
        self.routers = len(routers)
        urls = {m.url for m in members}
        if now < self._grace_until:
            # Members that have not re-announced since the outage: kept until their heartbeat had time.
            urls |= self._kept
        self._kept = urls
        added = self._pool.sync(urls)
        if added:
            await self._pool.check_all(added)

    async def close(self) -> None:
        """Withdraw this router (others stop counting it at once) and close the registry client."""
        with contextlib.suppress(RegistryUnavailable):
            await self._registry.withdraw_router(self._me.router_id)
        await self._registry.close()

    async def run(self) -> None:
        """Announce this router every ttl_s / 3 and refresh every interval_s, forever; cancel to stop."""
        beat = asyncio.create_task(self._registry.heartbeat(self._me), name="router-heartbeat")
        try:
            while True:
                await self.refresh()
                await asyncio.sleep(self._interval_s)
        finally:
            beat.cancel()
            await asyncio.gather(beat, return_exceptions=True)
