"""The fleet in virtual time: the router's own policy code in front of N engine cores, no sleeping.

One discrete-event loop (a heap) over the schedule's arrivals and each replica's next step end. An arrival
goes through what the router does, in its order:

1. the answer cache (cache/flight.py's outcomes): `hit` when the key's answer is stored (an LRU of
   `cache.memory_max_entries` entries, each kept `cache.ttl_s`), `coalesced` when an identical request is
   on its way (it gets the leader's answer when that lands; if the leader fails it goes upstream itself),
   `miss` (it leads), `bypass` when the cache is off or the request is not cacheable. A hit or a coalesced
   answer costs `profile.frontend_s(0)` and reaches no engine;
2. admission (router/admission.py): only replicas with fewer than `admission.max_in_flight_per_replica`
   requests in flight are candidates; when none is, the request waits in a FIFO of at most
   `admission.queue_size` for `admission.queue_timeout_s`, else it fails with 503 `overloaded`;
3. the routing policy, built by `build_policy` from the router's settings, picks from `Replica` objects:
   `in_flight` is kept current (up at the pick, down at the last token), `waiting`/`running` are what the
   router's scrape of vLLM's gauges would read, refreshed every `load_scrape_interval_s` (0: always current);
4. after `profile.frontend_s(image tokens)` the request enters the chosen replica's `EngineCore`, the very
   scheduler the simulated replicas run. A core's step is one event: its end time comes from `plan()`, and
   `finish()` names who got a first token and who finished, so the work per request and per step is O(1).

Records are the load tests' own (loadtests/records.py), so `summarise_run` and `slo.check` read them
unchanged: intended = sent = arrival (no send lag), TTFT for streamed requests only (as a client measures
it), and a streamed answer's inter-token gaps summarised by their mean, (last token - first token) / (n - 1)
over n - 1 gaps. The loop does not follow single tokens, so the p50, p99 and max of a request's gaps are
reported equal to that mean. An answer from the cache arrives in one chunk: TTFT equals end-to-end, no gaps.

Replica loss (`lost`): that many replicas are ejected from the start; they stay members of the ring (the
router keeps an ejected replica's ring points, skipping them), so image-affinity moves only their keys.
"""

from __future__ import annotations

import collections
import heapq
import math
import random
import time
from dataclasses import dataclass

from loadtests.planner.scenario import Item, Scenario, prepare
from loadtests.records import GapSummary, Record
from loadtests.slo import Objective
from loadtests.summary import RunSummary, summarise_run
from loadtests.workload import Workload
from qvl.settings import PolicyName, RouterSettings
from router.policies import build_policy
from router.replicas import Replica
from serving.sim.core import CoreRequest, EngineCore
from serving.sim.profile import CapacityProfile

DEFAULT_POLICY: PolicyName = RouterSettings.model_fields["policy"].default
"""The router's default routing policy."""

NO_GAPS = GapSummary(0, None, None, None, None)
_STEP, _ENTER, _EXPIRE = 0, 1, 2


@dataclass(frozen=True)
class SimResult:
    """A simulated run: one record per request (in schedule order) and what the simulation did."""

    records: list[Record]
    replicas: int
    """Replicas in the fleet, lost ones included."""
    serving: int
    """Replicas that took traffic (replicas - lost)."""
    policy: PolicyName
    requests: int
    engine_steps: int
    image_lookups: int
    """Images looked up in the engines' mm caches (those of requests that reached an engine)."""
    image_hits: int
    simulated_s: float
    """Virtual time from the first arrival to the last answer."""
    wall_s: float
    """Seconds the simulation took on this machine (preparing the requests included when it did that)."""

    @property
    def image_hit_ratio(self) -> float | None:
        return self.image_hits / self.image_lookups if self.image_lookups else None

    def summary(self, objectives: tuple[Objective, ...] = ()) -> RunSummary:
        """The run's summary, as `qvl loadtest` makes it from measured records."""
        return summarise_run(self.records, objectives=objectives)


class _Job:
    """A request on its way: the engine core's handle, and the record's raw times."""

    __slots__ = (
        "arrival",
        "cache",
        "deadline",
        "first_s",
        "followers",
        "item",
        "leads",
        "position",
        "replica",
        "waiting",
    )

    def __init__(self, position: int, item: Item, arrival: float) -> None:
        self.position = position
        self.item = item
        self.arrival = arrival
        self.cache = "bypass"
        self.first_s = arrival
        self.followers: list[_Job] = []
        self.leads = False
        self.replica = -1
        self.waiting = False
        self.deadline = math.inf


