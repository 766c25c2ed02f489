"""Which images requests show (a Zipf-popular catalogue plus fresh uploads) and the cache hit ratios
that popularity implies, computed before a run so that a report can show them beside the measured ones.

Two caches, two models:
- the router's answer cache serves a greedy (temperature 0) request whose (images, task) pair was seen
  before. Unbounded (the default), the expectation is exact for a schedule of N requests, warm-up
  included: hits = sum over keys of N q - (1 - (1 - q)^N). With `answer_cache_items` it is the
  steady-state LRU ratio by Che's approximation.
- the engine's image cache (vLLM's multimodal cache, keyed by image content) is an LRU of
  `engine_cache_items` images on one replica, looked up per image; steady state by Che's approximation.
  Assumption: one replica, or image-affinity routing giving each replica its own slice of the catalogue
  with a proportionally larger cache; least-loaded routing over R replicas would do worse.
Uploads are never seen twice: they miss, and in an LRU they push other entries out.

R replicas, each with its own LRU of C images (`engine_hit_ratio_by_policy`): round-robin and least-loaded
ignore the image, so every replica's cache sees the whole Zipf stream (thinned, same law): Che over the
whole catalogue with C slots, per replica. Image-affinity (consistent hashing on the image) gives each
replica about 1/R of the catalogue: Che over its slice, the slice's popularity renormalised, and uploads
spread evenly. The overall ratio weighs each replica by its share of the lookups. Bounded-load spill-over
(image-affinity sending a request past an overloaded owner) is not modelled: it moves the measured ratio
towards round-robin's. A finite run can be counted from cold (`lookups`): an image is cached at lookup t
when it was asked for within the last min(t, T) lookups, T being Che's characteristic time (infinite
when everything fits), which is exact when the catalogue fits.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from loadtests.arrivals import expected_count
from loadtests.workload import Workload, length_pmf

# Enumerating (image tuple, task) keys for several images per request grows as K^m; past this the
# expectation is refused rather than computed slowly.
MAX_KEYS = 1_000_000


def zipf_weights(k: int, alpha: float) -> list[float]:
    """Normalised Zipf probabilities of ranks 1..k: p(r) proportional to 1 / r^alpha."""
    raw = [1.0 / (r**alpha) for r in range(1, k + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class ImagePicker:
    """Draws the image of each slot: a catalogue index by the Zipf law, or the next fresh upload."""

    def __init__(self, workload: Workload, rng: random.Random) -> None:
        pop = workload.popularity
        self._rng = rng
        self._upload_share = pop.upload_share
        self._cum = list(itertools.accumulate(zipf_weights(pop.catalogue, pop.alpha)))
        self._ranks = range(pop.catalogue)
        self._uploads = 0

    def pick(self) -> int | str:
        """A catalogue index (0 is the most popular) or "upload-N" for the N-th upload (from 0)."""
        # Two draws per slot whatever the outcome, so that the upload share does not shift later draws.
        upload = self._rng.random() < self._upload_share
        rank = self._rng.choices(self._ranks, cum_weights=self._cum)[0]
        if upload:
            self._uploads += 1
            return f"upload-{self._uploads - 1}"
        return rank


@dataclass(frozen=True)
class HitRatios:
    """Expected cache hit ratios: answer cache per request, engine image cache per image."""

    answer_cache: float
    engine_image_cache: float
    requests: int


def expected_hit_ratios(workload: Workload, requests: int | None = None) -> HitRatios:
    """Expected answer-cache and engine image-cache hit ratios for `requests` requests (default: the
    schedule's expected count). Raises ValueError when there are too many keys to enumerate."""
    n = round(expected_count(workload.arrivals)) if requests is None else requests
    pop = workload.popularity
    m = workload.images.per_request
    if pop.catalogue**m > MAX_KEYS:
        raise ValueError(f"{pop.catalogue}^{m} image tuples are too many to enumerate (at most {MAX_KEYS})")
    total_share = sum(t.share for t in workload.tasks)
    # max_tokens is part of the answer-cache key: a greedy task's key is (images, task, max_tokens).
    greedy = [
        t.share / total_share * p for t in workload.tasks if t.temperature == 0 for p in length_pmf(t.output).values()
    ]
    if pop.catalogue**m * max(len(greedy), 1) > MAX_KEYS:
        raise ValueError(f"{pop.catalogue}^{m} image tuples x {len(greedy)} task lengths are too many keys")
    seen = [(1 - pop.upload_share) * p for p in zipf_weights(pop.catalogue, pop.alpha)]
    tuples = [math.prod(c) for c in itertools.product(seen, repeat=m)]
    key_rates = [g * q for g in greedy for q in tuples]
    if pop.answer_cache_items is None:
        hits = sum(n * q - 1 + (1 - q) ** n for q in key_rates if q > 0)
        answer = hits / n if n else 0.0
    else:
        # Greedy requests carrying an upload are stored but never asked for again.
        unique_rate = sum(greedy) * (1 - (1 - pop.upload_share) ** m)
        answer = che_hit_ratio(key_rates, unique_rate, pop.answer_cache_items)
    engine = che_hit_ratio(seen, pop.upload_share, pop.engine_cache_items)
    return HitRatios(answer_cache=answer, engine_image_cache=engine, requests=n)


def che_hit_ratio(rates: list[float], unique_rate: float, capacity: int) -> float:
    """Steady-state LRU hit ratio by Che's approximation.

    `rates` are the per-lookup probabilities of the keys that recur, `unique_rate` the share of lookups
    for keys never seen again; the characteristic time T solves sum(1 - exp(-q T)) + unique_rate T = capacity.
    """
    if unique_rate == 0 and len(rates) <= capacity:
        return sum(rates)

    def occupied(t: float) -> float:
        return sum(1 - math.exp(-q * t) for q in rates) + unique_rate * t

    t = _fill_time(occupied, capacity)
    return sum(q * (1 - math.exp(-q * t)) for q in rates)


def _fill_time(occupied: Callable[[float], float], capacity: int) -> float:
    """The time t at which `occupied(t)`, increasing from 0, reaches `capacity` (by bisection)."""
    low, high = 0.0, 1.0
    while occupied(high) < capacity:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if occupied(mid) < capacity else (low, mid)
    return low


def describe(workload: Workload, requests: int | None = None) -> str:
    """A plain-text summary of the workload and its expected hit ratios, printed before a run."""
    ratios = expected_hit_ratios(workload, requests)
    pop = workload.popularity
    arrivals = workload.arrivals.model_dump()
    lines = [
        f"workload {workload.name} (version {workload.version}, seed {workload.seed})",
        f"  arrivals: {', '.join(f'{k}={v}' for k, v in arrivals.items())}; about {ratios.requests} requests",
        f"  images: {workload.images.per_request} per request; formats "
        + ", ".join(f"{f} {s:g}" for f, s in workload.images.formats.items()),
    ]
    lines += [
        f"    bucket {b.name}: {b.width}x{b.height}, {b.tokens} image tokens, share {b.share:g}"
        for b in workload.images.buckets
    ]
    lines += [
        "  tasks: "
        + ", ".join(
            f"{t.name} (share {t.share:g}, temperature {t.temperature:g}, {'stream' if t.stream else 'no stream'})"
            for t in workload.tasks
        ),
        "  tenants: " + ", ".join(f"{t.id} (share {t.share:g})" for t in workload.tenants),
        f"  popularity: {pop.catalogue} products, Zipf alpha {pop.alpha:g}, uploads {pop.upload_share:.0%}",
        f"  expected answer-cache hit ratio: {ratios.answer_cache:.1%} "
        + ("(unbounded cache)" if pop.answer_cache_items is None else f"({pop.answer_cache_items} entries, LRU)"),
        f"  expected engine image-cache hit ratio: {ratios.engine_image_cache:.1%} "
        f"(LRU of {pop.engine_cache_items} images, one replica)",
    ]
    return "\n".join(lines)


RoutingPolicy = Literal["round-robin", "least-loaded", "image-affinity"]
CONTENT_BLIND: frozenset[str] = frozenset({"round-robin", "least-loaded"})


@dataclass(frozen=True)
class ReplicaStream:
    """What one replica's engine cache sees: its share of all image lookups, the per-lookup probabilities of
    the catalogue images it gets (renormalised to its own stream) and the share of its lookups that are
    uploads."""

    share: float
    rates: tuple[float, ...]
    unique_rate: float


def replica_streams(
    weights: Sequence[float],
    upload_share: float,
    replicas: int,
    policy: RoutingPolicy,
    owners: Sequence[int] | None = None,
) -> list[ReplicaStream]:
    """How `policy` splits an image stream (catalogue `weights`, summing to 1, plus `upload_share` uploads)
    over `replicas` engine caches.

    Content-blind policies give each replica 1/R of the lookups with the same law. Image-affinity gives
    image i to replica `owners[i]` (default: rank i to replica i mod R, an even split of the ranks, as a
    ring with many virtual nodes gives on average); uploads spread evenly.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    seen = [(1 - upload_share) * w for w in weights]
    if policy in CONTENT_BLIND or replicas == 1:
        return [ReplicaStream(1 / replicas, tuple(seen), upload_share)] * replicas
    if owners is None:
        owners = [i % replicas for i in range(len(weights))]
    if len(owners) != len(weights) or any(not 0 <= o < replicas for o in owners):
        raise ValueError(f"owners must give a replica in 0..{replicas - 1} for each of the {len(weights)} images")
    streams = []
    for r in range(replicas):
        mine = [q for q, o in zip(seen, owners, strict=True) if o == r]
        share = sum(mine) + upload_share / replicas
        if share == 0:
            streams.append(ReplicaStream(0.0, (), 0.0))
            continue
        streams.append(ReplicaStream(share, tuple(q / share for q in mine), upload_share / replicas / share))
    return streams


def characteristic_time(rates: Sequence[float], unique_rate: float, capacity: int) -> float:
    """Che's characteristic time of an LRU of `capacity` items, in lookups: the T for which the expected
    number of distinct keys asked for within the last T lookups, sum(1 - (1 - q)^T) + unique_rate T, is
    the capacity. Infinite when every key fits and nothing unique arrives."""
    if unique_rate == 0 and sum(1 for q in rates if q > 0) <= capacity:
        return math.inf

    def occupied(t: float) -> float:
        return sum(1 - math.pow(1 - q, t) for q in rates) + unique_rate * t

    return _fill_time(occupied, capacity)


def lru_hit_ratio(rates: Sequence[float], unique_rate: float, capacity: int, lookups: int | None = None) -> float:
    """Expected LRU hit ratio of a stream: steady state (`lookups` None) or over the first `lookups` lookups
    from an empty cache. Che's approximation in its discrete form (an image is cached at lookup t when it
    was asked for within the last min(t, T) lookups); exact when every key fits."""
    t_char = characteristic_time(rates, unique_rate, capacity)
    if lookups is None:
        if math.isinf(t_char):
            return sum(rates)
        return sum(q * (1 - math.pow(1 - q, t_char)) for q in rates)
    if lookups <= 0:
        return 0.0
    hits = 0.0
    for q in rates:
        if q <= 0:
            continue
        # Sum over t = 0 .. lookups-1 of q (1 - (1 - q)^min(t, T)).
        warm = lookups if math.isinf(t_char) else min(lookups, math.ceil(t_char))
        geometric = (1 - (1 - q) ** warm) / q
        hits += q * (warm - geometric)
        if warm < lookups:
            hits += q * (lookups - warm) * (1 - math.pow(1 - q, t_char))
    return hits / lookups


def engine_hit_ratio_by_policy(
    workload: Workload,
    replicas: int,
    policy: RoutingPolicy,
    requests: int | None = None,
    owners: Sequence[int] | None = None,
) -> float:
    """Expected engine image-cache hit ratio over all image lookups of `replicas` replicas, each an LRU of
    `popularity.engine_cache_items` images, behind `policy` (see replica_streams for `owners`).

    `requests`: count from empty caches over that many requests (warm-up included); None: steady state.
    Bounded-load spill-over of image-affinity is not modelled."""
    pop = workload.popularity
    streams = replica_streams(zipf_weights(pop.catalogue, pop.alpha), pop.upload_share, replicas, policy, owners)
    lookups = None if requests is None else requests * workload.images.per_request
    total = 0.0
    for stream in streams:
        if stream.share == 0:
            continue
        mine = None if lookups is None else round(lookups * stream.share)
        total += stream.share * lru_hit_ratio(stream.rates, stream.unique_rate, pop.engine_cache_items, mine)
    return total
