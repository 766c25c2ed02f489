"""Routing policies: one synchronous method each, registered by name in `POLICIES` (the only registry).

`choose(replicas, request)` gets the healthy replicas that serve the request's model, never an empty
list, minus any already tried for this request, and returns one of them. It must not block or await.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from qvl.settings import RouterSettings
from router.edge import ChatRequest
from router.hashring import HashRing, digest_point, key_point
from router.replicas import Replica


class Policy(Protocol):
    def choose(self, replicas: Sequence[Replica], request: ChatRequest) -> Replica: ...


class RoundRobin:
    """Each replica in turn."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, replicas: Sequence[Replica], request: ChatRequest) -> Replica:
        return replicas[next(self._counter) % len(replicas)]


class LeastLoaded:
    """Power of two choices: sample two replicas, take the one with less in flight plus engine queue."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, replicas: Sequence[Replica], request: ChatRequest) -> Replica:
        if len(replicas) == 1:
            return replicas[0]
        a, b = self._rng.sample(range(len(replicas)), 2)
        ra, rb = replicas[a], replicas[b]
        return ra if ra.load <= rb.load else rb


Membership = Callable[[], frozenset[str]]


class _Ring:
    """The ring over the pool's membership (static list plus registry members, healthy or not), never
    over arrival order: every router with the same members builds the same ring, and replicas that left
    the registry leave it (a ring of every name ever seen would grow with each restart on a new port).
    Ejected replicas are skipped, not removed, so their keys come back to them on re-admission and the
    other keys never move; skipping a name gives the same owners as a ring without it."""

    def __init__(self, virtual_nodes: int, membership: Membership) -> None:
        self._virtual_nodes = virtual_nodes
        self._membership = membership
        self._ring = HashRing((), virtual_nodes)

    def walk(self, replicas: Sequence[Replica], point: int) -> Iterator[Replica]:
        """`replicas` in clockwise order from `point` (lazily: callers usually take the first)."""
        by_name = {r.name: r for r in replicas}
        members = self._membership()
        if members != self._ring.names:
            self._ring = HashRing(members, self._virtual_nodes)
        for name in self._ring.walk(point):
            replica = by_name.get(name)
            if replica is not None:
                yield replica


class Session:
    """Consistent hashing on the session header, so a conversation keeps its replica's prefix cache.
    Requests without a session id go least-loaded."""

    def __init__(self, virtual_nodes: int, membership: Membership, fallback: Policy) -> None:
        self._ring = _Ring(virtual_nodes, membership)
        self._fallback = fallback

    def choose(self, replicas: Sequence[Replica], request: ChatRequest) -> Replica:
        if request.session_id is None:
            return self._fallback.choose(replicas, request)
        return next(self._ring.walk(replicas, key_point(request.session_id)))


class ImageAffinity:
    """Consistent hashing with bounded loads on the first image's digest.

    The same product photo goes to the replica whose vLLM mm/prefix caches already hold it, unless
    that replica has `load_factor` times the mean in-flight load; then the next replica clockwise
    with room takes it. Text-only requests go least-loaded.
    """

    def __init__(self, load_factor: float, virtual_nodes: int, membership: Membership, fallback: Policy) -> None:
        self._load_factor = load_factor
        self._ring = _Ring(virtual_nodes, membership)
        self._fallback = fallback

    def capacity(self, replicas: Sequence[Replica]) -> int:
        """Most in-flight requests a replica may hold once this one is placed (Mirrokni et al.)."""
        total = sum(r.in_flight for r in replicas) + 1
        return math.ceil(self._load_factor * total / len(replicas))

    def choose(self, replicas: Sequence[Replica], request: ChatRequest) -> Replica:
        if not request.image_digests:
            return self._fallback.choose(replicas, request)
        bound = self.capacity(replicas)
        for replica in self._ring.walk(replicas, digest_point(request.image_digests[0])):
            if replica.in_flight < bound:
                return replica
        # Unreachable while load_factor > 1 (some replica is always under the mean); kept as a guard.
        return min(replicas, key=lambda r: r.in_flight)


PolicyFactory = Callable[[RouterSettings, Membership, random.Random | None], Policy]

POLICIES: dict[str, PolicyFactory] = {
    "round-robin": lambda s, m, r: RoundRobin(),
    "least-loaded": lambda s, m, r: LeastLoaded(r),
    "session": lambda s, m, r: Session(s.virtual_nodes, m, LeastLoaded(r)),
    "image-affinity": lambda s, m, r: ImageAffinity(s.load_factor, s.virtual_nodes, m, LeastLoaded(r)),
}


def build_policy(settings: RouterSettings, membership: Membership, rng: random.Random | None = None) -> Policy:
    """The policy named by `settings.policy`; `membership` names every replica of the pool (the ring's
    members), healthy or not. `rng` seeds the random choices (least-loaded's two samples): the capacity
    planner passes one so that a simulated run is reproducible; the router leaves it None."""
    return POLICIES[settings.policy](settings, membership, rng)
