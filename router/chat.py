"""POST /v1/chat/completions: the router's hot path, a raw ASGI app (no per-request framework objects).

Parse once at the edge (authenticate, read the body within its limit, inline remote images, validate,
authorize, charge the quota), then serve through the exchange (cache, pick, proxy, relay), cancelling
the upstream request when the client disconnects, and write one audit line per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import ssl
import time
from collections.abc import Coroutine

from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from qvl.settings import versioned
from router.audit import AuditLogError
from router.audit_record import audit_record
from router.auth import ApiKey
from router.batch.line import BATCH_LINE, BatchLine
from router.classes import BATCH, FLEX, request_class, shed_flex, with_class
from router.edge import ChatRequest, parse_chat_request, parse_json_object
from router.errors import InvalidRequest, RequestTooLarge, RouterError
from router.exchange import FROM_CACHE, Exchange
from router.fetch import inline_remote_images
from router.metrics import NO_LOOKUP, UNKNOWN_MODEL, RouterMetrics
from router.rollout.shadow import is_greedy
from router.routes import Choice
from router.state import RouterState

log = logging.getLogger("qvl.router")

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
CHAT_PATH = "/v1/chat/completions"


class ChatCompletions:
    """POST /v1/chat/completions as a raw ASGI app: parse once, proxy, relay, account."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app
        # Built once: a TLS context per fetched https image would cost tens of milliseconds.
        self._tls = ssl.create_default_context()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: RouterState = self._app.state.qvl
        started = time.perf_counter()
        arrived = time.time()
        headers = dict(scope["headers"])
        given_id = headers.get(b"x-request-id", b"")
        request_id = given_id.decode() if _REQUEST_ID.match(given_id) else secrets.token_hex(16)
        exchange = Exchange(state.proxy, state.cache, state.metrics, send, request_id.encode(), started)
        try:
            await self._serve(state, exchange, headers, receive, arrived, scope.get(BATCH_LINE))
        except Exception:
            # A bug, not a refusal: answered in the same shape when nothing was sent yet, then raised to be logged.
            if exchange.status == 0:
                await exchange.fail(RouterError("internal error", code="internal_error"))
            raise

    async def _serve(
        self,
        state: RouterState,
        exchange: Exchange,
        headers: dict[bytes, bytes],
        receive: Receive,
        arrived: float,
        line: BatchLine | None,
    ) -> None:
        started = exchange.started
        settings = state.settings
        tls = self._tls
        key: ApiKey | None = None
        request: ChatRequest | None = None
        try:
            # Who is asking comes first: an unknown caller costs no body parsing.
            authorization = headers.get(b"authorization")
            if line is not None:
                key = line.key  # a line of a batch job, run inside this router as its owner
            elif authorization is None and state.console is not None and state.keys.enabled and b"cookie" in headers:
                # The console's playground: its session cookie stands for the key, with the CSRF header
                # (with auth off nobody needs a credential, so a cookie changes nothing).
                key = state.console.sessions.chat_key(headers)
            else:
                key = state.keys.authenticate(authorization)
            body = await _read_body(receive, settings.router.max_request_bytes, headers.get(b"content-length"))
            if settings.router.fetch.enabled:
                # Remote images become data URLs here, once: replicas never fetch anything.
                inlined = await inline_remote_images(
                    parse_json_object(body), settings.router.fetch, settings.router.limits, tls=tls
                )
                body = inlined if inlined is not None else body
            session = headers.get(settings.router.session_header.encode())
            request = parse_chat_request(body, session.decode("latin-1") if session else None, settings.router.limits)
            klass = BATCH if line is not None else request_class(request.doc)
            request = with_class(request, klass, settings.router.classes, line is not None and line.ticket.floor)
            if line is not None:
                request = dataclasses.replace(request, ticket=line.ticket)
            state.keys.authorize(key, request.model.partition("@")[0])
            choice = state.rollouts.table.choose(
                request.model, request.session_id, key.id, request.doc, request.image_digests
            )
            if line is not None and request.model in line.versions:
                pinned = line.versions[request.model]
                choice = Choice(pinned, versioned(request.model, pinned))
            elif choice.route is not None:
                choice = await state.rollouts.pin(choice)
            if choice.version:
                request = dataclasses.replace(request, version=choice.version, target=choice.target)
                exchange.version = choice.version.encode()
            if klass == FLEX:
                try:
                    shed_flex(state.pool.candidates(request.served), state.proxy.waiting, settings.router.classes)
                except RouterError:
                    state.metrics.record_admission(FLEX, "shed")
                    raise
            state.metrics.record_admitted(klass)
            await state.quotas.charge(key, request.image_tokens)
        except RouterError as exc:
            await exchange.fail(exc)
            elapsed = time.perf_counter() - started
            state.metrics.record_rejection(exc.code or exc.type)
            state.metrics.record_request(UNKNOWN_MODEL, "none", exc.status, NO_LOOKUP, exc.type, elapsed, False)
            await _audit(state, exchange, arrived, key, request, line)
            return
        public = request.model.partition("@")[0]
        exchange.model = public if public in state.pool.known_models else UNKNOWN_MODEL
        control = headers.get(b"cache-control")
        serving = exchange.serve(request, control.decode("latin-1") if control else None)
        await _until_disconnect(serving, receive, exchange, state.metrics)
        state.metrics.record_request(
            exchange.model,
            exchange.replica.decode(),
            exchange.status,
            exchange.cache_result.decode(),
            exchange.error_type,
            time.perf_counter() - started,
            request.stream,
        )
        if exchange.version:
            _versioned(state, exchange, request, choice)
        await _audit(state, exchange, arrived, key, request, line)


