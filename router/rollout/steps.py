"""A rollout's state and its transitions, as pure functions: each returns the new state and the route
that goes with it, which the store writes together (router/rollout/store.py).

State (JSON in Redis): id, model, baseline, target, steps (percent of traffic to the target), step (an
index into steps), status (running, paused, promoted, aborted), step_started and started (unix), the
step's rules (min_requests, min_duration_s), shadow (share of the baseline's greedy requests mirrored
to the target), sticky, reason (of the last decision), analysis (the last one) and updated.
"""

from __future__ import annotations

import secrets
from typing import Any

from router.routes import Route

RUNNING, PAUSED, PROMOTED, ABORTED = "running", "paused", "promoted", "aborted"
ACTIVE = (RUNNING, PAUSED)


def new_rollout(
    route: Route,
    target: str,
    steps: list[float],
    *,
    min_requests: int,
    min_duration_s: float,
    shadow: float,
    now: float,
) -> tuple[dict[str, Any], Route]:
    """A rollout of `target` from the route's current version (its heaviest), at its first step."""
    baseline = max(route.versions, key=lambda vw: vw[1])[0]
    state: dict[str, Any] = {
        "id": secrets.token_hex(6),
        "model": route.model,
        "baseline": baseline,
        "target": target,
        "steps": steps,
        "step": 0,
        "status": RUNNING,
        "started": now,
        "step_started": now,
        "min_requests": min_requests,
        "min_duration_s": min_duration_s,
        "shadow": shadow,
        "sticky": route.sticky,
        "reason": f"started: {target} gets {steps[0]:g}% of {route.model}, {baseline} the rest",
        "analysis": None,
        "updated": now,
    }
    return state, route_of(state)


def route_of(state: dict[str, Any]) -> Route:
    """The route a rollout's state implies."""
    model, target, baseline = state["model"], state["target"], state["baseline"]
    sticky = state.get("sticky", "session")
    if state["status"] == PROMOTED:
        return Route(model, ((target, 100.0),), sticky)
    if state["status"] == ABORTED:
        return Route(model, ((target, 0.0), (baseline, 100.0)), sticky)
    share = float(state["steps"][state["step"]])
    shadow = ((target, float(state["shadow"])),) if state["shadow"] > 0 else ()
    return Route(
        model,
        ((target, share), (baseline, 100.0 - share)),
        sticky,
        shadow,
        rollout=f"{state['id']}:{state['step']}",
    )


def advanced(state: dict[str, Any], reason: str, now: float) -> dict[str, Any]:
    """The next step, or promoted after the step before 100 %."""
    nxt = state["step"] + 1
    if nxt >= len(state["steps"]) - 1:
        return promoted(state, reason, now)
    return {**state, "step": nxt, "step_started": now, "reason": reason, "updated": now}


def promoted(state: dict[str, Any], reason: str, now: float) -> dict[str, Any]:
    return {**state, "step": len(state["steps"]) - 1, "status": PROMOTED, "reason": reason, "updated": now}


def aborted(state: dict[str, Any], reason: str, now: float) -> dict[str, Any]:
    return {**state, "status": ABORTED, "reason": reason, "updated": now}


def paused(state: dict[str, Any], reason: str, now: float) -> dict[str, Any]:
    return {**state, "status": PAUSED, "reason": reason, "updated": now}


def resumed(state: dict[str, Any], reason: str, now: float) -> dict[str, Any]:
    # The step starts over: what was measured before the pause is still counted, but its clock restarts.
    return {**state, "status": RUNNING, "step_started": now, "reason": reason, "updated": now}
