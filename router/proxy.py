"""Send a parsed request to a replica and hand back its answer, retrying elsewhere before the first byte.

Streaming convention: `open()` returns once the answer is committed to one replica. For a
non-streamed request (or any non-200 answer) that means the whole body is in hand; for a stream it
means the first chunk is. Until then every failure (cannot connect, 5xx, connection lost) moves the
request to another replica, up to `max_attempts`. After it, `relay()` yields the rest of the stream
and ends it with an SSE error event if the replica dies. The caller must always call `close()`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from qvl.settings import RouterSettings
from router.admission import Admission
from router.classes import BATCH, batch_room
from router.edge import ChatRequest
from router.errors import (
    ModelNotFound,
    NoHealthyReplica,
    Overloaded,
    RouterError,
    StreamInterrupted,
    UpstreamTimeout,
    UpstreamUnavailable,
    sse_error_event,
)
from router.metrics import RouterMetrics
from router.policies import Policy
from router.replicas import Replica, ReplicaPool
from router.upstream import ConnectFailed, ConnectionLost, Response, UpstreamClient

CHAT_PATH = b"/v1/chat/completions"
log = logging.getLogger("qvl.router.proxy")


@dataclass(slots=True)
class Upstream:
    """An answer committed to one replica: a complete body, or an open stream and its first chunk."""

    replica: Replica
    status: int
    content_type: bytes
    body: bytes
    response: Response | None = None
    closed: bool = False
    interrupted: bool = False
    """The replica failed mid-stream and the client got an SSE error event."""
    batch: bool = False
    """A batch line: it holds one of the replica's batch slots too."""


class _Retry(Exception):
    """This attempt failed before any byte reached the client; `reason` becomes a metric label."""

    def __init__(self, reason: str, detail: str, replica_fault: bool) -> None:
        super().__init__(detail)
        self.reason = reason
        self.replica_fault = replica_fault


