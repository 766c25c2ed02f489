"""The router's answer cache: look up, coalesce identical requests into one upstream call, store.

For a request the policy lets through, `begin()` answers one of:
    hit        the store has the answer
    coalesced  an identical request was already on its way; this one got the same answer
    miss       this request goes upstream; `Lookup.flight` must be finished with the answer (or None)
    bypass     not cacheable, or the store failed: straight upstream, nothing stored

Single-flight has two levels. Within a router, identical requests wait on one in-process future.
Across routers sharing Redis, the first router to take the store's lock leads and the others wait for
its published answer; a leader that dies holds them at most `lock_ttl_s`, after which they go
upstream themselves. A store that fails never fails a request: it is counted and bypassed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from cache.keys import cache_key
from cache.policy import CacheDecision, decide
from cache.store import CacheStore, CacheUnavailable
from qvl.settings import CacheSettings

log = logging.getLogger("qvl.cache")

Result = Literal["hit", "miss", "coalesced", "bypass"]
T = TypeVar("T")


class CacheableRequest(Protocol):
    """What the cache reads of a request (the router's edge builds one; cache/ knows nothing of the router)."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str:
        """The model version that will answer ("" when the router chose none): part of the key, so a
        version never answers from another's entries."""
        ...

    @property
    def doc(self) -> dict[str, Any]:
        """The parsed body; read-only."""
        ...

    @property
    def image_digests(self) -> tuple[str, ...]: ...


class CacheMetrics(Protocol):
    def record_cache_result(self, result: str) -> None: ...
    def record_cache_operation(self, op: str, store: str, seconds: float) -> None: ...
    def record_cache_stored(self, store: str) -> None: ...


class Flight:
    """A miss on its way upstream. `finish()` must be called exactly once, with the answer or None."""

    def __init__(self, cache: AnswerCache, key: str, decision: CacheDecision, locked: bool) -> None:
        self._cache = cache
        self._key = key
        self._decision = decision
        self._locked = locked
        self._owner = secrets.token_hex(8)
        self.done = False

    async def finish(self, entry: bytes | None) -> None:
        """Store the answer (if allowed and small enough), release followers here and on other routers."""
        if self.done:
            return
        self.done = True
        await self._cache._land(self, entry)


@dataclass
class Lookup:
    result: Result
    entry: bytes | None = None
    flight: Flight | None = None


class AnswerCache:
    """The cache as the router uses it; one per router process."""

    def __init__(self, store: CacheStore | None, settings: CacheSettings, metrics: CacheMetrics) -> None:
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._flights: dict[str, asyncio.Future[bytes | None]] = {}
        self._store_up = True

    def store_health(self) -> dict[str, bool]:
        """{store name: answered its last ping}; empty when the cache is off (for the metrics)."""
        return {} if self._store is None else {self._store.name: self._store_up}

    async def check_store(self) -> None:
        """Ping the store once and remember the answer; logs only when the state changes."""
        if self._store is None:
            return
        try:
            await self._store.ping()
        except CacheUnavailable as exc:
            if self._store_up:
                log.warning("cache store %s stopped answering: %s", self._store.name, exc)
            self._store_up = False
            return
        if not self._store_up:
            log.info("cache store %s answers again", self._store.name)
        self._store_up = True

    async def run_checks(self, interval_s: float) -> None:
        """Ping the store every interval_s until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await self.check_store()

    async def begin(self, request: CacheableRequest, cache_control: str | None) -> Lookup:
        """Decide, look up, and join or lead a flight; never raises for store failures."""
        store = self._store
        decision = decide(request.doc, cache_control, self._settings.deterministic_only)
        if store is None or not (decision.read or decision.write):
            return self._counted(Lookup("bypass"))
        revision = self._settings.model_revisions.get(request.model, "")
        if request.version:
            revision = f"{revision}@{request.version}"
        key = cache_key(request.doc, request.image_digests, revision)
        if not decision.read:
            # no-cache: fetch a fresh answer (and store it), without joining anyone's flight.
            return self._counted(Lookup("miss", flight=Flight(self, key, decision, locked=False)))
        leading_here = False
        try:
            entry = await self._timed("get", store.get(key))
            if entry is not None:
                return self._counted(Lookup("hit", entry))
            waiting = self._flights.get(key)
            if waiting is not None:
                entry = await asyncio.shield(waiting)
                if entry is not None:
                    return self._counted(Lookup("coalesced", entry))
                return self._counted(Lookup("miss", flight=Flight(self, key, decision, locked=False)))
            self._flights[key] = asyncio.get_running_loop().create_future()
            leading_here = True
            flight = Flight(self, key, decision, locked=True)
            if await self._timed("lock", store.try_lock(key, flight._owner, self._settings.lock_ttl_s)):
                return self._counted(Lookup("miss", flight=flight))
            entry = await self._timed("wait", store.wait_for(key, self._settings.lock_ttl_s))
        except CacheUnavailable as exc:
            self._metrics.record_cache_result("error")
            log.warning("cache %s unavailable, bypassing it: %s", store.name, exc)
            if leading_here:
                self._release_local(key, None)
            return Lookup("bypass")
        except BaseException:
            # Cancelled (the client left) while leading here: local followers must not wait forever.
            if leading_here:
                self._release_local(key, None)
            raise
        if entry is not None:
            self._release_local(key, entry)
            return self._counted(Lookup("coalesced", entry))
        # The other router's leader failed or died: this router goes upstream itself, still leading here.
        return self._counted(Lookup("miss", flight=Flight(self, key, decision, locked=False)))

    async def _land(self, flight: Flight, entry: bytes | None) -> None:
        store = self._store
        assert store is not None
        storable = entry is not None and flight._decision.write and len(entry) <= self._settings.max_entry_bytes
        self._release_local(flight._key, entry)
        if not storable and not flight._locked:
            return
        try:
            await self._timed(
                "publish",
                store.publish(flight._key, flight._owner, entry if storable else None, self._settings.ttl_s),
            )
            if storable:
                self._metrics.record_cache_stored(store.name)
        except CacheUnavailable as exc:
            self._metrics.record_cache_result("error")
            log.warning("cache %s unavailable, answer not stored: %s", store.name, exc)

    def _release_local(self, key: str, entry: bytes | None) -> None:
        waiting = self._flights.pop(key, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(entry)

    def _counted(self, lookup: Lookup) -> Lookup:
        self._metrics.record_cache_result(lookup.result)
        return lookup

    async def _timed(self, op: str, work: Awaitable[T]) -> T:
        assert self._store is not None
        started = asyncio.get_running_loop().time()
        try:
            return await work
        finally:
            self._metrics.record_cache_operation(op, self._store.name, asyncio.get_running_loop().time() - started)
