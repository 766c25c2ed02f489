"""`create_app(settings)`: the router's HTTP surface.

`POST /v1/chat/completions` is a plain ASGI handler (router/chat.py, the hot path: no per-request
framework objects); the other endpoints are ordinary FastAPI routes. Components live on `app.state.qvl`,
built in the lifespan; nothing is module-level.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cache.flight import AnswerCache
from cache.stores import build_store
from qvl.settings import Settings
from router.admission import Admission
from router.audit import AuditLogError, build_audit_log
from router.audit_record import AuditRecord
from router.auth import KeyRing
from router.batch.api import mount_batches
from router.batch.files import FileStore
from router.batch.jobs import build_job_store
from router.batch.runner import Runner
from router.batch.service import Batches
from router.chat import CHAT_PATH, ChatCompletions
from router.console.autoscaling import AutoscalerStatus
from router.console.live import Live
from router.console.pages import mount_console
from router.console.service import Console
from router.console.session import Sessions
from router.discovery import RegistryWatch
from router.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NoHealthyReplica,
    NotFound,
    RouterError,
    error_answer,
)
from router.metrics import RouterMetrics
from router.openapi import with_chat_completions
from router.policies import build_policy
from router.proxy import Proxy
from router.quota import Quotas
from router.replicas import ReplicaPool
from router.rollout.api import mount_rollouts
from router.rollout.controller import Controller
from router.rollout.memory import MemoryRolloutStore
from router.rollout.service import Rollouts
from router.rollout.shadow import Shadow
from router.rollout.store import RolloutStore, Store
from router.routes import RouteTable, settings_routes
from router.state import RouterState, state_of
from router.upstream import UpstreamClient
from serving.registry import Registry, RouterMember

log = logging.getLogger("qvl.router")


def create_app(settings: Settings) -> FastAPI:
    """The router app; replicas are checked once before it serves, then in the background.
    Raises AuthConfigError when the API keys cannot be used (before anything listens)."""
    keys = KeyRing.from_settings(settings)
    if not keys.enabled:
        log.warning("API key authentication is OFF (auth.enabled: false): every caller is served anonymously")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = UpstreamClient(connect_timeout_s=settings.router.connect_timeout_s)
        pool = ReplicaPool(settings.router.replicas, settings.router, client)
        watch = None
        if settings.registry.url:
            registry = Registry(
                settings.registry.url,
                ttl_s=settings.registry.ttl_s,
                timeout_s=settings.registry.timeout_s,
                key_prefix=settings.registry.key_prefix,
            )
            address = f"http://{settings.router.host}:{settings.router.port}"
            me = RouterMember(uuid.uuid4().hex[:12], address, time.time())
            watch = RegistryWatch(registry, pool, settings.registry.poll_interval_s, me)
        rollouts = build_rollouts(settings)
        store = build_store(settings.cache)
        # The gauges are read at scrape time, by which `cache` exists.
        audit = build_audit_log(settings.router.audit)
        metrics = RouterMetrics(
            lambda: pool.replicas,
            lambda: cache.store_health(),
            lambda: (audit.lines_written, audit.write_errors, audit.pending) if settings.router.audit.path else None,
            lambda: None if watch is None else (watch.up, watch.routers),
            lambda: quotas.degradation(),
            lambda: rollouts.table.routes.values(),
        )
        cache = AnswerCache(store, settings.cache, metrics)
        admission = Admission(settings.router.admission)
        proxy = Proxy(
            pool, build_policy(settings.router, lambda: pool.membership), client, settings.router, metrics, admission
        )
        quotas = Quotas(settings.router.quota, routers=lambda: quota_routers(settings, watch))
        await audit.start()
        console = None
        if settings.router.console.enabled:
            live = Live(settings.router.console, metrics.registry, lambda: pool.replicas, client)
            autoscaling = AutoscalerStatus.from_settings(settings.registry)
            console = Console(settings.router.console, Sessions(settings.router.console, keys), live, autoscaling)
        batches = None
        if settings.router.batch.enabled:
            assert isinstance(app, RouterAPI)
            conf = settings.router.batch
            files = FileStore(Path(conf.files_dir))
            jobs = build_job_store(conf.state, conf.key_prefix)
            runner = Runner(app.chat, jobs, files, keys, lambda: pool.replicas, settings.router, metrics)
            proxy.make_room = runner.make_room
            batches = Batches(files, jobs, runner)
        shadow = Shadow(proxy, rollouts, metrics)

        async def decided(model: str, decision: str, by: str, cause: str, reason: str) -> None:
            metrics.record_rollout_decision(model, decision, by, cause)
            record = AuditRecord(
                time=time.time(),
                request_id="rollout-" + uuid.uuid4().hex[:12],
                key_id="",
                model=model,
                image_digests=(),
                prompt_digest="",
                cache="none",
                replica="none",
                status=0,
                error_type="",
                latency_ms=0.0,
                prompt_tokens=None,
                completion_tokens=None,
                event=f"rollout:{decision}",
                detail=reason,
            )
            try:
                await audit.write(record)
            except AuditLogError as exc:
                log.error("audit line of a rollout decision not written: %s", exc)

        controller = Controller(
            rollouts.store,
            rollouts.table,
            settings.router.rollout,
            uuid.uuid4().hex[:12],
            lambda: pool.known_models,
            decided,
        )
        app.state.qvl = RouterState(
            settings,
            pool,
            proxy,
            metrics,
            client,
            cache,
            keys,
            quotas,
            audit,
            batches,
            console,
            rollouts,
            shadow,
            controller,
        )
        await rollouts.refresh()
        if watch is not None:
            await watch.announce()
            await watch.refresh()
        await asyncio.gather(pool.check_all(), cache.check_store())
        checks = [
            asyncio.create_task(pool.run(), name="replica-checks"),
            asyncio.create_task(cache.run_checks(settings.router.health.interval_s), name="cache-checks"),
        ]
        if watch is not None:
            checks.append(asyncio.create_task(watch.run(), name="registry-watch"))
        if console is not None:
            checks.append(asyncio.create_task(console.live.run(), name="console-sampling"))
        if batches is not None:
            checks.append(asyncio.create_task(batches.runner.run(), name="batch-runner"))
        if rollouts.store is not None:
            checks.append(asyncio.create_task(rollouts.run(), name="routes"))
            checks.append(asyncio.create_task(controller.run(), name="rollout-analysis"))
        try:
            yield
        finally:
            for task in checks:
                task.cancel()
            await asyncio.gather(*checks, return_exceptions=True)
            # Requests have drained by now (uvicorn waits for them first): nothing more will be audited.
            await shadow.close()
            await rollouts.close()
            await audit.close()
            await client.close()
            await quotas.close()
            if store is not None:
                await store.close()
            if watch is not None:
                await watch.close()
            if batches is not None:
                await batches.jobs.close()
            if console is not None:
                await console.close()

    app = RouterAPI(title="qvl-cluster router", lifespan=lifespan, docs_url=None, redoc_url=None)
    # Registered for method checks (GET answers 405); POSTs are dispatched before the middleware stack.
    app.router.routes.append(Route(CHAT_PATH, app.chat, methods=["POST"]))
    if settings.router.console.enabled:
        mount_console(app)
    if settings.router.batch.enabled:
        mount_batches(app)
    mount_rollouts(app)

    # Every error answer, FastAPI's own included, is built by router/errors.py's error_answer.
    @app.exception_handler(RouterError)
    async def router_error(request: Request, exc: RouterError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(from_http_exception(request.method, request.url.path, exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(from_validation_error(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # Starlette logs and re-raises it after this answer is sent.
        return error_response(RouterError("internal error", code="internal_error"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        state = state_of(request)
        healthy = sum(r.healthy for r in state.pool.replicas)
        if healthy == 0:
            # Ejected replicas come back through a health check: worth asking again after the next one.
            raise NoHealthyReplica(
                "no healthy replica", code="no_healthy_replica", retry_after_s=settings.router.health.interval_s
            )
        return JSONResponse({"status": "ready", "healthy_replicas": healthy})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state = state_of(request)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, object]:
        state = state_of(request)
        state.keys.authenticate(request.headers.get("authorization", "").encode("latin-1") or None)
        served: dict[str, int] = {}
        versions: dict[str, set[str]] = {}
        for replica in state.pool.replicas:
            if replica.healthy:
                for model in replica.models:
                    if "@" not in model:
                        served[model] = served.get(model, 0) + 1
                for model, version in replica.versions.items():
                    versions.setdefault(model, set()).add(version)
        data = [
            {
                "id": m,
                "object": "model",
                "created": 0,
                "owned_by": "qvl-cluster",
                "replicas": n,
                "versions": sorted(versions.get(m, ())),
            }
            for m, n in sorted(served.items())
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/cluster")
    async def cluster(request: Request) -> dict[str, object]:
        state = state_of(request)
        state.keys.authenticate(request.headers.get("authorization", "").encode("latin-1") or None)
        pools = [
            {
                "name": p.name,
                "model": p.model,
                "version": p.version,
                "replicas": p.replicas,
                "healthy": sum(r.healthy and r.versions.get(p.model) == p.version for r in state.pool.replicas),
            }
            for p in state.settings.pools
        ]
        return {
            "policy": state.settings.router.policy,
            "pools": pools,
            "routes": [r.to_doc() for _, r in sorted(state.rollouts.table.routes.items())],
            "replicas": [r.describe() for r in state.pool.replicas],
        }

    return app


def build_rollouts(settings: Settings) -> Rollouts:
    """The routes from the settings, and the store of routes and rollouts: Redis when one is given for it,
    else this router's memory."""
    table = RouteTable(settings_routes(settings.router.routes, settings.pools))
    url = settings.router.rollout.store or settings.registry.url
    store: Store = (
        RolloutStore(url, key_prefix=settings.router.rollout.key_prefix, timeout_s=settings.registry.timeout_s)
        if url
        else MemoryRolloutStore()
    )
    return Rollouts(table, store, settings.router.rollout)


