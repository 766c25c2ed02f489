"""The operations page's data, directly: the window's rates and percentiles over the router's real metrics
registry, the GPU exporter page parser, and the staleness marks of a snapshot."""

from __future__ import annotations

import asyncio
import math

import pytest

from qvl.settings import ConsoleSettings
from router.console.gpus import parse_gpus
from router.console.live import Live, replica_state
from router.console.window import Window, histogram_quantile, sample_registry
from router.metrics import RouterMetrics
from router.replicas import EngineGauges, Replica
from router.upstream import UpstreamClient


def test_histogram_quantile_interpolates_inside_the_bucket_as_prometheus_does() -> None:
    buckets = {0.1: 10.0, 0.5: 30.0, 1.0: 40.0, math.inf: 40.0}
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.5 + 0.5 * (38 - 30) / 10)
    assert histogram_quantile(0.99, {0.1: 1.0, math.inf: 10.0}) == 0.1  # in +Inf: the largest finite bound
    assert histogram_quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None


def test_the_window_counts_only_what_happened_inside_it() -> None:
    replicas: list[Replica] = []
    metrics = RouterMetrics(lambda: replicas)
    window = Window(seconds=60)
    for _ in range(5):  # before the window: must not count
        metrics.record_request("m", "r:1", 200, "miss", "", 9.0, True)
    window.add(0.0, sample_registry(metrics.registry))
    for status, cache, seconds in [(200, "hit", 0.02), (200, "miss", 0.3), (503, "none", 0.01), (429, "none", 0.01)]:
        metrics.record_request("m", "r:1", status, cache, "" if status == 200 else "x", seconds, False)
        if cache != "none":
            metrics.record_cache_result(cache)
    metrics.record_stream_timing("m", 0.2, 0.01)
    window.add(30.0, sample_registry(metrics.registry))
    stats = window.stats()
    assert (stats.seconds, stats.requests, stats.request_rate) == (30.0, 4.0, pytest.approx(4 / 30))
    assert (stats.error_ratio, stats.refused_ratio, stats.cache_hit_ratio) == (0.25, 0.25, 0.5)
    assert stats.ttft_p50_s == pytest.approx(0.1 + 0.15 * 0.5)  # one stream, in the 0.1-0.25 bucket
    # Four durations (0.01, 0.01, 0.02, 0.3): rank 3.8 falls in the 0.25-0.5 bucket, 0.8 of the way in.
    assert stats.e2e_p95_s == pytest.approx(0.25 + 0.25 * 0.8)

    # Samples older than the window drop out, keeping one at its start.
    window.add(70.0, sample_registry(metrics.registry))
    window.add(95.0, sample_registry(metrics.registry))
    assert window.stats().requests == 0 and window.stats().seconds == 65.0


GPU_PAGE = """# HELP qvl_gpu_exporter_up 1 when NVML was read
# TYPE qvl_gpu_exporter_up gauge
qvl_gpu_exporter_up{host="h"} 1.0
qvl_gpu_utilization_ratio{gpu="1",host="h",name="L40S",uuid="GPU-b"} 0.5
qvl_gpu_utilization_ratio{gpu="0",host="h",name="L40S",uuid="GPU-a"} 0.25
qvl_gpu_memory_used_bytes{gpu="0",host="h",name="L40S",uuid="GPU-a"} 1024.0
qvl_gpu_temperature_celsius{gpu="0",host="h",name="L40S",uuid="GPU-a"} 61.0
"""


def test_parse_gpus_groups_series_by_gpu_in_index_order() -> None:
    up, gpus = parse_gpus(GPU_PAGE)
    assert up is True
    assert [g["uuid"] for g in gpus] == ["GPU-a", "GPU-b"]
    assert gpus[0] == {
        "host": "h", "gpu": "0", "name": "L40S", "uuid": "GPU-a",
        "utilization": 0.25, "memory_used_bytes": 1024.0, "temperature_c": 61.0,
    }  # fmt: skip
    assert "power_w" not in gpus[1]  # a field the board does not report stays out
    assert parse_gpus('qvl_gpu_exporter_up{host="h"} 0\n') == (False, [])


def test_a_snapshot_marks_sources_stale_after_their_last_answer() -> None:
    snap = asyncio.run(snapshot(now=1_000.0))
    replicas = {r["name"]: r for r in snap["replicas"]}  # type: ignore[attr-defined]
    assert replicas["127.0.0.1:1"]["stale"] is False and replicas["127.0.0.1:1"]["state"] == "healthy"
    assert replicas["127.0.0.1:1"]["image_cache_hit_ratio_total"] == 0.4
    assert replicas["127.0.0.1:1"]["image_cache_hit_ratio"] is None  # no sample in the window yet
    assert replicas["127.0.0.1:2"]["stale"] is True and replicas["127.0.0.1:2"]["state"] == "ejected"
    assert snap["gpus"] == [
        {"host": "h", "gpu": "0", "name": "x", "uuid": "u", "exporter": "127.0.0.1:9", "stale": True}
    ]


async def snapshot(now: float) -> dict[str, object]:
    """A snapshot at `now` of a fresh replica, one silent for 11 s, and an exporter silent for 30 s."""
    fresh = Replica("http://127.0.0.1:1", "127.0.0.1:1", frozenset({"m"}), healthy=True, last_answer=now - 1)
    fresh.engine = EngineGauges(running=2, waiting=1, kv_cache_usage=0.4, mm_cache_queries=10, mm_cache_hits=4)
    dead = Replica("http://127.0.0.1:2", "127.0.0.1:2", frozenset({"m"}), failures=3, last_answer=now - 11)
    client = UpstreamClient(connect_timeout_s=1)
    try:
        live = Live(
            ConsoleSettings(stale_after_s=10, gpu_exporters=["http://127.0.0.1:9"]),
            RouterMetrics(lambda: []).registry,
            lambda: [fresh, dead],
            client,
        )
        live.gpus.exporters[0].last_answer = now - 30
        live.gpus.exporters[0].gpus = [{"host": "h", "gpu": "0", "name": "x", "uuid": "u"}]
        return live.snapshot(now)
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("healthy", "failures", "last_answer", "state"),
    [(True, 0, 1.0, "healthy"), (True, 1, 1.0, "failing"), (False, 2, 1.0, "ejected"), (False, 0, 0.0, "starting")],
)
def test_replica_state(healthy: bool, failures: int, last_answer: float, state: str) -> None:
    r = Replica("http://h:1", "h:1", healthy=healthy, failures=failures, last_answer=last_answer)
    assert replica_state(r) == state
