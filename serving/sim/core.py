"""The simulated engine's scheduler and step-time model, with no clock: the same code runs in real time
(serving/sim/engine.py sleeps each step's duration) and in virtual time (the capacity planner advances
a simulated clock by it), so the planner predicts with the very scheduler the simulated replicas run.

The engine works in steps, like vLLM's continuous batching. One step:

1. admits waiting requests in the queue's order, while fewer than `max_running` run and the prompts
   admitted in this step stay within `max_batched_tokens` (the first one always fits);
2. prefills every admitted request (its first token appears at the end of the step) and decodes one
   token for every request already running;
3. lasts, in seconds (`StepCosts.duration`):

       step_base + per_decode * decoding requests + per_kv_ktoken * KV tokens held / 1000
       + per each prefilled request: prefill_base + per_text_token * text tokens
                                     + per_image_token * image tokens of images not in the mm cache
                                     + per_image_token * (1 - image_hit_discount) * tokens of cached images

   so a prefill slows every decode that shares its step, and decoding slows as the batch and the KV
   cache grow.

A request with n output tokens finishes at the end of the step that produced its nth token. The mm
cache is an LRU of `mm_cache_items` image digests, consulted when a request is admitted.

The queue's order is vLLM's `--scheduling-policy`: `fcfs` admits in arrival order and ignores a
request's priority; `priority` admits the lowest `priority` first (vLLM's convention: lower is served
earlier), in arrival order among equals, so traffic that is all priority 0 runs exactly as under fcfs.
vLLM breaks ties on the time a request reached its front end; here arrival is when the core got it,
which differs only when front-end delays reorder two requests of the same priority. A request once
admitted keeps its place: vLLM's v1 scheduler preempts a running request (under `priority`, the one of
the highest priority value, latest arrival) only when a running request cannot get KV blocks for its
next token, and a waiting request never preempts. The simulator models no KV limit (see
`kv_tokens`), so it never preempts.

Driving it: `add` a request, then repeatedly `plan()` (None when idle; else the step's duration, and
the step is now fixed) and `finish()` after that many seconds (the requests that got their first
token, and those that finished). `abort` removes a request at any time between steps. Between steps
`running` and `waiting_seen` are what vLLM's gauges would show: vLLM counts a request as waiting once its
scheduler has passed it over, and one that arrives during a step reaches the scheduler only at the next
step's start, so `waiting_seen` is the queue the last `plan` left (less requests aborted since), while
`waiting` counts every request not yet admitted. Bookkeeping per step does not grow with the
batch (the KV total is kept as running sums), so the planner can simulate large fleets quickly.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Sequence
from dataclasses import dataclass, fields

from qvl.settings.serving import SchedulingPolicy

FEATURES = ("step", "decodes", "kv_ktokens", "prefills", "text_tokens", "missed_image_tokens", "hit_image_tokens")
"""The linear features of a step, in the order `StepCosts.coefficients` weighs them (for fitting)."""


@dataclass(frozen=True, slots=True)
class StepCosts:
    """The step-time model's terms, in seconds (see the module docstring)."""

    step_base: float
    per_decode: float
    per_kv_ktoken: float
    prefill_base: float
    per_text_token: float
    per_image_token: float
    image_hit_discount: float = 1.0

    @property
    def zero(self) -> bool:
        """Whether every step takes no time (the simulated engine then never sleeps)."""
        return not any(getattr(self, f.name) for f in fields(self) if f.name != "image_hit_discount")

    def coefficients(self) -> tuple[float, ...]:
        """The weights of FEATURES: a step's duration is their dot product with the step's features."""
        return (
            self.step_base,
            self.per_decode,
            self.per_kv_ktoken,
            self.prefill_base,
            self.per_text_token,
            self.per_image_token,
            self.per_image_token * (1.0 - self.image_hit_discount),
        )

    @classmethod
    def from_coefficients(cls, c: Sequence[float]) -> StepCosts:
        """The inverse of `coefficients`; the hit discount comes from the ratio of the two image weights."""
        step_base, per_decode, per_kv, prefill_base, per_text, per_image, per_hit = c
        discount = 1.0 - per_hit / per_image if per_image > 0 else 1.0
        return cls(step_base, per_decode, per_kv, prefill_base, per_text, per_image, min(max(discount, 0.0), 1.0))

    def duration(self, features: Sequence[float]) -> float:
        """Seconds a step with these FEATURES takes."""
        return sum(w * x for w, x in zip(self.coefficients(), features, strict=True))