def simulate(
    workload: Workload | Scenario,
    profile: CapacityProfile,
    replicas: int,
    policy: PolicyName = DEFAULT_POLICY,
    *,
    answer_cache: bool = True,
    lost: int = 0,
    router: RouterSettings | None = None,
    seed: int = 0,
) -> SimResult:
    """Run `workload` (or a prepared `Scenario`, to reuse across fleet sizes) through `replicas` simulated
    replicas behind the router's `policy`, in virtual time. `router` supplies the admission limits, the
    scrape interval and the ring's settings (its `policy` is replaced); `seed` seeds the policy's random
    choices. Raises ValueError when no replica would serve."""
    started = time.perf_counter()
    scenario = workload if isinstance(workload, Scenario) else prepare(workload, tokens=profile.tokens)
    if replicas < 1 or not 0 <= lost < replicas:
        raise ValueError(f"need at least one serving replica, got {replicas} with {lost} lost")
    settings = (router or RouterSettings()).model_copy(update={"policy": policy})
    run = _Run(scenario, profile, replicas, lost, settings, answer_cache, seed)
    run.run()
    return SimResult(
        records=run.records(),
        replicas=replicas,
        serving=replicas - lost,
        policy=policy,
        requests=len(scenario.items),
        engine_steps=run.steps,
        image_lookups=run.lookups,
        image_hits=run.hits,
        simulated_s=run.last_s - (scenario.items[0].arrival_s if scenario.items else 0.0),
        wall_s=time.perf_counter() - started,
    )


