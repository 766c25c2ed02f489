"""`qvl sim`: a simulated engine that speaks `vllm serve`'s HTTP API and metrics, on CPU, for load tests.

What it is for
    Load tests, capacity planning and router development without GPUs. It answers the parts of the
    vLLM OpenAI server the router uses, in the same shapes, and exposes vLLM's own `vllm:` metrics,
    so the router's policies, Prometheus rules and Grafana dashboards work against it unchanged.
    It is not a model and not a mock of our code: the text is made-up words, but the timing,
    queueing and caching behave like a replica under load. At zero delay one core serves thousands
    of requests per second, so the router, not the simulator, is what a load test measures.

HTTP API
    POST /v1/chat/completions   JSON or SSE (`stream`), `stream_options.include_usage`,
                                `max_tokens` / `max_completion_tokens`, `priority` (or the
                                `X-Vllm-Priority` header); images as base64 data URLs
    GET  /v1/models             the served model, then its aliases (`aliases`), with `max_model_len`
    GET  /health                200, empty body
    GET  /version               {"version": "qvl-sim <version>"} (vLLM answers its own version here)
    GET  /metrics               Prometheus text: vllm:num_requests_running / _waiting,
                                vllm:kv_cache_usage_perc, vllm:prefix_cache_queries / _hits,
                                vllm:mm_cache_queries / _hits, vllm:request_success{finished_reason},
                                vllm:prompt_tokens, vllm:generation_tokens, and the TTFT, inter-token
                                and end-to-end latency histograms, all labelled `model_name`;
                                KV-cache usage is the KV tokens running requests hold, as a share of
                                max_running full contexts (the simulator never runs out of KV)
    A request may name the model or any alias, and the reply's `model` echoes the name it used; another
    name gives 404 (`NotFoundError`); a malformed body or image gives 400 (`BadRequestError`), both as
    OpenAI-style JSON errors. `x-request-id` is echoed. A client that disconnects, queued or
    mid-stream, has its request cancelled at once.

Latency model (milliseconds; written down in serving/sim/core.py, run in real time by engine.py)
    The engine works in steps, like vLLM's continuous batching. Each step admits waiting requests
    in the queue's order (at most `max_running` run; the prompts admitted together stay within
    `max_batched_tokens`), prefills them and decodes one token for every running request. The order
    is vLLM's `--scheduling-policy` (`scheduling_policy`): `priority` (the default, as our vLLM
    replicas run) admits the lowest request `priority` first and arrivals in order among equals;
    `fcfs` admits in arrival order and ignores priorities. Nothing is preempted (vLLM preempts only
    when the KV cache is full, which the simulator does not model). It lasts
        step_base + per_decode * decoding requests + per_kv_ktoken * KV tokens held / 1000
        + per prefilled request: prefill_base + per_text_token * (text characters / 4)
                                 + per_image_token * image tokens not in the mm cache
                                 + per_image_token * (1 - image_hit_discount) * cached image tokens
    A request's first token comes at the end of its prefill step, then one per step; before the
    engine sees it, it waits frontend_base + frontend_per_image_token * image tokens. Image tokens
    follow Qwen3-VL's smart resize (qvl/images.py). The mm cache is an LRU of `mm_cache_items`
    image digests (SHA-256 of the decoded bytes). A request generates `output_tokens` tokens
    (finish "stop"), or fewer if `max_tokens` asks for fewer (finish "length").

Flags (each also a `sim.*` YAML setting and a `QVL_SIM__*` variable)
    --host, --port, --model               where to listen and the model name served
    --max-running N                       concurrent decodes (vLLM's max_num_seqs)
    --max-batched-tokens N                prompt tokens admitted into one step
    --scheduling-policy fcfs|priority     the waiting queue's order (above)
    --output-tokens N                     tokens generated when the request sets no cap
    --mm-cache-items N                    image digests in the LRU (0 disables the cache)
    --step-base-ms, --per-decode-ms, --per-kv-ktoken-ms, --prefill-base-ms, --per-text-token-ms,
    --per-image-token-ms, --image-hit-discount, --frontend-base-ms, --frontend-per-image-token-ms
                                          the terms above
    --profile PATH                        a capacity profile (serving/sim/profile.py): its costs, engine
                                          limits and token counting replace the settings above
    --zero-delay                          every latency term at zero: nothing sleeps (throughput tests)
    Settings without a flag: sim.max_model_len (context length; longer requests get a 400),
    sim.image_min_pixels / sim.image_max_pixels (the resize bounds, Qwen3-VL's by default), sim.aliases,
    and the injected faults below.

Faults (for rollout tests: a canary that fails or is slow; `--zero-delay` keeps them)
    sim.fault_error_ratio       share of valid chat requests answered at once with a 500
                                (`InternalServerError`), drawn per request; seeded by sim.fault_seed
    sim.fault_added_ttft_ms     extra time before the engine sees each request (after a stream's
                                200 headers): every first token, and every whole answer, that much later

Example: `qvl sim --port 8101 --model Qwen/Qwen3-VL-8B-Instruct --max-running 32`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import orjson
import uvicorn
from starlette.types import Message, Receive, Scope, Send

from qvl.images import ImageTokenCounter
from qvl.settings import SimSettings
from serving.sim.engine import Generation, RequestRejected, SimEngine
from serving.sim.openai_api import (
    ApiError,
    BadRequest,
    ChatCall,
    ChunkWriter,
    completion_body,
    completion_id,
    models_body,
    parse_chat,
    token_text,
)

logger = logging.getLogger(__name__)

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream; charset=utf-8")
_NOT_FOUND = b'{"detail":"Not Found"}'
_METHOD_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'


def _package_version() -> str:
    try:
        return importlib.metadata.version("qvl-cluster")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


class SimApp:
    """The simulated engine as a raw ASGI application (no framework on the hot path)."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.engine = SimEngine(settings)
        self._image_tokens = ImageTokenCounter(
            min_pixels=settings.image_min_pixels, max_pixels=settings.image_max_pixels
        )
        self._models = models_body(settings.model, settings.max_model_len, int(time.time()), settings.aliases)
        self._aliases = frozenset(settings.aliases)
        self._fault_ratio = settings.fault_error_ratio
        self._fault_delay = settings.fault_added_ttft_ms / 1000
        self._faults = random.Random(settings.fault_seed)
        # The base ApiError is vLLM's 500 (InternalServerError).
        fault = ApiError("injected fault: the simulated engine failed this request (sim.fault_error_ratio)")
        self._fault_status, self._fault_body = fault.status, fault.body()
        self._never_waits = self.engine.zero and not self._fault_delay
        self._routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/models": {"GET": self._list_models},
            "/health": {"GET": self._health},
            "/metrics": {"GET": self._metrics},
            "/version": {"GET": self._version},
        }
        self._version_body = orjson.dumps({"version": f"qvl-sim {_package_version()}"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        methods = self._routes.get(scope["path"])
        if methods is None:
            await _respond(send, 404, _NOT_FOUND, [_JSON])
            return
        handler = methods.get(scope["method"])
        if handler is None:
            await _respond(send, 405, _METHOD_NOT_ALLOWED, [_JSON])
            return
        await handler(scope, receive, send)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, 200, b"", [])

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, 200, self._version_body, [_JSON])

    async def _list_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, 200, self._models, [_JSON])

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics = self.engine.metrics
        await _respond(send, 200, metrics.render(), [(b"content-type", metrics.content_type.encode())])

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: list[tuple[bytes, bytes]] = []
        priority: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                headers.append((name, value))
            elif name == b"x-vllm-priority" and priority is None:  # Starlette's headers.get: the first
                priority = value
        body = await _read_body(receive)
        if body is None:
            return
        try:
            call = parse_chat(
                body,
                self.settings.model,
                self._image_tokens,
                self.settings.text_chars_per_token,
                self.settings.text_template_tokens,
                priority,
                self._aliases,
            )
            generation = self.engine.submit(call.request)
        except RequestRejected as exc:
            error = BadRequest(str(exc))
            await _respond(send, error.status, error.body(), [_JSON, *headers])
            return
        except ApiError as exc:
            await _respond(send, exc.status, exc.body(), [_JSON, *headers])
            return
        if self._fault_ratio and self._faults.random() < self._fault_ratio:
            await _respond(send, self._fault_status, self._fault_body, [_JSON, *headers])
            return
        if call.stream:
            work = self._stream(send, call, generation, headers)
        else:
            work = self._complete(send, call, generation, headers)
        if self._never_waits:
            # At zero cost the engine never waits (it steps itself) and, with no added fault delay,
            # nothing here can suspend except a send, which a disconnect releases: skip the watcher.
            await work
        else:
            await _cancel_on_disconnect(receive, work)

    async def _complete(
        self, send: Send, call: ChatCall, generation: Generation, headers: list[tuple[bytes, bytes]]
    ) -> None:
        seed = generation.prompt_tokens
        if self._fault_delay:
            await asyncio.sleep(self._fault_delay)
        async with generation:
            parts = [token_text(index, seed) async for index in generation.tokens()]
        body = completion_body(
            completion_id(),
            call.model,
            "".join(parts),
            generation.finish_reason,
            generation.prompt_tokens,
            generation.completion_tokens,
        )
        await _respond(send, 200, body, [_JSON, *headers])

    async def _stream(
        self, send: Send, call: ChatCall, generation: Generation, headers: list[tuple[bytes, bytes]]
    ) -> None:
        seed = generation.prompt_tokens
        last = generation.completion_tokens - 1
        writer = ChunkWriter(completion_id(), call.model)
        # vLLM answers 200 and its headers before the request is scheduled, so a queued stream has them too.
        await send({"type": "http.response.start", "status": 200, "headers": [_SSE, *headers]})
        if self._fault_delay:
            await asyncio.sleep(self._fault_delay)
        async with generation:
            async for index in generation.tokens():
                reason = generation.finish_reason if index == last else None
                chunk = writer.token(token_text(index, seed), reason)
                # vLLM sends the role chunk with the engine's first output, not on admission: the
                # first body byte of a stream means prefill is done.
                await _chunk(send, writer.role() + chunk if index == 0 else chunk)
        tail = b""
        if call.include_usage:
            tail = writer.usage(generation.prompt_tokens, generation.completion_tokens)
        await send({"type": "http.response.body", "body": tail + writer.done(), "more_body": False})


