"""The operations page's rollout panel: each model's last rollout (router/rollout/), with its step, the
weights this router applies, the last analysis with each check, and the actions an operator may take.

While the rollout store (Redis) does not answer, the panel carries the error's message instead of rows,
and the rest of the page is unaffected.
"""

from __future__ import annotations

from typing import Any

from router.errors import RolloutStoreUnavailable
from router.rollout import steps as st
from router.rollout.controller import Controller
from router.routes import Route

ACTIONS = ("pause", "resume", "abort")
"""What the page offers; promote stays with `qvl rollout promote`, as it skips the analysis."""
NO_CONTROLLER = "this router runs no rollout controller"


async def rollout_panel(controller: Controller | None) -> dict[str, Any]:
    """{"data": one row per model, "error": None} or, without a store, {"data": [], "error": {code, message}}."""
    if controller is None:
        return {"data": [], "error": {"code": "rollout_store_unavailable", "message": NO_CONTROLLER}}
    try:
        states = await controller.list()
    except RolloutStoreUnavailable as exc:
        return {"data": [], "error": {"code": exc.code, "message": exc.message}}
    return {"data": [rollout_row(s) for s in states], "error": None}


def rollout_row(state: dict[str, Any]) -> dict[str, Any]:
    """One rollout as the page shows it (a state of controller.list())."""
    status = str(state["status"])
    steps = [float(s) for s in state["steps"]]
    analysis = state.get("analysis") or None
    applied = state.get("applied_here")
    return {
        "model": state["model"],
        "id": state["id"],
        "baseline": state["baseline"],
        "target": state["target"],
        "status": status,
        "step": state["step"],
        "steps": steps,
        "step_percent": steps[int(state["step"])],
        "route": _weights(state["route"]),
        "applied_here": None if applied is None else _weights(applied),
        "reason": state.get("reason", ""),
        "updated": state.get("updated"),
        "analysis": None
        if analysis is None
        else {
            "decision": analysis["decision"],
            "reason": analysis["reason"],
            "canary_requests": analysis["canary_requests"],
            "baseline_requests": analysis["baseline_requests"],
            "checks": [
                {"name": c["name"], "passed": bool(c["passed"]), "detail": c["detail"]} for c in analysis["checks"]
            ],
        },
        "actions": _actions(status),
    }


def _weights(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """A route's versions with their share in percent, in the route's order."""
    route = Route.from_doc(doc)
    return [{"version": v, "percent": round(route.weight_of(v), 3)} for v, _ in route.versions]


def _actions(status: str) -> list[str]:
    if status == st.RUNNING:
        return ["pause", "abort"]
    if status == st.PAUSED:
        return ["resume", "abort"]
    return []
