"""Capacity profiles: the simulated engine's fitted latency model, as a versioned YAML file.

`qvl plan calibrate` writes one from measurements of real replicas; `qvl sim --profile` and
`qvl up --engine sim --profile` load one into the simulated engine; the planner simulates with it.

    schema: qvl-capacity-profile/1
    fitted_on: {model, hardware, engine, engine_version, date, workload, rates, requests, replicas}
    engine: {max_running, max_batched_tokens, mm_cache_items, tensor_parallel_size}
    tokens: {chars_per_token, template_tokens, image_min_pixels, image_max_pixels, natural_output_tokens}
    costs:                       # each {value, low, high}: the estimate and its 90 % bootstrap interval
      step_base_ms, per_decode_ms, per_kv_ktoken_ms,            # every engine step
      prefill_base_ms, per_text_token_ms, per_image_token_ms,   # each prefill in a step
      image_hit_discount,                                       # share of the encode cost an mm-cache hit saves
      frontend_base_ms, frontend_per_image_token_ms             # before the engine: HTTP, router, preprocessing
    validation: {...}            # written by `qvl plan validate`: the measured prediction errors

The step-time model these terms belong to is written down in serving/sim/core.py.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Final, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from qvl.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, tokens_for_size
from qvl.settings import SimSettings
from qvl.settings.base import Section
from serving.sim.core import StepCosts

SCHEMA: Final = "qvl-capacity-profile/1"


class ProfileError(ValueError):
    """A profile file is missing, not YAML, or does not match the schema; the message says where."""


class Estimate(Section):
    """A fitted value and its bootstrap interval (low and high equal the value when it was not fitted)."""

    value: float = Field(ge=0, description="The estimate.")
    low: float = Field(ge=0, description="Lower end of the 90 % bootstrap interval.")
    high: float = Field(ge=0, description="Upper end of the 90 % bootstrap interval.")

    @classmethod
    def fixed(cls, value: float) -> Estimate:
        return cls(value=value, low=value, high=value)

    @model_validator(mode="after")
    def _ordered(self) -> Estimate:
        if not self.low <= self.value <= self.high:
            raise ValueError(f"need low <= value <= high, got {self.low}, {self.value}, {self.high}")
        return self


class FittedOn(Section):
    """What the profile was measured on, so a reader knows where it holds."""

    model: str = Field(description="Served model name of the measured replicas.")
    hardware: str = Field(description="Accelerator or CPU of the measured replicas.")
    engine: str = Field(description="Engine of the measured replicas (vllm, sim).")
    engine_version: str = Field(description="Engine version string.")
    date: datetime.datetime = Field(description="When the calibration ran (UTC).")
    workload: str = Field(description="Name of the calibration workload.")
    rates: list[float] = Field(description="Load levels of the calibration sweep, requests per second.")
    requests: int = Field(ge=0, description="Requests the fit used.")
    replicas: int = Field(ge=1, description="Replicas behind the router during calibration.")


class EngineLimits(Section):
    """The scheduler's limits (vLLM's max_num_seqs, max_num_batched_tokens, its mm cache)."""

    max_running: int = Field(ge=1, description="Requests decoded at once.")
    max_batched_tokens: int = Field(ge=1, description="Prompt tokens admitted into one step.")
    mm_cache_items: int = Field(ge=0, description="Images the mm cache holds (fitted to the measured hit ratio).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica.")


class Tokens(Section):
    """How the measured model counts a prompt: the planner prices requests it never sent with this."""

    chars_per_token: float = Field(4.0, gt=0, description="Prompt characters per text token.")
    template_tokens: int = Field(0, ge=0, description="Tokens the chat template adds to every prompt.")
    image_min_pixels: int = Field(DEFAULT_MIN_PIXELS, ge=1, description="The processor's resize lower bound.")
    image_max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="The processor's resize upper bound.")
    natural_output_tokens: int | None = Field(
        None,
        ge=1,
        description="Where the model stops on its own when max_tokens allows more; empty: answers run to max_tokens.",
    )

    def text_tokens(self, text: str) -> int:
        """Text tokens of a prompt (the template's included)."""
        return self.template_tokens + math.ceil(len(text) / self.chars_per_token)

    def image_tokens(self, width: int, height: int) -> int:
        """Tokens of a `width` x `height` image after the processor's resize."""
        return tokens_for_size(width, height, min_pixels=self.image_min_pixels, max_pixels=self.image_max_pixels)


class Costs(Section):
    """The fitted step-time and front-end terms, in milliseconds (the discount is a share)."""

    step_base_ms: Estimate
    per_decode_ms: Estimate
    per_kv_ktoken_ms: Estimate
    prefill_base_ms: Estimate
    per_text_token_ms: Estimate
    per_image_token_ms: Estimate
    image_hit_discount: Estimate
    frontend_base_ms: Estimate
    frontend_per_image_token_ms: Estimate


class CapacityProfile(Section):
    """A calibrated latency model of one replica type."""

    schema_: Literal["qvl-capacity-profile/1"] = Field(SCHEMA, alias="schema", description="File format version.")
    fitted_on: FittedOn
    engine: EngineLimits
    costs: Costs
    tokens: Tokens = Field(default_factory=Tokens, description="How the model counts prompt tokens.")
    validation: dict[str, float] | None = Field(
        None, description="Prediction errors measured by `qvl plan validate` (relative, 0.1 = 10 %)."
    )

    def step_costs(self) -> StepCosts:
        """The engine core's step-time model (seconds)."""
        c = self.costs
        return StepCosts(
            step_base=c.step_base_ms.value / 1000,
            per_decode=c.per_decode_ms.value / 1000,
            per_kv_ktoken=c.per_kv_ktoken_ms.value / 1000,
            prefill_base=c.prefill_base_ms.value / 1000,
            per_text_token=c.per_text_token_ms.value / 1000,
            per_image_token=c.per_image_token_ms.value / 1000,
            image_hit_discount=c.image_hit_discount.value,
        )

    def frontend_s(self, image_tokens: int) -> float:
        """Seconds a request spends before the engine sees it."""
        c = self.costs
        return (c.frontend_base_ms.value + c.frontend_per_image_token_ms.value * image_tokens) / 1000

    def apply(self, settings: SimSettings) -> SimSettings:
        """`settings` with the latency terms, engine limits and token counting replaced by this profile's."""
        c = self.costs
        return settings.model_copy(
            update={
                "step_base_ms": c.step_base_ms.value,
                "per_decode_ms": c.per_decode_ms.value,
                "per_kv_ktoken_ms": c.per_kv_ktoken_ms.value,
                "prefill_base_ms": c.prefill_base_ms.value,
                "per_text_token_ms": c.per_text_token_ms.value,
                "per_image_token_ms": c.per_image_token_ms.value,
                "image_hit_discount": c.image_hit_discount.value,
                "frontend_base_ms": c.frontend_base_ms.value,
                "frontend_per_image_token_ms": c.frontend_per_image_token_ms.value,
                "max_running": self.engine.max_running,
                "max_batched_tokens": self.engine.max_batched_tokens,
                "mm_cache_items": self.engine.mm_cache_items,
                "text_chars_per_token": self.tokens.chars_per_token,
                "text_template_tokens": self.tokens.template_tokens,
                "image_min_pixels": self.tokens.image_min_pixels,
                "image_max_pixels": self.tokens.image_max_pixels,
                # Answers run to max_tokens unless the measured model stopped on its own.
                "output_tokens": self.tokens.natural_output_tokens or settings.max_model_len,
            }
        )

    def dump(self) -> str:
        """The profile as YAML (the file format)."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)


def load_profile(path: Path) -> CapacityProfile:
    """Read and check a profile file; raises ProfileError naming the file and the bad field."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read capacity profile {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"capacity profile {path} is not YAML: {exc}") from None
    try:
        return CapacityProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors())
        raise ProfileError(f"capacity profile {path} does not match {SCHEMA}: {problems}") from None


def write_profile(profile: CapacityProfile, path: Path) -> None:
    """Write `profile` to `path` (the parent directory must exist)."""
    path.write_text(profile.dump())