class Proxy:
    def __init__(
        self,
        pool: ReplicaPool,
        policy: Policy,
        client: UpstreamClient,
        settings: RouterSettings,
        metrics: RouterMetrics,
        admission: Admission,
    ) -> None:
        self._pool = pool
        self._admission = admission
        self._policy = policy
        self._client = client
        self._max_attempts = settings.max_attempts
        self._metrics = metrics
        self._deadline_s = settings.request_timeout_s
        self._check_interval_s = settings.health.interval_s
        self._batch = settings.batch
        self.make_room: Callable[[Replica], None] | None = None
        """Set by the batch runner: take one of its lines off a replica (an interactive request needs the slot)."""

    @property
    def waiting(self) -> int:
        """Requests waiting for a replica slot in this router."""
        return self._admission.waiting

    async def open(self, request: ChatRequest, request_id: str) -> Upstream:
        """Commit the request to a replica; raises a RouterError when no replica could take it."""
        served = request.served
        candidates = self._pool.candidates(served)
        if not candidates:
            if served in self._pool.known_models or request.model in self._pool.known_models:
                self._metrics.record_rejection("no_healthy_replica")
                raise self._no_healthy_replica(served)
            self._metrics.record_rejection("model_not_found")
            raise ModelNotFound(f"model '{request.model}' is not served here", code="model_not_found", param="model")
        if request.klass == BATCH:
            # Batch lines never wait in the router's queue: they go only where there is room, or not now.
            floor = request.ticket is not None and request.ticket.floor
            candidates = [r for r in candidates if batch_room(r, self._batch, floor)]
            if not candidates:
                raise Overloaded("no replica has room for batch lines now", code="queue_full", retry_after_s=1)
            wanted = request.ticket.wanted if request.ticket is not None else ""
            candidates = [r for r in candidates if r.name == wanted] or candidates
        else:
            try:
                candidates = await self._admission.admit(lambda: self._pool.candidates(served))
            except RouterError as exc:
                self._metrics.record_rejection(exc.code or exc.type)
                raise
        if not candidates:
            self._metrics.record_rejection("no_healthy_replica")
            raise self._no_healthy_replica(served)
        headers = ((b"content-type", b"application/json"), (b"x-request-id", request_id.encode()))
        failures: list[str] = []
        for attempt in range(self._max_attempts):
            if not candidates:
                break
            if attempt:
                self._metrics.record_retry(request.model)
            replica = self._policy.choose(candidates, request)
            try:
                return await self._attempt(replica, request, headers)
            except _Retry as retry:
                self._metrics.record_upstream_error(replica.name, retry.reason)
                if retry.replica_fault:
                    self._pool.report_failure(replica, str(retry))
                failures.append(f"{replica.name}: {retry}")
                candidates = [r for r in candidates if r is not replica]
        # Details (replica addresses, socket errors) go to the log, not to the client.
        log.warning("request %s failed on every attempt: %s", request_id, "; ".join(failures))
        raise UpstreamUnavailable(
            f"no replica could answer after {len(failures)} attempt(s); the request was not processed",
            code="upstream_unavailable",
        )

    def _no_healthy_replica(self, served: str) -> NoHealthyReplica:
        # An ejected replica is readmitted by a health check at the earliest: retry after the next one.
        model, at, version = served.partition("@")
        what = f"version '{version}' of model '{model}'" if at else f"model '{model}'"
        return NoHealthyReplica(
            f"no healthy replica serves {what} right now",
            code="no_healthy_replica",
            retry_after_s=self._check_interval_s,
        )

    async def _attempt(
        self, replica: Replica, request: ChatRequest, headers: tuple[tuple[bytes, bytes], ...]
    ) -> Upstream:
        batch = request.klass == BATCH
        full = replica.slots and replica.in_flight >= replica.slots
        if not batch and replica.batch_in_flight and full and self.make_room is not None:
            # The engine is full and would queue this request behind batch lines: one of them makes way.
            self.make_room(replica)
        replica.in_flight += 1
        replica.batch_in_flight += batch
        if not batch:
            replica.interactive_sent = time.monotonic()
        if request.ticket is not None:
            request.ticket.replica = replica.name
        response: Response | None = None
        try:
            response = await self._client.request(
                replica.origin, b"POST", CHAT_PATH, body=request.body, headers=headers, deadline_s=self._deadline_s
            )
            if response.status >= 500:
                raise _Retry("http_5xx", f"answered HTTP {response.status}", replica_fault=False)
            content_type = response.header(b"content-type", b"application/json")
            if not request.stream or response.status != 200:
                body = await response.read()
                response.release()
                self._done(replica, batch)
                return Upstream(replica, response.status, content_type, body, closed=True, batch=batch)
            first = await response.read_chunk()
            if not first:
                raise _Retry("disconnect", "ended the stream before the first byte", replica_fault=True)
            return Upstream(replica, response.status, content_type, first, response=response, batch=batch)
        except _Retry:
            self._drop(replica, response, batch)
            raise
        except ConnectFailed as exc:
            self._drop(replica, response, batch)
            reason = "connect_timeout" if exc.timeout else "connect"
            raise _Retry(reason, str(exc), replica_fault=True) from None
        except ConnectionLost as exc:
            self._drop(replica, response, batch)
            raise _Retry("disconnect", str(exc), replica_fault=True) from None
        except TimeoutError:
            self._drop(replica, response, batch)
            self._metrics.record_upstream_error(replica.name, "timeout")
            raise UpstreamTimeout(
                f"replica {replica.name} took longer than the request timeout", code="upstream_timeout"
            ) from None
        except BaseException:
            # Cancelled because the client went away: drop the connection so the engine aborts too.
            self._drop(replica, response, batch)
            raise

    async def relay(self, upstream: Upstream) -> AsyncIterator[bytes]:
        """The stream after its first chunk; ends with an SSE error event if the replica dies mid-way."""
        response = upstream.response
        if response is None:
            return
        try:
            while chunk := await response.read_chunk():
                yield chunk
        except (ConnectionLost, TimeoutError) as exc:
            self._pool.report_failure(upstream.replica, f"stream broken: {exc}")
            self._metrics.record_upstream_error(upstream.replica.name, "stream_interrupted")
            upstream.interrupted = True
            yield sse_error_event(
                StreamInterrupted(
                    f"replica {upstream.replica.name} failed mid-stream; the answer is incomplete",
                    code="stream_interrupted",
                )
            )

    def close(self, upstream: Upstream, *, complete: bool) -> None:
        """Release the replica slot; a stream not read to its end is dropped so the engine aborts it."""
        if upstream.closed:
            return
        upstream.closed = True
        self._done(upstream.replica, upstream.batch)
        if upstream.response is not None:
            if complete:
                upstream.response.release()
            else:
                upstream.response.close()

    def _done(self, replica: Replica, batch: bool) -> None:
        replica.in_flight -= 1
        replica.batch_in_flight -= batch
        self._admission.released()

    def _drop(self, replica: Replica, response: Response | None, batch: bool) -> None:
        self._done(replica, batch)
        if response is not None:
            response.close()
