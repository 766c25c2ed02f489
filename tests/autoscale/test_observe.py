"""What the autoscaler reads off the engines: rates between two scrapes of a real `vllm:` page shape,
a queue spread over one start-up time, and a capacity learned only from intervals at the SLO and
never over a configured one."""

from __future__ import annotations

import pytest

from autoscale.capacity import CapacityEstimate
from autoscale.observe import EngineSample, ReplicaRates, pool_load, rates
from qvl.settings.autoscale import AutoscaleSettings

PAGE = """# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{model_name="m"}} {prompt}
vllm:generation_tokens_total{{model_name="m"}} {output}
vllm:num_requests_running{{model_name="m"}} 3.0
vllm:num_requests_waiting{{model_name="m"}} {waiting}
vllm:time_to_first_token_seconds_sum{{model_name="m"}} {ttft_sum}
vllm:time_to_first_token_seconds_count{{model_name="m"}} {ttft_n}
vllm:request_success_total{{finished_reason="stop",model_name="m"}} {done}
vllm:request_success_total{{finished_reason="length",model_name="m"}} 0.0
"""


def page(prompt: float, output: float, waiting: float, ttft_sum: float, ttft_n: float, done: float) -> str:
    return PAGE.format(prompt=prompt, output=output, waiting=waiting, ttft_sum=ttft_sum, ttft_n=ttft_n, done=done)


def interval(ttft_s: float, waiting: float = 0.0) -> ReplicaRates:
    """Ten seconds of 20 requests: 1000 prompt and 100 generated tokens per second."""
    before = EngineSample.parse(0.0, page(0, 0, 0, 0, 0, 0))
    after = EngineSample.parse(10.0, page(10_000, 1_000, waiting, 20 * ttft_s, 20, 20))
    found = rates(before, after)
    assert found is not None
    return found


def test_rates_come_from_two_scrapes_and_a_restart_gives_none() -> None:
    r = interval(0.2, waiting=2)
    assert (r.prefill_tokens_s, r.decode_tokens_s, r.running, r.waiting) == (1000, 100, 3, 2)
    assert r.mean_ttft_s == pytest.approx(0.2) and (r.finished, r.seconds) == (20, 10)
    restarted = EngineSample.parse(20.0, page(5, 5, 0, 0, 0, 0))
    assert rates(EngineSample.parse(10.0, page(10_000, 1_000, 0, 4, 20, 20)), restarted) is None


def test_a_queue_is_spread_over_one_start_up_time() -> None:
    # 20 finished in 10 s, 10 waiting: 10 requests of 500 prompt tokens to serve within 100 s.
    load = pool_load(0.0, {"r": interval(0.2, waiting=10)}, 0.0, backlog_s=100.0).load
    assert load.prefill_tokens_s == pytest.approx(1000 * (1 + 10 * 10 / (20 * 100)))
    assert load.in_flight == 13


def test_capacity_is_learned_only_at_the_slo_and_never_over_a_configured_one() -> None:
    learned = CapacityEstimate(AutoscaleSettings(slo_ttft_s=1.0))
    learned.learn([interval(0.2, waiting=3)])  # queued for a moment, far from the SLO: no sample
    assert (learned.source, learned.capacity) == ("unknown", None)
    learned.learn([interval(1.5)])
    assert learned.source == "learned" and learned.capacity is not None
    assert (learned.capacity.prefill_tokens_s, learned.capacity.decode_tokens_s) == (1000, 100)
    configured = CapacityEstimate(
        AutoscaleSettings(slo_ttft_s=1.0, capacity_prefill_tokens_s=5000, capacity_decode_tokens_s=150)
    )
    configured.learn([interval(1.5)])
    assert configured.source == "settings" and configured.capacity is not None
    assert configured.capacity.decode_tokens_s == 150
