"""Models and their versions: the pools that serve them, the routes that split a public name between
versions, and how a rollout moves a route from one version to another (router/rollout/)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from qvl.settings.base import Section, redis_url
from qvl.settings.serving import SimSettings

NAME = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"
VERSION = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$"
StickyBy = Literal["session", "key"]


class PoolSettings(Section):
    """One pool: the replicas of one version of one model. A replica of it serves the public name and
    `NAME@VERSION`, the name routers pick a version's replicas by."""

    name: str = Field(
        pattern=r"^[a-z0-9][a-z0-9-]{0,30}$", description="Pool id, e.g. 8b-v2 (replica logs, /v1/cluster)."
    )
    model: str = Field(pattern=NAME, description="Public model name clients ask for, e.g. qwen3-vl-8b.")
    version: str = Field("v1", pattern=VERSION, description="Version label of this pool's weights and engine.")
    path: str | None = Field(
        None, description="vllm: checkpoint directory of this version; empty: the tiny test model (see tiny_seed)."
    )
    tiny_seed: int = Field(
        0,
        ge=0,
        description="vllm without a path: seed of the tiny test model built for this pool (another seed "
        "gives another checkpoint, as a new version would).",
    )
    replicas: int = Field(1, ge=0, le=64, description="Replicas of this pool that `qvl up` and `qvl cluster up` start.")
    tensor_parallel_size: int | None = Field(
        None, ge=1, le=64, description="GPUs per replica of this pool; empty: replica.tensor_parallel_size."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm: engine arguments of this pool, over replica.engine_args (passed through verbatim).",
    )
    sim: dict[str, Any] = Field(
        default_factory=dict,
        description="sim: settings of this pool's simulated replicas, over the sim section (e.g. "
        "fault_error_ratio, fault_added_ttft_ms for a faulty canary in a test).",
    )

    @field_validator("sim")
    @classmethod
    def _sim(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            SimSettings.model_validate({**SimSettings().model_dump(), **value})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"sim.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        return value

    @property
    def versioned(self) -> str:
        """The name a replica of this pool serves besides the public one."""
        return versioned(self.model, self.version)


def is_version(label: str) -> bool:
    """Whether `label` could name a version (the VERSION pattern): what a client's `MODEL@LABEL` may pin."""
    return re.fullmatch(VERSION, label) is not None


def versioned(model: str, version: str) -> str:
    """`MODEL@VERSION`: the served name of one version of a public model."""
    return f"{model}@{version}"


class RouteSettings(Section):
    """How one public model name is split between its versions."""

    versions: dict[str, float] = Field(
        description="Version label -> weight (any positive scale, e.g. {v1: 95, v2: 5}); a request goes to one "
        "version with probability weight / sum, the same version for the same session or key."
    )
    sticky: StickyBy = Field(
        "session",
        description="What keeps a client on one version: session (the router.session_header value, else the "
        "conversation's first message, else the API key) or key (the API key).",
    )
    shadow: dict[str, float] = Field(
        default_factory=dict,
        description="Version label -> share of the route's greedy requests (0..1) also sent to that version; its "
        "answers are compared with the one returned, never returned themselves.",
    )

    @field_validator("versions")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("a route needs at least one version")
        if any(w < 0 for w in value.values()) or sum(value.values()) <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        return value

    @field_validator("shadow")
    @classmethod
    def _shares(cls, value: dict[str, float]) -> dict[str, float]:
        if any(not 0 <= s <= 1 for s in value.values()):
            raise ValueError("shadow shares must lie in 0..1")
        return value


class RolloutSettings(Section):
    """Rollouts (`qvl rollout`): the defaults of a new one and its analysis. State lives in Redis
    (store, else registry.url) so that every router applies it and it survives a router restart; without
    Redis, in a lone router's memory."""

    store: Annotated[str, redis_url("")] = Field(
        "",
        description="Redis URL of the routes and rollouts; empty: registry.url. With neither, this router keeps "
        "them in its memory (one router only; a restart forgets them).",
    )
    sticky_ttl_s: float = Field(
        3600.0, gt=0, description="Seconds a session stays pinned to the version it was first given."
    )
    shadow: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Share of the baseline's greedy (temperature 0), non-streamed requests that a rollout "
        "mirrors to the new version to compare answers (`qvl rollout start --shadow`).",
    )
    steps: list[float] = Field(
        default_factory=lambda: [1.0, 5.0, 25.0, 50.0, 100.0],
        description="Percent of the route's traffic the new version gets at each step, ending at 100.",
    )
    min_requests: int = Field(
        200, ge=1, description="Requests the new version must answer in a step before the step may pass."
    )
    min_duration_s: float = Field(60.0, ge=0, description="Seconds a step lasts at least.")
    interval_s: float = Field(2.0, gt=0, description="Seconds between two analyses of a running rollout.")
    alpha: float = Field(
        0.001,
        gt=0,
        lt=0.5,
        description="Significance level of each one-sided test (the analysis runs often: keep it small).",
    )
    max_error_increase: float = Field(
        0.005,
        ge=0,
        description="Abort when the new version's error ratio (5xx and failed streams) is significantly above "
        "the baseline's by more than this (absolute, 0.005 = half a percentage point).",
    )
    max_latency_increase: float = Field(
        0.2,
        ge=0,
        description="Abort when the new version's P95 TTFT or end-to-end time is significantly higher, and its "
        "observed P95 more than this share above the baseline's (0.2: +20 %).",
    )
    min_latency_increase_ms: float = Field(
        25.0,
        ge=0,
        description="A latency check fails only when the new version is also this many milliseconds slower (its P95 "
        "or median over the baseline's): on fast answers a noisy host moves percentiles by more than 20 %.",
    )
    max_answer_change: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Abort when the share of greedy shadow answers that differ from the baseline's is "
        "significantly above this; empty: reported only (new weights are expected to answer differently).",
    )
    min_samples: int = Field(
        30, ge=5, description="Answers of each version a test needs before it may judge (fewer: hold)."
    )
    window_s: float = Field(
        300.0, gt=0, description="The analysis compares the answers of the last window_s seconds of the step."
    )
    lease_s: float = Field(
        6.0, gt=0, description="Seconds one router holds the analysis lease; it renews it every interval_s."
    )
    poll_interval_s: float = Field(
        0.5, gt=0, description="Seconds between a router's reads of the routes in Redis (a change reaches it within)."
    )
    flush_interval_s: float = Field(
        0.5, gt=0, description="Seconds between a router's writes of its answers' timings to the analysis."
    )
    key_prefix: str = Field("qvl:rollout:", description="Prefix of the Redis keys of routes and rollouts.")

    @model_validator(mode="after")
    def _steps(self) -> RolloutSettings:
        if not self.steps or self.steps[-1] != 100 or any(not 0 < s <= 100 for s in self.steps):
            raise ValueError("steps must be percentages in (0, 100] ending at 100")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("steps must increase")
        return self
