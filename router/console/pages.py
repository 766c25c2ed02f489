"""The console's HTTP surface: its pages, its JSON endpoints and its static files, all under /console.

Pages: /console/signin (GET, POST), /console/signout (POST), /console/playground, /console/operations.
JSON: /console/api/session, /console/api/playground (models and limits for this key), /console/api/operations.
Writes (operators, with the x-csrf-token header): POST /console/api/batches/{id}/cancel and
POST /console/api/rollouts/{pause|resume|abort} with {"model": ...}.
Without a valid session a page redirects to the sign-in page and a JSON endpoint answers 401; a viewer
asking for an operator's page or JSON gets 403. Chat goes to POST /v1/chat/completions itself, with the
session cookie and the x-csrf-token header (router/chat.py reads both through Sessions.chat_key).
Every answer carries a strict Content-Security-Policy: scripts, styles and connections to this origin only.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from router.batch.api import cancel
from router.console.autoscaling import autoscaling_panel
from router.console.batches import batch_panel
from router.console.rollouts import ACTIONS, NO_CONTROLLER, rollout_panel
from router.console.service import Console
from router.console.session import Session
from router.edge import parse_json_object
from router.errors import InvalidRequest, NotFound, PermissionDenied, RolloutStoreUnavailable, RouterError
from router.rollout.api import model_of
from router.state import state_of

HERE = Path(__file__).parent
log = logging.getLogger("qvl.router.console")
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}
_NO_STORE = {"cache-control": "no-store"}
_MAX_FORM_BYTES = 16 * 1024


class StaticFiles:
    """The console's own JS and CSS, read once; served with an ETag so a browser revalidates cheaply."""

    def __init__(self, folder: Path) -> None:
        self.files: dict[str, tuple[bytes, str, str]] = {}
        for path in sorted(folder.iterdir()):
            body = path.read_bytes()
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            self.files[path.name] = (body, kind, '"' + hashlib.sha256(body).hexdigest()[:16] + '"')


