"""Priority classes: `interactive` (the default), `flex` (a client's `service_tier: flex`) and `batch` (lines of
batch jobs, router/batch/). Each class is forwarded to vLLM as its `priority` (lower runs first; the replicas
run `--scheduling-policy priority`), so the engine orders its own queue too. A client's own `priority` field
is always replaced: no caller picks its place in the queue.

Under overload `flex` is shed first (429 `flex_shed` with Retry-After); batch lines are sent only to replicas
with room (`batch_room`), at most `batch.in_flight_per_replica` at a time; interactive requests wait for a
router slot as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Final, Literal

import orjson

from qvl.settings import BatchSettings, ClassSettings
from router.edge import ChatRequest
from router.errors import InvalidRequest, RateLimited
from router.replicas import Replica

Klass = Literal["interactive", "flex", "batch"]
INTERACTIVE: Final = "interactive"
FLEX: Final = "flex"
BATCH: Final = "batch"
CLASSES: tuple[Klass, ...] = (INTERACTIVE, FLEX, BATCH)
_TIERS = {None: INTERACTIVE, "auto": INTERACTIVE, "default": INTERACTIVE, "flex": FLEX}


def request_class(doc: dict[str, object]) -> Klass:
    """The class a client asked for with `service_tier` (absent, auto or default: interactive; flex).
    Raises InvalidRequest (invalid_service_tier) for anything else."""
    tier = doc.get("service_tier")
    klass = _TIERS.get(tier) if tier is None or isinstance(tier, str) else None
    if klass is None:
        raise InvalidRequest(
            "`service_tier` must be one of auto, default or flex", code="invalid_service_tier", param="service_tier"
        )
    return klass  # type: ignore[return-value]


def with_class(request: ChatRequest, klass: Klass, settings: ClassSettings, floor: bool = False) -> ChatRequest:
    """The request as forwarded for `klass`: its priority in the body (when forwarding is on), the class noted.
    A batch line under the aging floor goes at interactive priority: at batch priority the engine's own
    priority queue would starve it behind the very load it is meant to get through."""
    if klass == INTERACTIVE and "priority" not in request.doc:
        return request  # the common case: the body goes out byte for byte
    body = request.body
    if settings.forward_priority:
        priority = {INTERACTIVE: settings.interactive_priority, FLEX: settings.flex_priority}.get(
            klass, settings.interactive_priority if floor else settings.batch_priority
        )
        body = orjson.dumps({**request.doc, "priority": priority})
    elif "priority" in request.doc:
        body = orjson.dumps({k: v for k, v in request.doc.items() if k != "priority"})
    return dataclasses.replace(request, body=body, klass=klass)


def saturated(replica: Replica, queue: int) -> bool:
    """The engine has at least `queue` requests waiting (0: never counts as saturated)."""
    return queue > 0 and replica.waiting >= queue


def shed_flex(candidates: Sequence[Replica], router_waiting: int, settings: ClassSettings) -> None:
    """Raises RateLimited (flex_shed) when every candidate's engine queue is at `flex_shed_queue` or requests
    already wait for a router slot: flex gives way before anything else does."""
    queue = settings.flex_shed_queue
    if queue == 0:
        return
    if router_waiting > 0 or (candidates and all(saturated(r, queue) for r in candidates)):
        raise RateLimited(
            "the cluster is busy and flex requests are served only with capacity to spare; retry later",
            code="flex_shed",
            retry_after_s=2,
        )


def spare(replica: Replica, settings: BatchSettings) -> bool:
    """The replica has room to spare (as last scraped from its /metrics): its KV cache is below
    `spare_kv_cache`, and no request waits in its engine, or some do but only for the next step (the engine
    runs fewer than the most it was ever seen running while requests waited, `Replica.slots`, less one)."""
    kv = replica.engine.kv_cache_usage
    if kv is not None and kv >= settings.spare_kv_cache:
        return False
    return replica.waiting == 0 or (replica.slots > 1 and replica.running < replica.slots - 1)


def batch_room(replica: Replica, settings: BatchSettings, floor: bool = False, now: float | None = None) -> bool:
    """Whether a batch line may go to `replica` now: it has room to spare, fewer than `in_flight_per_replica`
    of this router's batch lines, and, once its slots are known, `headroom_slots` of them stay free for
    interactive arrivals (the requests in its engine, or this router's in flight to it when more). With
    `now` (time.monotonic(), when a new line would start), also not within `quiet_after_interactive_s` of an
    interactive request sent there: that request's prefill step is not stretched by a batch prefill. `floor`
    (the aging floor) allows one line on a replica without room."""
    if floor:
        return replica.batch_in_flight < 1
    if not spare(replica, settings) or replica.batch_in_flight >= settings.in_flight_per_replica:
        return False
    if now is not None and now - replica.interactive_sent < settings.quiet_after_interactive_s:
        return False
    occupied = max(replica.in_flight, replica.running + replica.waiting)
    return not replica.slots or occupied < replica.slots - settings.headroom_slots
