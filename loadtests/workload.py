"""The workload file: a versioned YAML description of e-commerce traffic, validated by a typed schema.

One `seed` makes the whole schedule reproducible (see loadtests/schedule.py). A bad file fails with
`WorkloadError` naming the file and the field: `workload storefront.yaml: arrivals.cv: Input should be
greater than 0`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from qvl.images import tokens_for_size
from qvl.settings import Section

ImageFormat = Literal["jpeg", "png", "webp"]


class WorkloadError(ValueError):
    """A workload file that cannot be read or does not match the schema; the message names the field."""


class Bucket(Section):
    """An image size class, such as a listing thumbnail or a zoom view."""

    name: str = Field(description="bucket name, unique in the file")
    width: int = Field(gt=0, description="image width in pixels")
    height: int = Field(gt=0, description="image height in pixels")
    share: float = Field(gt=0, description="relative share of images in this bucket (shares are normalised)")

    @property
    def tokens(self) -> int:
        """Qwen3-VL image tokens of this bucket, by the same rules the router counts with."""
        return tokens_for_size(self.width, self.height)


class Images(Section):
    """The images of a request: their sizes, encodings and how many each request carries."""

    buckets: list[Bucket] = Field(min_length=1, description="size buckets with their shares")
    formats: dict[ImageFormat, Annotated[float, Field(gt=0)]] = Field(
        min_length=1, description="encoding -> relative share"
    )
    per_request: int = Field(default=1, ge=1, le=8, description="images per request")

    @model_validator(mode="after")
    def _unique(self) -> Images:
        names = [b.name for b in self.buckets]
        if len(set(names)) != len(names):
            raise ValueError(f"bucket names must be unique, got {names}")
        return self


class Popularity(Section):
    """Which images requests show: a Zipf-popular catalogue plus fresh customer uploads."""

    catalogue: int = Field(ge=1, description="K, the number of distinct product photos")
    alpha: float = Field(ge=0, description="Zipf exponent: photo of rank r is drawn with weight 1/r^alpha")
    upload_share: float = Field(ge=0, le=1, description="share of images that are fresh uploads, never seen again")
    answer_cache_items: int | None = Field(
        default=None, ge=1, description="answer-cache size in entries for the expected hit ratio; None: unbounded"
    )
    engine_cache_items: int = Field(
        default=64, ge=1, description="images one replica's engine cache holds (LRU) for the expected hit ratio"
    )


class FixedLength(Section):
    """Every answer asks for the same number of tokens."""

    kind: Literal["fixed"]
    tokens: int = Field(ge=1, description="max_tokens of every request")


class UniformLength(Section):
    """max_tokens drawn uniformly between two bounds (inclusive)."""

    kind: Literal["uniform"]
    min: int = Field(ge=1, description="smallest max_tokens")
    max: int = Field(ge=1, description="largest max_tokens")

    @model_validator(mode="after")
    def _ordered(self) -> UniformLength:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class LognormalLength(Section):
    """max_tokens drawn from a lognormal law, clipped to bounds: most answers short, a long tail."""

    kind: Literal["lognormal"]
    median: float = Field(gt=0, description="median max_tokens")
    sigma: float = Field(gt=0, description="standard deviation of log(max_tokens)")
    min: int = Field(default=1, ge=1, description="lower clip")
    max: int = Field(ge=1, description="upper clip")

    @model_validator(mode="after")
    def _ordered(self) -> LognormalLength:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


OutputLength = Annotated[FixedLength | UniformLength | LognormalLength, Field(discriminator="kind")]


def length_pmf(output: FixedLength | UniformLength | LognormalLength) -> dict[int, float]:
    """P(max_tokens = v) of an output-length law as the schedule draws it (a lognormal rounded, then
    clipped). max_tokens is part of the answer-cache key, so the expected hit ratio needs it."""
    if isinstance(output, FixedLength):
        return {output.tokens: 1.0}
    if isinstance(output, UniformLength):
        count = output.max - output.min + 1
        return {v: 1 / count for v in range(output.min, output.max + 1)}
    mu, sigma = math.log(output.median), output.sigma

    def below(x: float) -> float:  # P(X < x) of the lognormal
        return 0.5 * (1 + math.erf((math.log(x) - mu) / (sigma * math.sqrt(2)))) if x > 0 else 0.0

    pmf = {v: below(v + 0.5) - below(v - 0.5) for v in range(output.min, output.max + 1)}
    pmf[output.min] = below(output.min + 0.5)
    pmf[output.max] = 1 - below(output.max - 0.5) if output.max > output.min else 1.0
    return {v: p for v, p in pmf.items() if p > 0}


class Task(Section):
    """A request template: the prompt, how long the answer may be, sampling and streaming."""

    name: str = Field(description="task name, unique in the file")
    prompt: str = Field(min_length=1, description="the text sent beside the images")
    output: OutputLength = Field(description="distribution of max_tokens")
    temperature: float = Field(default=0.0, ge=0, le=2, description="0 is greedy, which the answer cache can serve")
    stream: bool = Field(default=False, description="request a streamed (SSE) answer")
    share: float = Field(gt=0, description="relative share of requests")


class Constant(Section):
    """Evenly spaced requests at a fixed rate (open loop)."""

    process: Literal["constant"]
    rate: float = Field(gt=0, description="requests per second")
    duration_s: float = Field(gt=0, description="length of the schedule in seconds")


class Poisson(Section):
    """Independent arrivals at a mean rate: exponential gaps (open loop)."""

    process: Literal["poisson"]
    rate: float = Field(gt=0, description="mean requests per second")
    duration_s: float = Field(gt=0, description="length of the schedule in seconds")


class Gamma(Section):
    """Gamma-distributed gaps: cv > 1 gives bursts, cv < 1 more regular traffic than Poisson (cv = 1)."""

    process: Literal["gamma"]
    rate: float = Field(gt=0, description="mean requests per second")
    cv: float = Field(gt=0, description="coefficient of variation of the gaps between requests")
    duration_s: float = Field(gt=0, description="length of the schedule in seconds")


class ClosedLoop(Section):
    """N users, each sending its next request a think time after the previous answer: no send times."""

    process: Literal["closed"]
    users: int = Field(ge=1, description="concurrent users")
    think_s: float = Field(default=0.0, ge=0, description="pause between an answer and the user's next request")
    requests: int = Field(ge=1, description="planned requests the users work through, in order")


class Stage(Section):
    """A stretch of Poisson traffic; with `to_rate` the rate ramps linearly from `rate` to it."""

    duration_s: float = Field(gt=0, description="length of the stage")
    rate: float = Field(ge=0, description="requests per second at the start of the stage")
    to_rate: float | None = Field(default=None, ge=0, description="rate at the end (linear ramp); None: flat")


class Stages(Section):
    """Piecewise rate over time: steps and ramps, one stage after another (Poisson within)."""

    process: Literal["stages"]
    stages: list[Stage] = Field(min_length=1, description="the stages in order")


class Diurnal(Section):
    """A sinusoidal rate, a day compressed: mean * (1 + amplitude * sin(2 pi t / period)), Poisson within."""

    process: Literal["diurnal"]
    mean_rate: float = Field(gt=0, description="mean requests per second")
    amplitude: float = Field(ge=0, le=1, description="relative swing around the mean (1: down to zero)")
    period_s: float = Field(gt=0, description="length of one cycle")
    duration_s: float = Field(gt=0, description="length of the schedule in seconds")


class Spike(Section):
    """A flash sale: a base Poisson rate, multiplied during one window."""

    process: Literal["spike"]
    base_rate: float = Field(gt=0, description="requests per second outside the window")
    multiplier: float = Field(ge=1, description="rate factor inside the window")
    start_s: float = Field(ge=0, description="when the window opens")
    length_s: float = Field(gt=0, description="how long the window lasts")
    duration_s: float = Field(gt=0, description="length of the schedule in seconds")


Arrivals = Annotated[Constant | Poisson | Gamma | ClosedLoop | Stages | Diurnal | Spike, Field(discriminator="process")]


class Tenant(Section):
    """An API key sending a share of the traffic: the key itself, or the environment variable holding it."""

    id: str = Field(description="tenant id, as reports name it")
    key: str | None = Field(default=None, description="the API key (test clusters only)")
    key_env: str | None = Field(default=None, description="environment variable holding the API key")
    share: float = Field(gt=0, description="relative share of requests")

    @model_validator(mode="after")
    def _one_key(self) -> Tenant:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("give exactly one of key and key_env")
        return self


class Workload(Section):
    """A whole workload file, version 1."""

    version: Literal[1] = Field(description="schema version of the file")
    name: str = Field(description="workload name")
    seed: int = Field(description="makes the schedule reproducible: same file and seed, same bytes")
    images: Images
    popularity: Popularity
    tasks: list[Task] = Field(min_length=1, description="request templates with their shares")
    arrivals: Arrivals = Field(description="when requests are sent")
    tenants: list[Tenant] = Field(min_length=1, description="API keys with their shares")

    @model_validator(mode="after")
    def _unique(self) -> Workload:
        for what, names in (("task", [t.name for t in self.tasks]), ("tenant", [t.id for t in self.tenants])):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique, got {names}")
        return self


# Discriminator values pydantic puts into error locations; a reader knows the field, not the tag.
_TAGS = frozenset(
    {"constant", "poisson", "gamma", "closed", "stages", "diurnal", "spike", "fixed", "uniform", "lognormal"}
)


def parse_workload(data: object, source: str = "<memory>") -> Workload:
    """Validate already-parsed YAML data; raises WorkloadError naming `source` and the field."""
    try:
        return Workload.model_validate(data)
    except ValidationError as exc:
        raise WorkloadError(f"workload {source}: {_describe(exc)}") from None


def load_workload(path: Path) -> Workload:
    """Read and validate a workload YAML file; raises WorkloadError naming the file and the field."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise WorkloadError(f"workload {path.name}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise WorkloadError(f"workload {path.name}: not valid YAML: {exc}".replace("\n", " ")) from None
    return parse_workload(data, path.name)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if str(p) not in _TAGS]
        parts.append(f"{'.'.join(loc) or '(root)'}: {err['msg']}")
    return "; ".join(parts)


