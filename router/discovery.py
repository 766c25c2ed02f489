"""Replica discovery from the registry: poll it, and make its members the pool's dynamic replicas.

While the registry cannot be read the last membership stays (health checks still eject dead replicas):
dropping every replica because Redis blinked would turn a cache outage into a full outage.
"""

from __future__ import annotations

import asyncio
import logging

from router.replicas import ReplicaPool
from serving.registry import Registry, RegistryUnavailable

log = logging.getLogger("qvl.router.discovery")


class RegistryWatch:
    """Polls the registry every `interval_s`; `up` tells whether the last read worked (a metric)."""

    def __init__(self, registry: Registry, pool: ReplicaPool, interval_s: float) -> None:
        self._registry = registry
        self._pool = pool
        self._interval_s = interval_s
        self.up = False

    async def refresh(self) -> None:
        """One read of the registry applied to the pool; new members get a health check at once."""
        try:
            members = await self._registry.members()
        except RegistryUnavailable as exc:
            if self.up:
                log.warning(
                    "cannot read the replica registry (%s); keeping the last membership of %d replica(s)",
                    exc,
                    len(self._pool.replicas),
                )
            self.up = False
            return
        if not self.up:
            log.info("replica registry read: %d member(s)", len(members))
        self.up = True
        added = self._pool.sync({m.url for m in members})
        if added:
            await self._pool.check_all(added)

    async def close(self) -> None:
        await self._registry.close()

    async def run(self) -> None:
        """Refresh forever; cancel to stop."""
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval_s)