def mount_console(app: FastAPI) -> None:
    """Add the console's routes to the router app (router.console.enabled)."""
    templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    static = StaticFiles(HERE / "static")
    routes = APIRouter()

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = templates.get_template(name).render(**context)
        return HTMLResponse(html, status_code=status, headers={**SECURITY_HEADERS, **_NO_STORE})

    def signed_in(request: Request) -> Session | None:
        try:
            return _console(request).sessions.read(request.headers.get("cookie", "").encode("latin-1") or None)
        except RouterError:
            return None

    def nav(request: Request, session: Session, current: str) -> dict[str, Any]:
        return {"session": session, "current": current, "auth_enabled": state_of(request).keys.enabled}

    @routes.get("/console", include_in_schema=False)
    async def console_root() -> Response:
        return _redirect("/console/playground")

    @routes.get("/console/signin", include_in_schema=False)
    async def signin_page(request: Request) -> Response:
        if signed_in(request) is not None:
            return _redirect("/console/playground")
        return page("signin.html", error=None, auth_enabled=state_of(request).keys.enabled)

    @routes.post("/console/signin", include_in_schema=False)
    async def signin(request: Request) -> Response:
        console = _console(request)
        if not _same_origin(request):
            return page("signin.html", 403, error="sign-in from another site refused", auth_enabled=True)
        form = await _form(request)
        try:
            _, cookie = console.sessions.sign_in(form.get("key", ""))
        except RouterError as exc:
            return page("signin.html", exc.status, error=exc.message, auth_enabled=state_of(request).keys.enabled)
        response = _redirect("/console/playground")
        response.headers["set-cookie"] = console.sessions.set_cookie(cookie)
        return response

    @routes.post("/console/signout", include_in_schema=False)
    async def signout(request: Request) -> Response:
        console = _console(request)
        session = signed_in(request)
        form = await _form(request)
        if session is not None:
            console.sessions.check_write(session, form.get("csrf", "").encode() or None)
        response = _redirect("/console/signin")
        response.headers["set-cookie"] = console.sessions.clear_cookie()
        return response

    @routes.get("/console/playground", include_in_schema=False)
    async def playground_page(request: Request) -> Response:
        session = signed_in(request)
        if session is None:
            return _redirect("/console/signin")
        return page("playground.html", **nav(request, session, "playground"))

    @routes.get("/console/operations", include_in_schema=False)
    async def operations_page(request: Request) -> Response:
        session = signed_in(request)
        if session is None:
            return _redirect("/console/signin")
        try:
            _console(request).sessions.require(session, "operator")
        except PermissionDenied as exc:
            return page("denied.html", exc.status, message=exc.message, **nav(request, session, "operations"))
        return page("operations.html", **nav(request, session, "operations"))

    @routes.get("/console/static/{name}", include_in_schema=False)
    async def static_file(name: str, request: Request) -> Response:
        found = static.files.get(name)
        if found is None:
            return JSONResponse(
                {"error": {"message": "no such file", "type": "not_found", "param": None, "code": "unknown_path"}},
                status_code=404,
            )
        body, kind, etag = found
        headers = {**SECURITY_HEADERS, "etag": etag, "cache-control": "no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=kind, headers=headers)

    @routes.get("/console/api/session")
    async def session_json(request: Request) -> JSONResponse:
        """The signed-in console user: key id and role."""
        session = _session(request)
        return _json({"key_id": session.key.id, "role": session.role, "auth_enabled": state_of(request).keys.enabled})

    @routes.get("/console/api/playground")
    async def playground_json(request: Request) -> JSONResponse:
        """What the playground offers this key: the models it may use and the router's input limits."""
        session = _session(request)
        state = state_of(request)
        allowed = session.key.models
        models = sorted(m for m in state.pool.known_models if allowed is None or m in allowed)
        limits = state.settings.router.limits
        return _json(
            {
                "models": models,
                "limits": {
                    "max_images": limits.max_images,
                    "max_image_bytes": limits.max_image_bytes,
                    "max_image_pixels": limits.max_image_pixels,
                    "image_formats": limits.image_formats,
                    "max_tokens": limits.max_tokens,
                    "max_request_bytes": state.settings.router.max_request_bytes,
                },
            }
        )

    @routes.get("/console/api/operations")
    async def operations_json(request: Request) -> JSONResponse:
        """The operations page's data: replicas, GPUs, the router's last minute, batch jobs, rollouts and
        autoscaling (operators only). `rollouts.error` says why there are none to show (no rollout store);
        `autoscaling.error` why its status cannot be read, `autoscaling.note` why there is none."""
        console = _console(request)
        session = _session(request)
        console.sessions.require(session, "operator")
        doc = console.live.snapshot()
        state = state_of(request)
        doc["batches"] = await batch_panel(state.batches) if state.batches is not None else None
        doc["rollouts"] = await rollout_panel(state.controller)
        doc["autoscaling"] = await autoscaling_panel(console.autoscaling)
        return _json(doc)

    @routes.post("/console/api/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> JSONResponse:
        """Cancel any key's batch (operators only; needs the session's x-csrf-token)."""
        session = _operator_write(request)
        batches = state_of(request).batches
        job = await batches.jobs.get(batch_id) if batches is not None and len(batch_id) <= 128 else None
        if batches is None or job is None:
            raise NotFound(f"no batch '{batch_id[:80]}'", code="batch_not_found")
        changed = await cancel(batches, job)
        log.info("console: operator key '%s' cancelled batch %s (owner '%s')", session.key.id, batch_id, job["owner"])
        return _json({"id": changed["id"], "status": changed["status"]})

    @routes.post("/console/api/rollouts/{action}")
    async def rollout_action(action: str, request: Request) -> JSONResponse:
        """Pause, resume or abort a model's rollout: body {"model"} (operators only; needs x-csrf-token)."""
        session = _operator_write(request)
        if action not in ACTIONS:
            raise NotFound(f"no rollout action '{action[:40]}' here", code="unknown_path")
        model = await _model_of(request)
        controller = state_of(request).controller
        if controller is None:
            raise RolloutStoreUnavailable(NO_CONTROLLER, code="rollout_store_unavailable")
        changed = await controller.act(model, action, session.key.id or "anonymous")
        log.info("console: operator key '%s' did %s on the rollout of %s", session.key.id, action, model)
        return _json({"model": changed["model"], "status": changed["status"], "reason": changed["reason"]})

    app.include_router(routes)


def _operator_write(request: Request) -> Session:
    """The session of an operator's write, checked: its role, and the session's x-csrf-token."""
    console = _console(request)
    session = _session(request)
    console.sessions.require(session, "operator")
    console.sessions.check_write(session, request.headers.get("x-csrf-token", "").encode() or None)
    return session


def _console(request: Request) -> Console:
    console = state_of(request).console
    assert console is not None  # the routes exist only when the console is on
    return console


def _session(request: Request) -> Session:
    """The request's session; raises Unauthenticated (401)."""
    return _console(request).sessions.read(request.headers.get("cookie", "").encode("latin-1") or None)


def _json(doc: dict[str, Any]) -> JSONResponse:
    return JSONResponse(doc, headers={**SECURITY_HEADERS, **_NO_STORE})


def _redirect(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303, headers={**SECURITY_HEADERS, **_NO_STORE})


def _same_origin(request: Request) -> bool:
    """False when the browser says the form came from another origin (login CSRF); True without an Origin."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def _model_of(request: Request) -> str:
    """The `model` of a small JSON body {"model": ...}; raises InvalidRequest (invalid_json, invalid_rollout)."""
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        raise InvalidRequest("the body must be a small JSON object", code="invalid_json")
    return model_of(parse_json_object(body))


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form body, first value of each field (no multipart: nothing here uploads files)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            return {}
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {name: values[0] for name, values in fields.items()}