@dataclass(frozen=True, slots=True)
class CoreImage:
    """One image of a prompt: a digest (any hashable bytes) and the tokens it costs."""

    digest: bytes
    tokens: int


class CoreRequest:
    """One request inside the engine core; `handle` is the driver's own (a stream, a record, ...).

    `priority` orders the waiting queue under the `priority` policy (lower first, vLLM's convention)."""

    __slots__ = (
        "aborted",
        "first_step",
        "handle",
        "hit_image_tokens",
        "image_hits",
        "images",
        "missed_image_tokens",
        "output_tokens",
        "priority",
        "prompt_tokens",
        "text_tokens",
    )

    def __init__(
        self,
        text_tokens: int,
        images: Sequence[CoreImage],
        output_tokens: int,
        handle: object = None,
        priority: int = 0,
    ) -> None:
        if output_tokens < 1:
            raise ValueError("a request produces at least one token")
        self.text_tokens = text_tokens
        self.images = images
        self.prompt_tokens = text_tokens + sum(image.tokens for image in images)
        self.output_tokens = output_tokens
        self.handle = handle
        self.priority = priority
        self.first_step = -1  # the step that prefilled it; -1 while waiting
        self.image_hits = 0
        self.hit_image_tokens = 0
        self.missed_image_tokens = 0
        self.aborted = False

    @property
    def admitted(self) -> bool:
        return self.first_step >= 0

    def generated(self, steps_done: int) -> int:
        """Tokens produced once `steps_done` steps have finished."""
        if self.first_step < 0 or steps_done <= self.first_step:
            return 0
        return min(steps_done - self.first_step, self.output_tokens)


class ArrivalQueue:
    """vLLM's FCFSRequestQueue: arrival order, priorities ignored."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: collections.deque[CoreRequest] = collections.deque()

    def push(self, request: CoreRequest) -> None:
        self._items.append(request)

    def head(self) -> CoreRequest | None:
        """The next request to admit (aborted ones are dropped on the way); None when empty."""
        items = self._items
        while items and items[0].aborted:
            items.popleft()
        return items[0] if items else None

    def pop(self) -> CoreRequest:
        """Remove and return `head()`, which must have been called just before."""
        return self._items.popleft()


class PriorityQueue:
    """vLLM's PriorityRequestQueue: the lowest priority first, arrival order among equals."""

    __slots__ = ("_arrivals", "_heap")

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, CoreRequest]] = []
        self._arrivals = 0  # the tiebreak: equal priorities leave in arrival order, as from a deque

    def push(self, request: CoreRequest) -> None:
        self._arrivals += 1
        heapq.heappush(self._heap, (request.priority, self._arrivals, request))

    def head(self) -> CoreRequest | None:
        """The next request to admit (aborted ones are dropped on the way); None when empty."""
        heap = self._heap
        while heap and heap[0][2].aborted:
            heapq.heappop(heap)
        return heap[0][2] if heap else None

    def pop(self) -> CoreRequest:
        """Remove and return `head()`, which must have been called just before."""
        return heapq.heappop(self._heap)[2]


QUEUES: dict[SchedulingPolicy, type[ArrivalQueue] | type[PriorityQueue]] = {
    "fcfs": ArrivalQueue,
    "priority": PriorityQueue,
}
"""The waiting queue of each scheduling policy."""


@dataclass(slots=True)
class StepOutcome:
    """What one finished step produced."""

    index: int
    first_tokens: list[CoreRequest]
    finished: list[CoreRequest]


