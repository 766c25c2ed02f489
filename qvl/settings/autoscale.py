"""The autoscaler's settings (`qvl cluster autoscale`, autoscale/): bounds, the SLO and a replica's capacity,
the policy and its stability rules, dry-run, draining."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from qvl.settings.base import Section

AutoscalePolicyName = Literal["demand", "reactive"]


class PoolBounds(Section):
    """One pool's own bounds, replacing autoscale.min_replicas and max_replicas for it."""

    min_replicas: int = Field(ge=1, description="Fewest replicas of this pool.")
    max_replicas: int = Field(ge=1, description="Most replicas of this pool.")

    @model_validator(mode="after")
    def _bounds(self) -> PoolBounds:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ScheduledEvent(Section):
    """A known peak (a flash sale, a campaign): the pools' replicas it needs, ready when it starts."""

    name: str = Field(description="What the event is, for the logs and the decisions' reason.")
    start: datetime.datetime = Field(description="When the event's traffic begins (ISO 8601; UTC when no zone).")
    end: datetime.datetime = Field(description="When it ends.")
    min_replicas: int = Field(
        ge=1, description="Replicas each named pool has from one start-up before `start` to `end`."
    )
    pools: list[str] = Field(default_factory=list, description="Pools it applies to; empty: every pool.")

    @model_validator(mode="after")
    def _order(self) -> ScheduledEvent:
        if self.end <= self.start:
            raise ValueError(f"scheduled event {self.name}: end must come after start")
        return self

    def window(self, lead_s: float) -> tuple[float, float]:
        """Its floor's span in epoch seconds: from `lead_s` (a start-up) before its start to its end."""
        return _epoch(self.start) - lead_s, _epoch(self.end)


def _epoch(moment: datetime.datetime) -> float:
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=datetime.UTC)
    return aware.timestamp()


class AutoscaleSettings(Section):
    dry_run: bool = Field(False, description="Decide, log, count and export as usual, but start and stop nothing.")
    interval_s: float = Field(10.0, gt=0, description="Seconds between two looks at the load (one decision per pool).")
    host: str = Field("0.0.0.0", description="Address the autoscaler's /metrics and /status listen on.")
    port: int = Field(8300, ge=0, le=65535, description="Port of the autoscaler's /metrics and /status; 0: none.")
    policy: AutoscalePolicyName = Field(
        "demand",
        description="demand: prefill and decode tokens per second against a replica's capacity at the SLO, "
        "forecast ahead of the start-up time; reactive: in-flight requests per replica against a target "
        "(the baseline the benchmark compares with).",
    )
    min_replicas: int = Field(
        1, ge=1, description="Fewest replicas of a pool (at least 1: with none, no engine shows the demand)."
    )
    max_replicas: int = Field(8, ge=1, description="Most replicas of a pool.")
    pools: dict[str, PoolBounds] = Field(
        default_factory=dict, description="Per-pool bounds by pool name, replacing min_replicas and max_replicas."
    )
    slo_ttft_s: float = Field(
        2.0,
        gt=0,
        description="The SLO: mean time to first token a replica may show. Without a configured capacity, a "
        "replica's token throughput over an interval in which it reached the SLO is a sample of its capacity.",
    )
    profile: Path | None = Field(
        None,
        description="Capacity profile (qvl-capacity-profile/1) giving a replica's prefill and decode capacity; "
        "empty: capacity_* settings, else learned online from the engines' metrics.",
    )
    capacity_prefill_tokens_s: float = Field(
        0.0, ge=0, description="One replica's prompt tokens per second at the SLO (image tokens included); 0: unknown."
    )
    capacity_decode_tokens_s: float = Field(
        0.0, ge=0, description="One replica's generated tokens per second at the SLO; 0: unknown."
    )
    target_utilisation: float = Field(
        0.8, gt=0, le=1, description="demand: share of a replica's capacity at the SLO to plan for."
    )
    startup_s: float = Field(
        120.0,
        ge=0,
        description="Seconds a replica takes to serve after it is asked for: the forecast's horizon (the "
        "measured start-ups replace it when longer).",
    )
    hysteresis: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="demand: a scale-down keeps the replicas needed this share under the replicas left.",
    )
    down_window_s: float = Field(
        300.0,
        ge=0,
        description="demand: a scale-down goes only to what the largest need of this many past seconds asks "
        "(a stabilisation window: a dip or a noisy interval removes nothing).",
    )
    cooldown_s: float = Field(
        60.0,
        ge=0,
        description="Seconds after any change before a step down or a turn (an up after an up may follow at once).",
    )
    down_after_up_s: float = Field(
        300.0, ge=0, description="Seconds after a scale-up during which no scale-down happens."
    )
    forecast_window_s: float = Field(
        600.0,
        gt=0,
        description="demand: the trend is the smoothed demand's change over this many seconds (none before half "
        "of them have been seen); while it rises no scale-down happens.",
    )
    smoothing_s: float = Field(
        60.0,
        gt=0,
        description="demand: span of the exponential smoothing of the current demand (0.98 of the weight within "
        "it), so that one noisy interval neither adds nor removes a replica.",
    )
    in_flight_target: float = Field(2.0, gt=0, description="reactive: in-flight requests per replica to keep.")
    reactive_up_delay_s: float = Field(
        30.0, ge=0, description="reactive: seconds the target must be exceeded before scaling up."
    )
    reactive_down_delay_s: float = Field(
        600.0, ge=0, description="reactive: seconds the load must stay under the target before scaling down."
    )
    batch_burst_replicas: int = Field(
        0,
        ge=0,
        description="Replicas a pool may add, within max_replicas, for batch work: batch lines never count as "
        "interactive demand and use only this budget.",
    )
    drain_timeout_s: float = Field(
        300.0,
        gt=0,
        description="A replica being removed leaves the registry, then gets this long to finish its requests "
        "in flight before it is stopped.",
    )
    schedule: list[ScheduledEvent] = Field(
        default_factory=list,
        description="demand: known peaks. From one start-up time before an event until its end, its pools keep at "
        "least its min_replicas, and the event stands for the forecast (measured demand above it still adds "
        "replicas); size min_replicas with `qvl plan size` at the expected peak rate.",
    )
    history: int = Field(360, ge=1, description="Samples per pool kept for the console's chart (one per interval).")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    def bounds(self, pool: str) -> PoolBounds:
        """The pool's bounds: its own entry in `pools`, else min_replicas and max_replicas."""
        return self.pools.get(pool) or PoolBounds(min_replicas=self.min_replicas, max_replicas=self.max_replicas)