def with_load(workload: Workload, rate: float | None = None, duration_s: float | None = None) -> Workload:
    """The workload at another rate or length (`qvl loadtest --rate/--duration`); raises WorkloadError where
    the arrival process has no such knob. `rate` is the rate of constant, Poisson and Gamma arrivals, the
    mean of a diurnal curve, the base of a spike, and the peak of stages (the others scale with it)."""
    arrivals = workload.arrivals
    update: dict[str, object] = {}
    if rate is not None:
        if rate <= 0:
            raise WorkloadError(f"workload {workload.name}: the rate must be positive, got {rate:g}")
        if isinstance(arrivals, ClosedLoop):
            raise WorkloadError(f"workload {workload.name}: a closed loop has no rate; give the users instead")
        if isinstance(arrivals, Constant | Poisson | Gamma):
            update["rate"] = rate
        elif isinstance(arrivals, Diurnal):
            update["mean_rate"] = rate
        elif isinstance(arrivals, Spike):
            update["base_rate"] = rate
        else:
            peak = max(max(s.rate, s.to_rate or 0.0) for s in arrivals.stages)
            factor = rate / peak if peak > 0 else 0.0
            update["stages"] = [
                s.model_copy(
                    update={"rate": s.rate * factor, "to_rate": None if s.to_rate is None else s.to_rate * factor}
                )
                for s in arrivals.stages
            ]
    if duration_s is not None:
        if duration_s <= 0:
            raise WorkloadError(f"workload {workload.name}: the duration must be positive, got {duration_s:g}")
        if isinstance(arrivals, Stages):
            raise WorkloadError(f"workload {workload.name}: stages set their own length; change them in the file")
        if not isinstance(arrivals, ClosedLoop):
            update["duration_s"] = duration_s
    if not update:
        return workload
    # Through the schema again, so that a scaled workload is checked as a file would be.
    data = workload.model_dump()
    data["arrivals"] = {**data["arrivals"], **{k: _dump(v) for k, v in update.items()}}
    return parse_workload(data, workload.name)


def _dump(value: object) -> object:
    if isinstance(value, list):
        return [v.model_dump() if isinstance(v, Section) else v for v in value]
    return value
