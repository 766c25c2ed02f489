"""The autoscaler on a local Ray cluster: a step in load through a real router to simulated replicas
(a cold start of their own), replayed in compressed time by autoscale/live.py. The pool grows under the
step and shrinks after it, each removed replica leaving the registry and draining its requests first,
and no request fails."""

from __future__ import annotations

from pathlib import Path

from autoscale.live import LiveRun, run_live
from qvl.settings import load_settings

SPEED = 6.0
CAPACITY_DECODE = 150.0  # tokens/s of one simulated replica (step_base_ms 25, max_running 4) at the SLO


def step(t: float) -> float:
    """2 requests/s, 8 between 60 s and 240 s (trace seconds)."""
    return 8.0 if 60.0 <= t < 240.0 else 2.0


def test_a_step_scales_up_and_back_down_without_a_failed_request(redis_server, tmp_path: Path) -> None:
    settings = load_settings(
        None,
        {
            "registry": {"url": redis_server.url, "ttl_s": 3.0, "poll_interval_s": 0.25},
            "sim": {"step_base_ms": 25.0, "max_running": 4},
            "autoscale": {
                "interval_s": 10.0,
                "startup_s": 30.0,
                "cooldown_s": 30.0,
                "down_after_up_s": 60.0,
                "smoothing_s": 30.0,
                "forecast_window_s": 120.0,
                "down_window_s": 60.0,
                "max_replicas": 4,
                "capacity_prefill_tokens_s": 5000.0,
                "capacity_decode_tokens_s": CAPACITY_DECODE,
                "slo_ttft_s": 1.0,
                "drain_timeout_s": 60.0,
            },
        },
    )
    run = run_live(settings, step, 480.0, speed=SPEED, cold_start_s=30.0, start=1, run_dir=tmp_path, say=print, seed=1)
    run.dump(tmp_path / "out")
    summary = run.summary()
    print(summary)
    assert summary["failed"] == 0, summary["errors"]
    assert summary["max_serving"] >= 3, "the step's 8 requests/s need 3 replicas of 150 tokens/s at 0.8"
    assert summary["ups"] >= 1 and summary["downs"] >= 1
    assert run.ticks[-1]["held"] < summary["max_serving"]
    assert requests_sent_while_draining(run) > 0, "a drain with no traffic would prove nothing"


def requests_sent_while_draining(run: LiveRun) -> int:
    """Requests sent in tick windows during which a replica was draining."""
    windows = [(t["at"] - run.tick_s, t["at"]) for t in run.ticks if t["draining"]]
    return sum(any(a <= s.at < b for a, b in windows) for s in run.sent)
