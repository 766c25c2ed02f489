"""What the capacity planner's tests share: capacity profiles with chosen costs, and small workloads."""

from __future__ import annotations

import datetime
from typing import Any

import yaml

from loadtests.workload import Workload, parse_workload
from serving.sim.profile import CapacityProfile, Estimate
from support.loadtests import tiny_workload


def make_profile(
    *,
    max_running: int = 64,
    max_batched_tokens: int = 8192,
    mm_cache_items: int = 64,
    tensor_parallel_size: int = 1,
    **costs_ms: float,
) -> CapacityProfile:
    """A profile whose cost terms are the given ones (milliseconds; `image_hit_discount` a share), the
    others zero (the hit discount 1)."""
    names = (
        "step_base_ms",
        "per_decode_ms",
        "per_kv_ktoken_ms",
        "prefill_base_ms",
        "per_text_token_ms",
        "per_image_token_ms",
        "frontend_base_ms",
        "frontend_per_image_token_ms",
    )
    unknown = set(costs_ms) - {*names, "image_hit_discount"}
    if unknown:
        raise TypeError(f"unknown cost terms {sorted(unknown)}")
    costs = {name: Estimate.fixed(costs_ms.get(name, 0.0)) for name in names}
    costs["image_hit_discount"] = Estimate.fixed(costs_ms.get("image_hit_discount", 1.0))
    return CapacityProfile.model_validate(
        {
            "fitted_on": {
                "model": "test",
                "hardware": "none",
                "engine": "sim",
                "engine_version": "0",
                "date": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
                "workload": "test",
                "rates": [1.0],
                "requests": 0,
                "replicas": 1,
            },
            "engine": {
                "max_running": max_running,
                "max_batched_tokens": max_batched_tokens,
                "mm_cache_items": mm_cache_items,
                "tensor_parallel_size": tensor_parallel_size,
            },
            "costs": costs,
        }
    )


def planner_workload(arrivals: str, *, tokens: int = 10, temperature: float = 0.7, **changes: Any) -> Workload:
    """The tiny workload (256x256 photos, one task) streamed, answers of `tokens` tokens, these arrivals;
    `changes` replace top-level sections (images, popularity, tasks)."""
    data = yaml.safe_load(tiny_workload(arrivals))
    data["tasks"][0].update({"stream": True, "temperature": temperature, "output": {"kind": "fixed", "tokens": tokens}})
    data.update(changes)
    return parse_workload(data, "planner-test")
