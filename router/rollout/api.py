"""The rollout endpoints (`qvl rollout` talks to these; so does the console's operations page):

    GET  /v1/rollouts                every model's last rollout, with the route each router applies
    GET  /v1/rollouts/{model}        one model's rollout, its last analysis and its decisions
    POST /v1/rollouts/start          {model, to, steps?, min_requests?, min_duration_s?, shadow?}
    POST /v1/rollouts/{action}       {model}; action: pause, resume, abort, promote

Reads take any API key; writes need an operator's (`role: operator` in the keys file).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from router.auth import ApiKey
from router.edge import parse_json_object
from router.errors import InvalidRequest, NotFound, PermissionDenied
from router.rollout.controller import Controller
from router.state import state_of

ACTIONS = ("pause", "resume", "abort", "promote")


def mount_rollouts(app: FastAPI) -> None:
    routes = APIRouter()

    @routes.get("/v1/rollouts")
    async def list_rollouts(request: Request) -> JSONResponse:
        _, controller = _caller(request, write=False)
        return JSONResponse({"object": "list", "data": await controller.list()})

    @routes.post("/v1/rollouts/{action}")
    async def act(action: str, request: Request) -> JSONResponse:
        key, controller = _caller(request, write=True)
        doc = parse_json_object(await request.body())
        model = model_of(doc)
        actor = key.id or "anonymous"
        if action == "start":
            target = doc.get("to")
            if not isinstance(target, str) or not target:
                raise InvalidRequest("to must name the new version", code="invalid_rollout", param="to")
            state = await controller.start(
                model,
                target,
                _steps(doc.get("steps")),
                _number(doc, "min_requests", int),
                _number(doc, "min_duration_s", float),
                _number(doc, "shadow", float),
                actor,
            )
        elif action in ACTIONS:
            state = await controller.act(model, action, actor)
        else:
            raise NotFound(f"no rollout action '{action[:40]}'", code="unknown_path")
        return JSONResponse(state)

    @routes.get("/v1/rollouts/{model:path}")
    async def status(model: str, request: Request) -> JSONResponse:
        _, controller = _caller(request, write=False)
        return JSONResponse(await controller.status(model))

    app.include_router(routes)


def _caller(request: Request, *, write: bool) -> tuple[ApiKey, Controller]:
    state = state_of(request)
    key = state.keys.authenticate(request.headers.get("authorization", "").encode("latin-1") or None)
    if write and key.role != "operator":
        raise PermissionDenied(
            "rollouts are changed by operators: the key needs `role: operator`", code="operator_only"
        )
    assert state.controller is not None
    return key, state.controller


def model_of(doc: dict[str, Any]) -> str:
    """The `model` a rollout request names; raises InvalidRequest (invalid_rollout)."""
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must name the model of the rollout", code="invalid_rollout", param="model")
    return model


def _steps(value: object) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise InvalidRequest("steps must be a list of percentages", code="invalid_rollout", param="steps")
    return [float(v) for v in value]


def _number(doc: dict[str, Any], name: str, kind: type[int] | type[float]) -> Any:
    value = doc.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value < 0
        or (kind is int and value != int(value))
    ):
        raise InvalidRequest(f"{name} must be a non-negative number", code="invalid_rollout", param=name)
    if name == "shadow" and value > 1:
        raise InvalidRequest("shadow must be a share in 0..1", code="invalid_rollout", param="shadow")
    return kind(value)