def quota_routers(settings: Settings, watch: RegistryWatch | None) -> int:
    """Routers that share each key's rate while the quota store is down: router.quota.routers, else the
    registry's last count, else 1."""
    if settings.router.quota.routers:
        return settings.router.quota.routers
    if watch is not None and watch.routers > 0:
        return watch.routers
    return 1


def error_response(exc: RouterError) -> Response:
    """`exc` as a FastAPI route's answer (router/errors.py's error_answer)."""
    answer = error_answer(exc)
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in answer.headers}
    return Response(answer.body, status_code=answer.status, headers=headers)


def from_http_exception(method: str, path: str, exc: StarletteHTTPException) -> RouterError:
    """The RouterError for an HTTPException of Starlette's routing: 404 for an unknown path, 405 for a
    method the path does not take. Other statuses are not raised by this app; they map to 400 or 500."""
    where = f"{method} {path[:200]}"
    if exc.status_code == 404:
        return NotFound(f"no such endpoint: {where}", code="unknown_path")
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return MethodNotAllowed(f"method not allowed: {where} (allowed: {allow})", allow=allow)
    if exc.status_code < 500:
        return InvalidRequest(str(exc.detail))
    return RouterError("internal error", code="internal_error")


def from_validation_error(exc: RequestValidationError) -> InvalidRequest:
    """A request FastAPI could not validate against a route's parameters: 400 `invalid_parameters`,
    naming the first offending field (FastAPI's own answer would be a 422 `{"detail": ...}`)."""
    errors = exc.errors()
    if not errors:
        return InvalidRequest("invalid parameters", code="invalid_parameters")
    first = errors[0]
    location = [str(part) for part in first.get("loc", ())]
    message = f"{'.'.join(location)}: {first.get('msg', 'invalid')}" if location else str(first.get("msg", "invalid"))
    return InvalidRequest(message, code="invalid_parameters", param=location[-1] if location else None)


class RouterAPI(FastAPI):
    """FastAPI, except that POST /v1/chat/completions skips the middleware stack: it costs about a
    fifth of the router's CPU per request, and the handler does its own error mapping."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chat = ChatCompletions(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == CHAT_PATH and scope["method"] == "POST":
            await self.chat(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document plus POST /v1/chat/completions, which is no FastAPI route (router/openapi.py)."""
        if self.openapi_schema is None:
            self.openapi_schema = with_chat_completions(super().openapi())
        return self.openapi_schema
