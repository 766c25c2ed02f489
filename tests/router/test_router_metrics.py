"""The router's /metrics against real `qvl sim` replicas: what each request adds, and what never becomes a label."""

from __future__ import annotations

import base64
import hashlib

import httpx
from support.chat import image_chat, png_data_url
from support.metrics import metric_sum
from support.servers import Cluster

MODEL = "qwen3-vl-sim"


def test_a_stream_records_ttft_and_inter_token_latency(cluster: Cluster) -> None:
    sim = cluster.sim("--prefill-base-ms", "50", "--step-base-ms", "30", "--output-tokens", "6")
    router = cluster.router(sim)
    doc = image_chat(MODEL, png_data_url(), stream=True)
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=doc, timeout=20) as resp:
        assert resp.status_code == 200
        body = resp.read()
    assert body.endswith(b"data: [DONE]\n\n")
    assert metric_sum(router.url, "qvl_time_to_first_token_seconds_count", model=MODEL) == 1
    assert metric_sum(router.url, "qvl_time_to_first_token_seconds_sum", model=MODEL) >= 0.08
    assert metric_sum(router.url, "qvl_inter_token_latency_seconds_count", model=MODEL) == 1
    # 6 tokens 30 ms apart: the mean gap is at least the engine's ITL (the finish events add ~0).
    itl = metric_sum(router.url, "qvl_inter_token_latency_seconds_sum", model=MODEL)
    assert 0.015 <= itl < 1.0
    assert metric_sum(router.url, "qvl_request_duration_seconds_count", model=MODEL, stream="true") == 1


def test_non_streamed_requests_count_cache_result_and_replica_but_no_stream_timing(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    router = cluster.router(sim, flags=("--cache", "memory"))
    doc = image_chat(MODEL, png_data_url(), temperature=0)
    for _ in range(2):
        assert httpx.post(router.url + "/v1/chat/completions", json=doc, timeout=10).status_code == 200
    assert httpx.post(router.url + "/v1/chat/completions", json={**doc, "temperature": 0.7}).status_code == 200
    replica = f"127.0.0.1:{sim.port}"
    ok = {"model": MODEL, "status": "200", "error_type": ""}
    assert metric_sum(router.url, "qvl_requests_total", cache="miss", replica=replica, **ok) == 1
    assert metric_sum(router.url, "qvl_requests_total", cache="hit", replica="cache", **ok) == 1
    assert metric_sum(router.url, "qvl_requests_total", cache="bypass", replica=replica, **ok) == 1
    assert metric_sum(router.url, "qvl_request_duration_seconds_count", stream="false") == 3
    assert metric_sum(router.url, "qvl_time_to_first_token_seconds_count") == 0
    assert metric_sum(router.url, "qvl_cache_store_up", store="memory") == 1
    assert metric_sum(router.url, "qvl_replica_healthy", replica=replica, model=MODEL) == 1
    assert metric_sum(router.url, "qvl_replica_in_flight", replica=replica) == 0


def test_refusals_are_counted_by_reason(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    router = cluster.router(sim)
    url = router.url + "/v1/chat/completions"
    assert httpx.post(url, content=b"{not json", timeout=10).status_code == 400
    assert httpx.post(url, json=image_chat("no-such-model", png_data_url()), timeout=10).status_code == 404
    assert httpx.post(url, json=image_chat(MODEL, "data:image/png;base64,!!!"), timeout=10).status_code == 400
    assert metric_sum(router.url, "qvl_rejections_total", reason="invalid_json") == 1
    assert metric_sum(router.url, "qvl_rejections_total", reason="model_not_found") == 1
    assert metric_sum(router.url, "qvl_rejections_total") == 3
    refused = {"cache": "none", "replica": "none", "model": "_unknown"}
    assert metric_sum(router.url, "qvl_requests_total", status="400", **refused) == 2
    # The unknown model passed the edge and was refused when routing.
    assert metric_sum(router.url, "qvl_requests_total", status="404", error_type="model_not_found") == 1
    assert metric_sum(router.url, "qvl_upstream_errors_total") == 0


def test_no_request_id_key_or_digest_becomes_a_label(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    router = cluster.router(sim)
    image = png_data_url((1, 2, 3))
    digest = hashlib.sha256(base64.b64decode(image.split(",", 1)[1])).hexdigest()
    request_id = "req-unique-7f3a9c"
    headers = {"x-request-id": request_id, "authorization": "Bearer sk-secret-key-123", "x-session-id": "sess-42"}
    for stream in (False, True):
        doc = image_chat(MODEL, image, temperature=0, stream=stream, user="shopper-99")
        assert httpx.post(router.url + "/v1/chat/completions", json=doc, headers=headers).status_code == 200
    text = httpx.get(router.url + "/metrics", timeout=5).text
    assert metric_sum(router.url, "qvl_requests_total") == 2
    for secret in (request_id, "sk-secret-key-123", "sess-42", "shopper-99", digest, digest[:16]):
        assert secret not in text
