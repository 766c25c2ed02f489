"""Rollout operations and the analysis loop.

Any router takes an operation (`qvl rollout start|pause|resume|abort|promote`, over HTTP) and writes
the new state with its route in one transaction. The analysis runs in the one router holding the lease
(renewed every interval_s, taken over by another within lease_s of its holder's death): every interval_s
it reads each running rollout's samples of its current step from every router, analyses them
(router/rollout/analysis.py) and advances, holds or aborts. Every decision that changes something is
logged, counted (qvl_rollout_decisions_total), written to the rollout's events and to the audit log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from qvl.settings import RolloutSettings
from router.errors import Conflict, InvalidRequest, NotFound, RolloutStoreUnavailable
from router.rollout import steps as st
from router.rollout.analysis import ABORT, ADVANCE, Analysis, Sample, analyse, parse_sample
from router.rollout.store import Store, StoreUnavailable
from router.routes import Route, RouteTable

log = logging.getLogger("qvl.router.rollout")

Decided = Callable[[str, str, str, str, str], Awaitable[None]]
"""(model, decision, by, cause, message): metrics and audit of one decision. `by` is analysis or operator;
`cause` a bounded label: operator, checks_passed, or the failed checks' names joined by "+"."""


class Controller:
    def __init__(
        self,
        store: Store | None,
        table: RouteTable,
        settings: RolloutSettings,
        owner: str,
        served: Callable[[], frozenset[str]],
        decided: Decided,
    ) -> None:
        self._store = store
        self._table = table
        self._settings = settings
        self._owner = owner
        self._served = served
        self._decided = decided
        self.leading = False

    def _need_store(self) -> Store:
        if self._store is None:
            raise RolloutStoreUnavailable("this router has no rollout store", code="rollout_store_unavailable")
        return self._store

    # Operations -----------------------------------------------------------------------------------
    async def start(
        self,
        model: str,
        target: str,
        steps: list[float] | None,
        min_requests: int | None,
        min_duration_s: float | None,
        shadow: float | None,
        actor: str,
    ) -> dict[str, Any]:
        store = self._need_store()
        route = self._table.routes.get(model)
        if route is None:
            raise NotFound(f"model '{model}' has no route (no pool or router.routes entry)", code="rollout_not_found")
        chosen = steps or list(self._settings.steps)
        if not chosen or chosen[-1] != 100 or any(not 0 < s <= 100 for s in chosen) or sorted(set(chosen)) != chosen:
            raise InvalidRequest("steps must be increasing percentages ending at 100", code="invalid_rollout")
        if f"{model}@{target}" not in self._served():
            raise InvalidRequest(
                f"no replica serves version '{target}' of '{model}'", code="invalid_rollout", param="to"
            )
        if target == max(route.versions, key=lambda vw: vw[1])[0]:
            raise InvalidRequest(f"'{target}' already takes the most of '{model}'", code="invalid_rollout")
        current = await self._call(store.state(model))
        if current is not None and current["status"] in st.ACTIVE:
            raise Conflict(
                f"a rollout of '{model}' is {current['status']}; abort or promote it first", code="rollout_active"
            )
        state, new_route = st.new_rollout(
            route,
            target,
            chosen,
            min_requests=min_requests or self._settings.min_requests,
            min_duration_s=self._settings.min_duration_s if min_duration_s is None else min_duration_s,
            shadow=self._settings.shadow if shadow is None else shadow,
            now=time.time(),
        )
        await self._write(store, state, new_route, "start", "operator", "operator", f"{actor}: {state['reason']}")
        return state

    async def act(self, model: str, action: str, actor: str) -> dict[str, Any]:
        store = self._need_store()
        state = await self._call(store.state(model))
        if state is None:
            raise NotFound(f"no rollout of '{model}'", code="rollout_not_found")
        now = time.time()
        status = state["status"]
        if status not in st.ACTIVE:
            raise Conflict(f"the rollout of '{model}' is {status}", code="rollout_ended")
        if action == "pause" and status == st.RUNNING:
            state = st.paused(state, f"paused by {actor}", now)
        elif action == "resume" and status == st.PAUSED:
            state = st.resumed(state, f"resumed by {actor}", now)
        elif action == "abort":
            state = st.aborted(state, f"aborted by {actor}", now)
        elif action == "promote":
            state = st.promoted(state, f"promoted by {actor}", now)
        else:
            raise Conflict(f"cannot {action} a rollout that is {status}", code="rollout_ended")
        await self._write(store, state, st.route_of(state), action, "operator", "operator", state["reason"])
        return state

    async def status(self, model: str) -> dict[str, Any]:
        store = self._need_store()
        state = await self._call(store.state(model))
        if state is None:
            raise NotFound(f"no rollout of '{model}'", code="rollout_not_found")
        events = await self._call(store.events(model))
        return {**state, "events": events, **self._routes(state)}

    async def list(self) -> list[dict[str, Any]]:
        store = self._need_store()
        states = await self._call(store.states())
        return [{**s, **self._routes(s)} for s in sorted(states, key=lambda s: str(s["model"]))]

    def _routes(self, state: dict[str, Any]) -> dict[str, Any]:
        """The route the rollout set (`route`) and the one this router applies now (`applied_here`; the same
        once it has polled, within poll_interval_s)."""
        applied = self._table.routes.get(str(state["model"]))
        return {"route": st.route_of(state).to_doc(), "applied_here": None if applied is None else applied.to_doc()}

    # The analysis ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Hold the lease and analyse every running rollout, every interval_s, forever."""
        store = self._store
        if store is None:
            return
        while True:
            started = time.monotonic()
            try:
                self.leading = await store.hold_lease(self._owner, self._settings.lease_s)
                if self.leading:
                    for state in await store.states():
                        if state["status"] == st.RUNNING:
                            await self.tick(store, state)
            except StoreUnavailable as exc:
                self.leading = False
                log.warning("rollout analysis skipped: %s", exc)
            except Exception:
                log.exception("rollout analysis failed")
            await asyncio.sleep(max(0.0, self._settings.interval_s - (time.monotonic() - started)))

    async def tick(self, store: Store, state: dict[str, Any]) -> Analysis:
        """One analysis of a running rollout, and what it decides."""
        now = time.time()
        suffix = f"{state['id']}:{state['step']}"
        since = now - self._settings.window_s
        samples = [s for s in map(parse_sample, await store.samples("samples:" + suffix)) if s is not None]
        samples = [s for s in samples if s.at >= since]
        shadow = [_shadow(line) for line in await store.samples("shadow:" + suffix)]
        settings = self._settings.model_copy(
            update={"min_requests": state["min_requests"], "min_duration_s": state["min_duration_s"]}
        )
        analysis = analyse(
            samples,
            [c for c in shadow if c is not None],
            state["target"],
            state["baseline"],
            settings,
            now - state["step_started"],
        )
        latest = await store.state(state["model"])
        if (
            latest is None
            or latest.get("id") != state["id"]
            or latest["status"] != st.RUNNING
            or latest["step"] != state["step"]
        ):
            return analysis  # an operator acted meanwhile: theirs stands
        doc = analysis.to_doc()
        if analysis.decision == ABORT:
            new = st.aborted(state, f"aborted by the analysis: {analysis.reason}", now)
            cause = "+".join(c.name for c in analysis.checks if not c.passed)
            await self._write(
                store, {**new, "analysis": doc}, st.route_of(new), ABORT, "analysis", cause, new["reason"]
            )
        elif analysis.decision == ADVANCE:
            new = st.advanced(state, f"step {state['steps'][state['step']]:g}% passed: {analysis.reason}", now)
            action = "promote" if new["status"] == st.PROMOTED else ADVANCE
            route = st.route_of(new)
            await self._write(
                store, {**new, "analysis": doc}, route, action, "analysis", "checks_passed", new["reason"]
            )
        else:
            await store.put_state({**state, "analysis": doc, "reason": analysis.reason, "updated": now})
        return analysis

    async def _write(
        self,
        store: Store,
        state: dict[str, Any],
        route: Route,
        decision: str,
        kind: str,
        cause: str,
        message: str,
    ) -> None:
        await self._call(store.put_state(state, route))
        event = {
            "at": state["updated"],
            "decision": decision,
            "by": kind,
            "cause": cause,
            "reason": message,
            "step": state["steps"][state["step"]],
            "status": state["status"],
        }
        await self._call(store.add_event(state["model"], event))
        log.warning("rollout of %s: %s (%s)", state["model"], decision, message)
        await self._decided(state["model"], decision, kind, cause, message)

    @staticmethod
    async def _call(work: Any) -> Any:
        try:
            return await work
        except StoreUnavailable as exc:
            raise RolloutStoreUnavailable(
                f"the rollout store did not answer ({exc})", code="rollout_store_unavailable"
            ) from None


def _shadow(line: bytes) -> tuple[str, bool] | None:
    parts = line.split()
    return (parts[0].decode(), parts[1] == b"1") if len(parts) == 3 else None


__all__ = ["Controller", "Sample"]
