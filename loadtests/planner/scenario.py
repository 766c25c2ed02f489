"""A workload's planned requests prepared once for the virtual-time simulator: what each costs the engine
(text, image and output tokens, image digests), what the routing policy reads (a `ChatRequest`) and its
answer-cache key, so that a sizing search simulates the same requests at every fleet size without
preparing them again.

Stand-ins for what a real run measures, each a plain function so that calibration can share it:
- text and image tokens: as the profile's `tokens` count them (a calibration fits them to what the measured
  model reported; the default is the simulated engine's own count, 4 characters a token and Qwen3-VL's
  resize bounds);
- an image's digest: SHA-256 of the workload seed and the image id. The same id is the same photo (as the
  ImageStore renders the same bytes for it), so caches and the image-affinity ring recognise it; no pixels
  are rendered;
- output tokens: the request's max_tokens (the load tests run answers to their length), or
  min(max_tokens, natural_tokens) for an engine whose model stops on its own, as `qvl sim` stops at its
  `output_tokens` setting;
- the answer-cache key: the router's own `cache_key` over the body `build_body` makes, image parts
  replaced by the stand-in digests (the key ignores image URLs), and the router's own `decide` on whether
  the request may use the cache at all (temperature 0 or a seed, with `deterministic_only`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cache.keys import cache_key
from cache.policy import decide
from loadtests.schedule import ImageRef, ImageStore, PlannedRequest, build_body, build_schedule
from loadtests.workload import Workload
from qvl.settings import CacheSettings
from router.edge import ChatRequest, SamplingParams
from serving.sim.core import CoreImage
from serving.sim.profile import Tokens

MODEL = "qwen3-vl"
"""The model name in the bodies the cache keys are taken of (one model: the name only has to be fixed)."""


def image_digest(ref: ImageRef, seed: int) -> bytes:
    """The stand-in SHA-256 of an image: the same workload seed and image id give the same digest. The
    bucket is left out on purpose: the planner's hit-ratio what-if shows one cached photo in several sizes."""
    return hashlib.sha256(f"{seed}:{ref.id}".encode()).digest()


@dataclass(slots=True)
class Item:
    """One planned request as the simulator needs it."""

    plan: PlannedRequest
    arrival_s: float
    text_tokens: int
    images: tuple[CoreImage, ...]
    image_tokens: int
    output_tokens: int
    request: ChatRequest
    """What the routing policy reads: stream flag, sampling, image digests (hex), image tokens."""
    key: str | None
    """The answer-cache key; None when the router's cache policy keeps the request out of the cache."""
    buckets: list[str]

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.image_tokens


class _NoPixels(ImageStore):
    """An image store that renders nothing: the cache key never reads an image's bytes, only its digest."""

    def get(self, ref: ImageRef) -> bytes:
        return b""


@dataclass(frozen=True)
class Scenario:
    """A workload's requests, prepared; build one with `prepare` and simulate it at any fleet size."""

    workload: Workload
    items: tuple[Item, ...]
    cache: CacheSettings
    tokens: Tokens = field(default_factory=Tokens)
    """How the engine counts prompt tokens (a profile's)."""

    def with_images(self, refs: Sequence[tuple[ImageRef, ...]]) -> Scenario:
        """The same requests showing other images (`refs[i]` for item i), each ref's bucket giving its
        tokens; answer-cache keys are kept, so only the engines' image caches and routing see the change."""
        if len(refs) != len(self.items):
            raise ValueError(f"need images for {len(self.items)} requests, got {len(refs)}")
        images = _Images(self.workload, self.tokens)
        items = []
        for item, new in zip(self.items, refs, strict=True):
            core = tuple(images.core(ref) for ref in new)
            tokens = sum(image.tokens for image in core)
            request = replace(
                item.request, image_digests=tuple(image.digest.hex() for image in core), image_tokens=tokens
            )
            items.append(replace(item, images=core, image_tokens=tokens, request=request))
        return replace(self, items=tuple(items))


class _Images:
    """Core images per image id, made once: one object per photo however often it is shown."""

    def __init__(self, workload: Workload, tokens: Tokens) -> None:
        self._seed = workload.seed
        self._tokens = {b.name: tokens.image_tokens(b.width, b.height) for b in workload.images.buckets}
        self._made: dict[tuple[int | str, str], CoreImage] = {}

    def core(self, ref: ImageRef) -> CoreImage:
        image = self._made.get((ref.id, ref.bucket))
        if image is None:
            image = self._made[ref.id, ref.bucket] = CoreImage(image_digest(ref, self._seed), self._tokens[ref.bucket])
        return image


def prepare(
    workload: Workload,
    plans: Sequence[PlannedRequest] | None = None,
    *,
    tokens: Tokens | None = None,
    natural_tokens: int | None = None,
    cache: CacheSettings | None = None,
) -> Scenario:
    """The workload's schedule (or `plans`, from it) prepared for simulation; raises ValueError for a
    closed loop (the planner simulates open-loop arrivals: a schedule of send times)."""
    plans = build_schedule(workload) if plans is None else plans
    cache = CacheSettings() if cache is None else cache
    counting = Tokens() if tokens is None else tokens
    natural = counting.natural_output_tokens if natural_tokens is None else natural_tokens
    counts = {t.name: counting.text_tokens(t.prompt) for t in workload.tasks}
    images = _Images(workload, counting)
    blank = _NoPixels(workload)
    keys: dict[tuple[object, ...], str | None] = {}
    items = []
    for plan in plans:
        if plan.send_at is None:
            raise ValueError(f"workload {workload.name}: a closed loop has no send times to simulate")
        core = tuple(images.core(ref) for ref in plan.images)
        digests = tuple(image.digest.hex() for image in core)
        memo = (plan.task, digests, plan.max_tokens, plan.temperature, plan.stream)
        if memo in keys:
            key = keys[memo]
        else:
            key = keys[memo] = _answer_key(plan, workload, blank, digests, cache)
        image_tokens = sum(image.tokens for image in core)
        output = plan.max_tokens if natural is None else min(plan.max_tokens, natural)
        request = ChatRequest(
            model=MODEL,
            stream=plan.stream,
            sampling=SamplingParams(max_tokens=plan.max_tokens, temperature=plan.temperature),
            image_digests=digests,
            session_id=None,
            body=b"",
            image_tokens=image_tokens,
        )
        buckets = [r.bucket for r in plan.images]
        items.append(Item(plan, plan.send_at, counts[plan.task], core, image_tokens, output, request, key, buckets))
    return Scenario(workload, tuple(items), cache, counting)


def _answer_key(
    plan: PlannedRequest, workload: Workload, blank: ImageStore, digests: tuple[str, ...], cache: CacheSettings
) -> str | None:
    doc = build_body(plan, workload, MODEL, blank)
    if not decide(doc, None, cache.deterministic_only).read:
        return None
    return cache_key(doc, digests, cache.model_revisions.get(MODEL, ""))
