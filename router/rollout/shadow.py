"""Shadow traffic: a copy of a greedy request sent to another version, whose answer is compared with
the one the client got and then dropped. Copies run in the background after the client's answer went
out, at most `MAX_IN_FLIGHT` at a time (past that a copy is skipped and counted), through the same
proxy (so the same admission) as any request."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets

import orjson

from router.edge import ChatRequest
from router.errors import RouterError
from router.metrics import RouterMetrics
from router.proxy import Proxy
from router.rollout.service import Rollouts
from router.routes import Route

log = logging.getLogger("qvl.router.shadow")
MAX_IN_FLIGHT = 32


def is_greedy(request: ChatRequest) -> bool:
    """Temperature 0 (or top_k 1): the only requests whose answers two versions should share."""
    return request.sampling.temperature == 0 or request.doc.get("top_k") == 1


def answer_text(body: bytes) -> str | None:
    """The first choice's message content of a chat completion; None when there is none."""
    try:
        doc = orjson.loads(body)
        content = doc["choices"][0]["message"]["content"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


class Shadow:
    def __init__(self, proxy: Proxy, rollouts: Rollouts, metrics: RouterMetrics) -> None:
        self._proxy = proxy
        self._rollouts = rollouts
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    def mirror(self, request: ChatRequest, version: str, route: Route, answer: bytes) -> None:
        """Send a copy of `request` to `version` in the background and compare its answer with `answer`."""
        model = route.model
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self._metrics.record_shadow(model, version, "skipped")
            return
        copy = dataclasses.replace(request, version=version, target=f"{model}@{version}", ticket=None)
        task = asyncio.create_task(self._compare(copy, route, answer), name="shadow")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(self, request: ChatRequest, route: Route, answer: bytes) -> None:
        try:
            upstream = await self._proxy.open(request, "shadow-" + secrets.token_hex(8))
        except RouterError as exc:
            self._metrics.record_shadow(route.model, request.version, "error")
            log.debug("shadow request to %s failed: %s", request.target, exc.message)
            return
        try:
            body = upstream.body
        finally:
            self._proxy.close(upstream, complete=True)
        if upstream.status != 200:
            self._metrics.record_shadow(route.model, request.version, "error")
            return
        same = answer_text(body) == answer_text(answer)
        self._metrics.record_shadow(route.model, request.version, "same" if same else "differ")
        self._rollouts.observe_shadow(route, request.version, same)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
