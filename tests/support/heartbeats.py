"""Replicas' registry heartbeats (Registry.heartbeat) on an event loop in a thread of their own, for tests
that announce `qvl sim` replicas the way `qvl cluster`'s supervisors do."""

from __future__ import annotations

import asyncio
import threading
import time

from serving.registry import Member, Registry
from support.servers import Proc


class Heartbeats:
    """Announce replicas to the registry at `url` every ttl_s / 3 until close()."""

    def __init__(self, url: str, ttl_s: float) -> None:
        self._url = url
        self._ttl_s = ttl_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._registries: list[Registry] = []

    def beat(self, replica: Proc, replica_id: str, model: str) -> None:
        registry = Registry(self._url, ttl_s=self._ttl_s)
        self._registries.append(registry)
        member = Member(replica_id, model, replica.url, 1, "node-a", time.time())
        asyncio.run_coroutine_threadsafe(self._start(registry, member), self._loop).result(5)

    @staticmethod
    async def _start(registry: Registry, member: Member) -> None:
        asyncio.get_running_loop().create_task(registry.heartbeat(member))

    def close(self) -> None:
        async def stop() -> None:
            beating = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in beating:
                task.cancel()
            await asyncio.gather(*beating, return_exceptions=True)
            for registry in self._registries:
                await registry.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
