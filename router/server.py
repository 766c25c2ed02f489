"""Run the router app under uvicorn (`qvl router`)."""

from __future__ import annotations

import logging
import math

import uvicorn

from qvl.settings import Settings
from router.app import create_app
from router.auth import AuthConfigError

log = logging.getLogger("qvl.router")


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    """The uvicorn settings every router process uses (uvloop, httptools, no access log)."""
    return uvicorn.Config(
        create_app(settings),
        host=settings.router.host,
        port=settings.router.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,
        proxy_headers=False,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(settings.router.drain.timeout_s),
        timeout_keep_alive=math.ceil(settings.router.keep_alive_s),
    )


def serve_router(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM; returns the process exit status."""
    if not settings.router.replicas and not settings.registry.url:
        log.error(
            "no replicas configured: pass --replica URL (repeatable), set router.replicas, or name the "
            "replica registry (--registry redis://HOST:PORT/DB, registry.url)"
        )
        return 2
    try:
        config = uvicorn_config(settings)
    except AuthConfigError as exc:
        log.error("%s", exc)
        return 2
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1
