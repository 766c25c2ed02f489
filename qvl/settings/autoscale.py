"""The autoscaler's policy settings (autoscale/policy.py): bounds and the stability rules. Not yet part of
the settings tree: that comes with the loop that acts on Ray (issue 19), with `enabled` and `dry_run`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from qvl.settings.base import Section

AutoscalePolicyName = Literal["demand", "reactive"]


class AutoscaleSettings(Section):
    policy: AutoscalePolicyName = Field(
        "demand",
        description="demand: prefill and decode tokens per second against a replica's capacity at the SLO, "
        "forecast ahead of the start-up time; reactive: in-flight requests per replica against a target "
        "(the baseline the benchmark compares with).",
    )
    min_replicas: int = Field(1, ge=0, description="Fewest replicas of a pool.")
    max_replicas: int = Field(8, ge=1, description="Most replicas of a pool.")
    target_utilisation: float = Field(
        0.8, gt=0, le=1, description="demand: share of a replica's capacity at the SLO to plan for."
    )
    startup_s: float = Field(
        120.0, ge=0, description="Seconds a replica takes to serve after it is asked for (the forecast's horizon)."
    )
    hysteresis: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="demand: scale down only when the replicas needed are this share under one fewer replica.",
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
        300.0, gt=0, description="demand: seconds of demand the trend is fitted over (Holt's smoothing span)."
    )
    in_flight_target: float = Field(2.0, gt=0, description="reactive: in-flight requests per replica to keep.")
    reactive_up_delay_s: float = Field(
        30.0, ge=0, description="reactive: seconds the target must be exceeded before scaling up."
    )
    reactive_down_delay_s: float = Field(
        600.0, ge=0, description="reactive: seconds the load must stay under the target before scaling down."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self
