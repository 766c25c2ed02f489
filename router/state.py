"""The router's components, built once in the app's lifespan and kept on `app.state.qvl`."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from cache.flight import AnswerCache
from qvl.settings import RolloutSettings, Settings
from router.audit import AuditSink
from router.auth import KeyRing
from router.batch.service import Batches
from router.console.service import Console
from router.metrics import RouterMetrics
from router.proxy import Proxy
from router.quota import Quotas
from router.replicas import ReplicaPool
from router.rollout.controller import Controller
from router.rollout.service import Rollouts
from router.rollout.shadow import Shadow
from router.routes import RouteTable
from router.upstream import UpstreamClient


@dataclass(slots=True)
class RouterState:
    """Everything a request handler needs; one per app, nothing module-level."""

    settings: Settings
    pool: ReplicaPool
    proxy: Proxy
    metrics: RouterMetrics
    client: UpstreamClient
    cache: AnswerCache
    keys: KeyRing
    quotas: Quotas
    audit: AuditSink
    batches: Batches | None = None
    """The files and batches API and the batch runner; None when router.batch.enabled is false."""
    console: Console | None = None
    """The web console's sessions and live data; None when router.console.enabled is false."""
    rollouts: Rollouts = field(default_factory=lambda: Rollouts(RouteTable({}), None, RolloutSettings()))
    """The routes applied now, session pins and the rollout samples (router/rollout/service.py)."""
    shadow: Shadow | None = None
    controller: Controller | None = None


def state_of(request: Request) -> RouterState:
    """The components of the app serving `request`."""
    state: RouterState = request.app.state.qvl
    return state