async def _cancel_on_disconnect(receive: Receive, work: Coroutine[Any, Any, None]) -> None:
    """Run `work` in this task; if the client goes away first, cancel it and return quietly.

    Cancelling this task (not a child) keeps the cheap path: the work runs inline, and the
    engine's context managers release the request's slot or queue place on the way out.
    """
    task = asyncio.current_task()
    assert task is not None
    watch = _DisconnectWatch(task)
    watcher = asyncio.get_running_loop().create_task(watch.run(receive))
    try:
        await work
    except asyncio.CancelledError:
        if not watch.fired:
            raise
        task.uncancel()
    finally:
        watch.finished = True
        watcher.cancel()


class _DisconnectWatch:
    """Waits for `http.disconnect` and cancels the request's task if it is still working."""

    __slots__ = ("finished", "fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.fired = False
        self.finished = False

    async def run(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        # uvicorn also reports a completed response as a disconnect; only a live request is cancelled.
        if not self.finished:
            self.fired = True
            self.task.cancel()


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client left before sending it."""
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return None if message["type"] == "http.disconnect" else body
    parts = [body]
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
    return b"".join(parts)


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _chunk(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def create_app(settings: SimSettings) -> SimApp:
    """The simulated engine's ASGI app; `app.engine` holds its scheduler and metrics."""
    return SimApp(settings)


def run_sim(settings: SimSettings, log_level: str) -> int:
    """Serve the simulated engine in the foreground until SIGINT or SIGTERM.

    Returns 0 after a clean stop, 1 if the server never started (for example, the port is taken).
    """
    app = create_app(settings)
    if settings.startup_delay_s:
        # A cold start: nothing listens yet, as with vLLM loading weights; SIGTERM still ends the process.
        logger.info("simulated cold start: listening in %.1f s", settings.startup_delay_s)
        time.sleep(settings.startup_delay_s)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level=log_level,
        server_header=False,
        proxy_headers=False,
        # Load tests stop replicas mid-request; in-flight simulated requests are not worth waiting for.
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    logger.info(
        "simulated engine for %s on http://%s:%d (max_running=%d, max_batched_tokens=%d%s%s)",
        settings.model,
        settings.host,
        settings.port,
        settings.max_running,
        settings.max_batched_tokens,
        f", profile {settings.profile}" if settings.profile else "",
        ", zero delay" if app.engine.zero else "",
    )
    # uvicorn re-raises a captured SIGINT after its graceful shutdown; Ctrl+C is a clean stop here.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 1
