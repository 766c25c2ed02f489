"""One chat request's way out: from the cache, or from a replica (recorded for the cache when it may be
stored), or as an error. Remembers what the request metrics need."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import orjson
from starlette.types import Send

from cache.flight import AnswerCache
from cache.replay import StreamRecorder, completion_is_cacheable, completion_to_sse
from router.edge import ChatRequest
from router.errors import RouterError, StreamInterrupted, error_answer
from router.metrics import UNKNOWN_MODEL, RouterMetrics
from router.proxy import Proxy

log = logging.getLogger("qvl.router")

NO_REPLICA = b"none"
FROM_CACHE = b"cache"
JSON = b"application/json"
SSE = b"text/event-stream; charset=utf-8"


class Exchange:
    """`status` is what the metrics report: the HTTP status sent, or for a stream that ended with an error
    event, that error's status."""

    __slots__ = (
        "answer",
        "cache",
        "cache_result",
        "error_type",
        "finished",
        "first_at",
        "metrics",
        "model",
        "proxy",
        "replica",
        "request_id",
        "send",
        "started",
        "status",
        "version",
    )

    def __init__(
        self,
        proxy: Proxy,
        cache: AnswerCache,
        metrics: RouterMetrics,
        send: Send,
        request_id: bytes,
        started: float,
    ) -> None:
        self.proxy = proxy
        self.cache = cache
        self.metrics = metrics
        self.send = send
        self.request_id = request_id
        self.started = started
        self.model = UNKNOWN_MODEL
        self.replica = NO_REPLICA
        self.cache_result = b"none"
        self.status = 0
        self.error_type = ""
        self.finished = False
        self.answer = b""
        """The JSON answer, or for a stream the last chunk that carried usage (for the audit log)."""
        self.version = b""
        """The model version answering (x-qvl-model-version): the route's choice, else the replica's."""
        self.first_at = 0.0
        """perf_counter() of a stream's first chunk (0: not a stream, or none came)."""

    async def serve(self, request: ChatRequest, cache_control: str | None) -> None:
        """Answer the request; the cache's flight, if any, is always finished (followers never hang)."""
        lookup = await self.cache.begin(request, cache_control)
        self.cache_result = lookup.result.encode()
        if lookup.entry is not None:
            await self._from_cache(request, lookup.entry)
            return
        entry: bytes | None = None
        try:
            entry = await self._from_replica(request, record=lookup.flight is not None)
        finally:
            if lookup.flight is not None:
                await lookup.flight.finish(entry)

    async def fail(self, exc: RouterError) -> None:
        if exc.status >= 500:
            log.warning("request %s failed: %s", self.request_id.decode(), exc.message)
        self.error_type = exc.type
        answer = error_answer(exc)
        await self._start(answer.status, answer.headers)
        self.finished = True
        await self.send({"type": "http.response.body", "body": answer.body})

    async def _from_cache(self, request: ChatRequest, entry: bytes) -> None:
        self.replica = FROM_CACHE
        if request.stream:
            options = request.doc.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            await self._start(200, ((b"content-type", SSE),))
            body = completion_to_sse(entry, include_usage)
        else:
            await self._start(200, ((b"content-type", JSON),))
            body = entry
        self.answer = entry
        self.finished = True
        await self.send({"type": "http.response.body", "body": body})

    async def _from_replica(self, request: ChatRequest, record: bool) -> bytes | None:
        """Proxy to a replica; returns the answer in cacheable form when `record` and it is complete."""
        proxy = self.proxy
        try:
            upstream = await proxy.open(request, self.request_id.decode())
        except RouterError as exc:
            await self.fail(exc)
            return None
        complete = False
        try:
            self.replica = upstream.replica.name.encode()
            if not self.version:
                self.version = upstream.replica.versions.get(request.model, "").encode()
            await self._start(upstream.status, ((b"content-type", upstream.content_type),))
            if upstream.response is None:
                self.finished = True
                await self.send({"type": "http.response.body", "body": upstream.body})
                complete = True
                self.answer = upstream.body
                ok = record and upstream.status == 200 and completion_is_cacheable(upstream.body)
                return upstream.body if ok else None
            recorder = StreamRecorder() if record else None
            if recorder is not None:
                recorder.feed(upstream.body)
            first_at = last_at = self.first_at = time.perf_counter()
            await self.send({"type": "http.response.body", "body": upstream.body, "more_body": True})
            events = 0
            async for chunk in proxy.relay(upstream):
                if recorder is not None:
                    recorder.feed(chunk)
                # Token events only ("data: {"), not [DONE]; a chunk may carry several events.
                if found := chunk.count(b"data: {"):
                    events += found
                    last_at = time.perf_counter()
                    if b'"usage":{' in chunk:
                        self.answer = chunk
                await self.send({"type": "http.response.body", "body": chunk, "more_body": True})
            self.finished = True
            await self.send({"type": "http.response.body", "body": b""})
            complete = True
            if upstream.interrupted:
                self.status = StreamInterrupted.status
                self.error_type = StreamInterrupted.type
                return None
            self.metrics.record_stream_timing(
                self.model, first_at - self.started, (last_at - first_at) / events if events else None
            )
            # A non-streamed answer always has usage; a stream has it only with include_usage. A stream
            # without it is not stored, or a later non-streamed hit would lack usage.
            if recorder is None or not recorder.has_usage:
                return None
            return recorder.completion()
        finally:
            proxy.close(upstream, complete=complete)

    async def _start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Send the status and `headers` (the content type first), with the request's own headers."""
        self.status = status
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    *headers,
                    (b"x-request-id", self.request_id),
                    (b"x-qvl-replica", self.replica),
                    (b"x-qvl-cache", self.cache_result),
                    (b"x-qvl-model-version", self.version or b"none"),
                ],
            }
        )

    def usage(self) -> tuple[int | None, int | None]:
        """(prompt_tokens, completion_tokens) of the answer, when it reported them."""
        answer = self.answer
        if not answer:
            return None, None
        docs = []
        if answer.lstrip().startswith(b"{"):
            docs.append(answer)
        else:
            docs = [line[6:] for line in answer.split(b"\n") if line.startswith(b"data: {") and b'"usage"' in line]
        for raw in reversed(docs):
            try:
                usage = orjson.loads(raw).get("usage")
            except orjson.JSONDecodeError:
                continue
            if isinstance(usage, dict):
                prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
                return (
                    prompt if isinstance(prompt, int) else None,
                    completion if isinstance(completion, int) else None,
                )
        return None, None