def _versioned(state: RouterState, exchange: Exchange, request: ChatRequest, choice: Choice) -> None:
    """Metrics by version, the rollout's samples, and the shadow copy of a greedy request."""
    e2e = time.perf_counter() - exchange.started
    ttft = exchange.first_at - exchange.started if exchange.first_at else e2e
    version = exchange.version.decode()
    state.metrics.record_version(exchange.model, version, exchange.status, ttft, e2e)
    route = choice.route
    if route is None or exchange.replica == FROM_CACHE:
        return  # a cached answer says nothing of the version; a failed one does (no replica could answer)
    if route.rollout:
        state.rollouts.observe(route, version, exchange.status < 500, ttft, e2e)
    if (
        choice.shadow
        and state.shadow is not None
        and exchange.status == 200
        and not request.stream
        and is_greedy(request)
    ):
        state.shadow.mirror(request, choice.shadow, route, exchange.answer)


async def _audit(
    state: RouterState,
    exchange: Exchange,
    arrived: float,
    key: ApiKey | None,
    request: ChatRequest | None,
    line: BatchLine | None,
) -> None:
    """One audit line per request, refused ones included; written after the answer went out. Also the
    per-key request count."""
    if key is not None and key.id:
        state.metrics.record_key(key.id, exchange.status)
    prompt_tokens, completion_tokens = exchange.usage()
    record = audit_record(
        request.doc if request is not None else None,
        request.image_digests if request is not None else (),
        include_prompts=state.audit.include_prompts,
        time=arrived,
        request_id=exchange.request_id.decode(),
        key_id=key.id if key is not None else "",
        model=request.model if request is not None else "",
        cache=exchange.cache_result.decode(),
        replica=exchange.replica.decode(),
        status=exchange.status,
        error_type=exchange.error_type,
        latency_ms=round((time.perf_counter() - exchange.started) * 1000, 3),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        batch_id=line.batch_id if line is not None else "",
        version=exchange.version.decode(),
    )
    try:
        await state.audit.write(record)
    except AuditLogError as exc:
        log.error("audit line for request %s not written: %s", record.request_id, exc)


async def _read_body(receive: Receive, limit: int, content_length: bytes | None) -> bytes:
    """The body, refused as soon as it is known to exceed `limit`: from Content-Length before reading
    anything, else while reading (a huge body is never held whole)."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise RequestTooLarge(f"request body is over {limit} bytes", code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("client disconnected while sending the body", code="client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body is over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _until_disconnect(
    work: Coroutine[None, None, None], receive: Receive, exchange: Exchange, metrics: RouterMetrics
) -> None:
    """Run `work`, cancelling it if the client disconnects first (so the replica's request is aborted)."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not exchange.finished:
                    gone = True
                    task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        exchange.error_type = "client_disconnected"
        exchange.status = exchange.status or 499
        metrics.record_disconnect(exchange.model)
    finally:
        watcher.cancel()