class _Run:
    def __init__(
        self,
        scenario: Scenario,
        profile: CapacityProfile,
        replicas: int,
        lost: int,
        settings: RouterSettings,
        answer_cache: bool,
        seed: int,
    ) -> None:
        self.items = scenario.items
        self.profile = profile
        names = [f"sim-{i}" for i in range(replicas)]
        self.reps = [Replica(url=f"http://{name}", name=name, healthy=i >= lost) for i, name in enumerate(names)]
        self.serving = self.reps[lost:]
        self.index = {r.name: i for i, r in enumerate(self.reps)}
        membership = frozenset(names)
        self.policy = build_policy(settings, lambda: membership, random.Random(seed))
        costs, engine = profile.step_costs(), profile.engine
        self.cores = [
            EngineCore(costs, engine.max_running, engine.max_batched_tokens, engine.mm_cache_items) for _ in names
        ]
        self.stepping = [False] * replicas
        admission = settings.admission
        self.cap = admission.max_in_flight_per_replica
        self.queue_size = admission.queue_size
        self.queue_timeout_s = admission.queue_timeout_s
        self.scrape_s = settings.load_scrape_interval_s
        self.full = 0  # serving replicas at the admission cap
        self.waiters: collections.deque[_Job] = collections.deque()
        self.queued = 0
        self.answer_cache = answer_cache
        self.store: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.store_items = scenario.cache.memory_max_entries
        self.ttl_s = scenario.cache.ttl_s
        self.flights: dict[str, _Job] = {}
        self.events: list[tuple[float, int, int, int, _Job | None]] = []
        self.seq = 0
        self.frontend: dict[int, float] = {}
        self.out: list[Record | None] = [None] * len(scenario.items)
        self.steps = self.lookups = self.hits = 0
        self.last_s = 0.0

    def records(self) -> list[Record]:
        missing = [i for i, r in enumerate(self.out) if r is None]
        if missing:
            raise RuntimeError(f"simulation ended with {len(missing)} requests unanswered, e.g. #{missing[0]}")
        return [r for r in self.out if r is not None]

    def frontend_s(self, image_tokens: int) -> float:
        seconds = self.frontend.get(image_tokens)
        if seconds is None:
            seconds = self.frontend[image_tokens] = self.profile.frontend_s(image_tokens)
        return seconds

    def push(self, at: float, kind: int, replica: int, job: _Job | None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, replica, job))

    def run(self) -> None:
        items, events, cores = self.items, self.events, self.cores
        times = [item.arrival_s for item in items]
        count, next_item = len(items), 0
        live = self.scrape_s == 0
        next_scrape = 0.0 if live else math.inf if not items else self.scrape_s * math.floor(times[0] / self.scrape_s)
        while True:
            arrival = times[next_item] if next_item < count else math.inf
            if events and events[0][0] <= arrival:
                now, _, kind, ri, job = heapq.heappop(events)
            elif next_item < count:
                now, kind, ri, job = arrival, -1, -1, None
            else:
                break
            if now >= next_scrape and not live:
                self.scrape()
                next_scrape = self.scrape_s * (math.floor(now / self.scrape_s) + 1)
            if kind == _STEP:
                core = cores[ri]
                outcome = core.finish()
                self.steps += 1
                for request in outcome.first_tokens:
                    _job(request).first_s = now
                for request in outcome.finished:
                    self.complete(_job(request), request, now)
                duration = core.plan()
                if duration is None:
                    self.stepping[ri] = False
                else:
                    self.push(now + duration, _STEP, ri, None)
            elif kind == _ENTER:
                assert job is not None
                item = job.item
                cores[ri].add(CoreRequest(item.text_tokens, item.images, item.output_tokens, job))
                if not self.stepping[ri]:
                    duration = cores[ri].plan()
                    if duration is not None:
                        self.stepping[ri] = True
                        self.push(now + duration, _STEP, ri, None)
            elif kind == _EXPIRE:
                assert job is not None
                if job.waiting and job.deadline == now:
                    job.waiting = False
                    self.queued -= 1
                    self.fail(job, now)
            else:
                self.arrive(_Job(next_item, items[next_item], arrival), arrival)
                next_item += 1
            if live and ri >= 0:
                self.reps[ri].waiting, self.reps[ri].running = cores[ri].waiting_seen, len(cores[ri].running)

    def scrape(self) -> None:
        for replica, core in zip(self.reps, self.cores, strict=True):
            replica.waiting, replica.running = core.waiting_seen, len(core.running)

    def arrive(self, job: _Job, now: float) -> None:
        key = job.item.key if self.answer_cache else None
        if key is None:
            self.dispatch(job, now)
            return
        stored = self.store.get(key)
        if stored is not None and now - stored <= self.ttl_s:
            self.store.move_to_end(key)
            job.cache = "hit"
            self.answer_from_cache(job, now + self.frontend_s(0))
            return
        leader = self.flights.get(key)
        if leader is not None:
            job.cache = "coalesced"
            leader.followers.append(job)
            return
        job.cache, job.leads = "miss", True
        self.flights[key] = job
        self.dispatch(job, now)

    def dispatch(self, job: _Job, now: float) -> None:
        """Admission, then the policy's pick; the request reaches the engine after its front-end time."""
        candidates = self.serving if not self.full else [r for r in self.serving if r.in_flight < self.cap]
        if not candidates:
            if self.queued >= self.queue_size:
                self.fail(job, now)
                return
            job.waiting, job.deadline = True, now + self.queue_timeout_s
            self.queued += 1
            self.waiters.append(job)
            self.push(job.deadline, _EXPIRE, -1, job)
            return
        replica = self.policy.choose(candidates, job.item.request)
        replica.in_flight += 1
        if replica.in_flight == self.cap:
            self.full += 1
        job.replica = ri = self.index[replica.name]
        self.push(now + self.frontend_s(job.item.image_tokens), _ENTER, ri, job)

    def complete(self, job: _Job, request: CoreRequest, now: float) -> None:
        replica = self.reps[job.replica]
        if replica.in_flight == self.cap:
            self.full -= 1
        replica.in_flight -= 1
        self.lookups += len(request.images)
        self.hits += request.image_hits
        item = job.item
        plan = item.plan
        if plan.stream:
            ttft: float | None = (job.first_s - job.arrival) * 1000
            n = item.output_tokens
            mean = (now - job.first_s) * 1000 / (n - 1) if n > 1 else None
            itl: GapSummary | None = GapSummary(n - 1, mean, mean, mean, mean) if mean is not None else NO_GAPS
        else:
            ttft = itl = None
        self.record(job, now, 200, ttft, itl, replica.name)
        if job.leads:
            self.land(job, now, stored=True)
        self.wake(now)

    def land(self, leader: _Job, now: float, stored: bool) -> None:
        """The leader's answer is in (stored) or it failed: its followers get the answer, or go upstream."""
        key = leader.item.key
        assert key is not None
        del self.flights[key]
        if stored:
            self.store[key] = now
            self.store.move_to_end(key)
            if len(self.store) > self.store_items:
                self.store.popitem(last=False)
        for follower in leader.followers:
            if stored:
                self.answer_from_cache(follower, max(now, follower.arrival + self.frontend_s(0)))
            else:
                follower.cache = "miss"
                self.dispatch(follower, now)

    def wake(self, now: float) -> None:
        """A slot freed: the longest waiter takes it (the router's admission wakes one per release)."""
        while self.waiters and not self.waiters[0].waiting:
            self.waiters.popleft()
        if self.waiters:
            job = self.waiters.popleft()
            job.waiting = False
            self.queued -= 1
            self.dispatch(job, now)

    def answer_from_cache(self, job: _Job, end: float) -> None:
        stream = job.item.plan.stream
        ttft = (end - job.arrival) * 1000 if stream else None
        self.record(job, end, 200, ttft, NO_GAPS if stream else None, "cache")

    def fail(self, job: _Job, now: float) -> None:
        """503 overloaded: the admission queue was full, or the wait ran out."""
        self.record(job, now, 503, None, NO_GAPS if job.item.plan.stream else None, "none")
        if job.leads:
            self.land(job, now, stored=False)

    def record(
        self, job: _Job, end: float, status: int, ttft: float | None, itl: GapSummary | None, replica: str
    ) -> None:
        item, plan = job.item, job.item.plan
        ok = status == 200
        self.last_s = max(self.last_s, end)
        self.out[job.position] = Record(
            index=plan.index,
            tenant=plan.tenant,
            task=plan.task,
            image_buckets=item.buckets,
            stream=plan.stream,
            intended_s=job.arrival,
            sent_s=job.arrival,
            send_lag_ms=0.0,
            status=status,
            error_type=None if ok else "overloaded",
            ttft_ms=ttft,
            itl=itl,
            e2e_ms=(end - job.arrival) * 1000,
            prompt_tokens=item.prompt_tokens if ok else None,
            image_tokens=item.image_tokens,
            output_tokens=item.output_tokens if ok else None,
            replica=replica,
            cache=job.cache,
            worker=0,
        )


def _job(request: CoreRequest) -> _Job:
    job = request.handle
    assert isinstance(job, _Job)
    return job
