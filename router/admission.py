"""Backpressure: at most `admission.max_in_flight_per_replica` requests of this router on one replica, and a
bounded wait for a free slot. No queue here is unbounded.

When every healthy replica of a model is at its cap, a request waits (FIFO) until a slot frees, at most
`admission.queue_timeout_s`; when `admission.queue_size` requests already wait, it is refused at once.
Both refusals are 503 `overloaded` with Retry-After: the cluster, not the caller, is short of capacity.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from collections.abc import Callable

from qvl.settings import AdmissionSettings
from router.errors import Overloaded
from router.replicas import Replica


class Admission:
    def __init__(self, settings: AdmissionSettings) -> None:
        self.cap = settings.max_in_flight_per_replica
        self._queue_size = settings.queue_size
        self._timeout_s = settings.queue_timeout_s
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def open_slots(self, replicas: list[Replica]) -> list[Replica]:
        """The replicas below their cap."""
        return [r for r in replicas if r.in_flight < self.cap]

    async def admit(self, candidates: Callable[[], list[Replica]]) -> list[Replica]:
        """Replicas with a free slot, waiting in line for one when all are full (an empty list: the
        candidates themselves are gone). Raises Overloaded when the line is full or the wait runs out."""
        open_now = self.open_slots(candidates())
        if open_now or not candidates():
            return open_now
        if len(self._waiters) >= self._queue_size:
            raise Overloaded(
                "every replica is busy and the wait queue is full; retry shortly", code="queue_full", retry_after_s=1
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        first = True
        while True:
            waiter = loop.create_future()
            # A waiter woken for a slot someone else took goes back to the front, keeping its turn.
            (self._waiters.append if first else self._waiters.appendleft)(waiter)
            first = False
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self.released()  # the slot this waiter was woken for goes to the next one
                raise
            except TimeoutError:
                raise Overloaded(
                    f"no replica slot freed within {self._timeout_s:g} s; retry shortly",
                    code="queue_timeout",
                    retry_after_s=max(1, math.ceil(self._timeout_s / 2)),
                ) from None
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            current = candidates()
            open_now = self.open_slots(current)
            if open_now or not current:
                return open_now

    def released(self) -> None:
        """A slot freed somewhere: wake the longest waiter (it re-checks and may wait again)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