class EngineCore:
    """One replica's scheduler state: the waiting queue, the running batch and the mm-cache LRU.

    `policy` orders the waiting queue (see the module docstring); fcfs by default, which for traffic that
    is all priority 0 admits exactly as `priority` does, on a plain deque."""

    def __init__(
        self,
        costs: StepCosts,
        max_running: int,
        max_batched_tokens: int,
        mm_cache_items: int,
        policy: SchedulingPolicy = "fcfs",
    ) -> None:
        if max_running < 1 or max_batched_tokens < 1 or mm_cache_items < 0:
            raise ValueError("max_running and max_batched_tokens must be positive, mm_cache_items not negative")
        self.costs = costs
        self.max_running = max_running
        self.max_batched_tokens = max_batched_tokens
        self.mm_cache_items = mm_cache_items
        self.steps_done = 0
        self.running: set[CoreRequest] = set()
        self.policy = policy
        self._waiting = QUEUES[policy]()
        self._waiting_live = 0
        self._waiting_planned = 0  # what the last plan() left waiting
        self._mm_cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._ends: list[tuple[int, int, CoreRequest]] = []  # (last step, tiebreak, request)
        self._tiebreak = 0
        # Running sums over the decoding requests, so the KV total costs O(1) per step.
        self._decoding = 0
        self._prompt_sum = 0
        self._first_sum = 0
        self._planned: tuple[list[CoreRequest], int] | None = None
        self.last_features: tuple[float, ...] = ()

    @property
    def waiting(self) -> int:
        return self._waiting_live

    @property
    def waiting_seen(self) -> int:
        """The requests the last `plan` left waiting and still waiting (vLLM's num_requests_waiting)."""
        return min(self._waiting_planned, self._waiting_live)

    @property
    def idle(self) -> bool:
        return not self.running and not self._waiting_live

    def kv_tokens(self) -> int:
        """Tokens held in the KV cache by running requests, before the next step."""
        return self._prompt_sum + self._decoding * self.steps_done - self._first_sum

    def add(self, request: CoreRequest) -> None:
        """Queue a request; it is admitted by a later `plan`."""
        self._waiting.push(request)
        self._waiting_live += 1

    def abort(self, request: CoreRequest) -> None:
        """Remove a waiting or running request (a cancelled client); a no-op once it finished."""
        if request.aborted:
            return
        if request.first_step < 0:
            request.aborted = True
            self._waiting_live -= 1
            return
        if request not in self.running:
            return  # finished already
        request.aborted = True
        self.running.discard(request)
        if request.first_step < self.steps_done:
            self._forget_decoding(request)
        # else it is being prefilled in the planned step: finish() skips it

    @property
    def admitting(self) -> Sequence[CoreRequest]:
        """The requests the planned step prefills, in admission order; empty when no step is planned."""
        return self._planned[0] if self._planned is not None else ()

    def plan(self) -> float | None:
        """Fix the next step: admit what fits and return its duration in seconds; None when idle."""
        if self._planned is not None:
            raise RuntimeError("plan() twice without finish()")
        admitted: list[CoreRequest] = []
        budget = self.max_batched_tokens
        step = self.steps_done
        text = missed = hit = 0
        waiting = self._waiting
        while len(self.running) < self.max_running:
            head = waiting.head()
            if head is None or (admitted and head.prompt_tokens > budget):
                break
            waiting.pop()
            self._waiting_live -= 1
            budget -= head.prompt_tokens
            head.first_step = step
            self._lookup_images(head)
            self.running.add(head)
            admitted.append(head)
            text += head.text_tokens
            missed += head.missed_image_tokens
            hit += head.hit_image_tokens
        self._waiting_planned = self._waiting_live
        decodes = self._decoding
        if not admitted and not decodes:
            return None
        features = (1.0, decodes, self.kv_tokens() / 1000.0, len(admitted), text, missed, hit)
        self.last_features = features
        self._planned = (admitted, decodes)
        return self.costs.duration(features)

    def finish(self) -> StepOutcome:
        """End the planned step: count its tokens, retire finished requests."""
        if self._planned is None:
            raise RuntimeError("finish() without plan()")
        admitted, _ = self._planned
        self._planned = None
        step = self.steps_done
        first_tokens: list[CoreRequest] = []
        for request in admitted:
            if request.aborted:
                continue
            first_tokens.append(request)
            self._decoding += 1
            self._prompt_sum += request.prompt_tokens
            self._first_sum += request.first_step
            self._tiebreak += 1
            heapq.heappush(self._ends, (request.first_step + request.output_tokens - 1, self._tiebreak, request))
        self.steps_done = step + 1
        finished: list[CoreRequest] = []
        ends = self._ends
        while ends and ends[0][0] <= step:
            _, _, request = heapq.heappop(ends)
            if request.aborted:
                continue
            finished.append(request)
            self.running.discard(request)
            self._forget_decoding(request)
        return StepOutcome(step, first_tokens, finished)

    def _forget_decoding(self, request: CoreRequest) -> None:
        self._decoding -= 1
        self._prompt_sum -= request.prompt_tokens
        self._first_sum -= request.first_step

    def _lookup_images(self, request: CoreRequest) -> None:
        capacity = self.mm_cache_items
        cache = self._mm_cache
        for image in request.images:
            if image.digest in cache:
                cache.move_to_end(image.digest)
                request.image_hits += 1
                request.hit_image_tokens += image.tokens
                continue
            request.missed_image_tokens += image.tokens
            if capacity:
                cache[image.digest] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
