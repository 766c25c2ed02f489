"""`qvl sim` as a real process: vLLM's JSON and SSE shapes, errors, metrics, disconnects, the openai client."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.chat import image_chat, png_data_url
from support.polling import wait_for
from support.servers import Cluster, Proc

MODEL = "qwen3-vl-sim"
# A 64x48 PNG is scaled up to 320x224 by Qwen3-VL's resize: 10 x 7 image tokens.
IMAGE_TOKENS = 70
# "What is in this photo?" is 22 characters: ceil(22 / 4) text tokens.
TEXT_TOKENS = 6

VLLM_METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:mm_cache_queries_total",
    "vllm:mm_cache_hits_total",
    "vllm:request_success_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_count",
    "vllm:inter_token_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_count",
)


def chat_url(proc: Proc) -> str:
    return proc.url + "/v1/chat/completions"


def scrape(proc: Proc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by name and sorted labels (parsed by prometheus_client)."""
    response = httpx.get(proc.url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(proc: Proc, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
    return scrape(proc)[key]


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text.strip("\n").split("\n\n")
    assert all(event.startswith("data: ") for event in events)
    return [event.removeprefix("data: ") for event in events]


def test_chat_completion_json_shape(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    response = httpx.post(chat_url(sim), json=image_chat(MODEL, png_data_url()), headers={"x-request-id": "r-42"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"] == "r-42"
    doc = response.json()
    assert doc["id"].startswith("chatcmpl-") and len(doc["id"]) > len("chatcmpl-")
    assert doc["object"] == "chat.completion"
    assert isinstance(doc["created"], int) and abs(doc["created"] - time.time()) < 60
    assert doc["model"] == MODEL
    [choice] = doc["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 24  # output_tokens default: one word each
    assert choice["finish_reason"] == "stop"
    assert doc["usage"] == {
        "prompt_tokens": TEXT_TOKENS + IMAGE_TOKENS,
        "completion_tokens": 24,
        "total_tokens": TEXT_TOKENS + IMAGE_TOKENS + 24,
    }
    # max_tokens below the natural length cuts it short with finish_reason "length".
    capped = httpx.post(chat_url(sim), json=image_chat(MODEL, png_data_url(), max_completion_tokens=3)).json()
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 3


def test_streaming_sse_shape_with_usage(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    body = image_chat(MODEL, png_data_url(), stream=True, stream_options={"include_usage": True}, max_tokens=5)
    response = httpx.post(chat_url(sim), json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(event) for event in events[:-1]]
    assert len(chunks) == 1 + 5 + 1  # role, five tokens, usage
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == MODEL for chunk in chunks)
    first, *tokens, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None] * 4 + ["length"]
    assert all(set(t["choices"][0]["delta"]) == {"content"} for t in tokens)
    assert "usage" not in tokens[0]
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": TEXT_TOKENS + IMAGE_TOKENS,
        "completion_tokens": 5,
        "total_tokens": TEXT_TOKENS + IMAGE_TOKENS + 5,
    }
    # Without include_usage the stream ends with the finish chunk, then [DONE].
    plain = sse_events(httpx.post(chat_url(sim), json={**body, "stream_options": None}).text)
    assert plain[-1] == "[DONE]"
    assert orjson.loads(plain[-2])["choices"][0]["finish_reason"] == "length"


def test_models_health_and_errors(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    health = httpx.get(sim.url + "/health")
    assert (health.status_code, health.content) == (200, b"")
    models = httpx.get(sim.url + "/v1/models").json()
    assert models["object"] == "list"
    [card] = models["data"]
    assert card["id"] == MODEL and card["root"] == MODEL and card["parent"] is None
    assert card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["max_model_len"] == 32768 and isinstance(card["created"], int)

    unknown = httpx.post(chat_url(sim), json=image_chat("other-model", png_data_url()))
    assert unknown.status_code == 404
    error = unknown.json()["error"]
    assert error["type"] == "NotFoundError" and error["code"] == 404
    assert "other-model" in error["message"] and "param" in error

    bad_requests = [
        b"{not json",
        orjson.dumps({"model": MODEL, "messages": []}),
        orjson.dumps(image_chat(MODEL, "data:image/png;base64,aGVsbG8gd29ybGQ=")),  # "hello world"
        orjson.dumps(image_chat(MODEL, "data:image/png;base64,!!!")),
        orjson.dumps(image_chat(MODEL, "https://example.com/cat.png")),
        orjson.dumps(image_chat(MODEL, png_data_url(), max_tokens=0)),
        orjson.dumps(image_chat(MODEL, png_data_url(), max_tokens=40000)),
    ]
    for body in bad_requests:
        response = httpx.post(chat_url(sim), content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, body[:60]
        error = response.json()["error"]
        assert error["type"] == "BadRequestError" and error["code"] == 400 and error["message"]
    assert httpx.get(sim.url + "/nope").status_code == 404
    assert httpx.get(chat_url(sim)).status_code == 405


def test_metrics_after_requests(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    repeated = png_data_url((1, 2, 3))
    for url in (repeated, repeated, repeated, png_data_url((4, 5, 6))):
        assert httpx.post(chat_url(sim), json=image_chat(MODEL, url)).status_code == 200
    stream = image_chat(MODEL, repeated, stream=True, max_tokens=4)
    assert httpx.post(chat_url(sim), json=stream).status_code == 200

    samples = scrape(sim)
    names = {name for name, _ in samples}
    assert set(VLLM_METRICS) <= names
    assert all(dict(labels).get("model_name") == MODEL for _, labels in samples)

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"model_name": MODEL, **labels}.items())))]

    assert value("vllm:num_requests_running") == 0
    assert value("vllm:num_requests_waiting") == 0
    assert value("vllm:kv_cache_usage_perc") == 0
    assert value("vllm:mm_cache_queries_total") == 5
    assert value("vllm:mm_cache_hits_total") == 3  # the repeated image, after its first sight
    prompt = 5 * (TEXT_TOKENS + IMAGE_TOKENS)
    assert value("vllm:prompt_tokens_total") == prompt
    assert value("vllm:prefix_cache_queries_total") == prompt
    assert value("vllm:prefix_cache_hits_total") == 3 * IMAGE_TOKENS
    assert value("vllm:generation_tokens_total") == 4 * 24 + 4
    assert value("vllm:request_success_total", finished_reason="stop") == 4
    assert value("vllm:request_success_total", finished_reason="length") == 1
    assert value("vllm:time_to_first_token_seconds_count") == 5
    assert value("vllm:e2e_request_latency_seconds_count") == 5
    assert value("vllm:inter_token_latency_seconds_count") == 4 * 23 + 3
    assert value("vllm:time_to_first_token_seconds_bucket", le="+Inf") == 5
    assert 0 < value("vllm:e2e_request_latency_seconds_sum") < 1


def test_latency_flags_shape_timing(cluster: Cluster) -> None:
    sim = cluster.sim("--prefill-base-ms", "130", "--step-base-ms", "20", "--output-tokens", "5")
    response = httpx.post(chat_url(sim), json=image_chat(MODEL, png_data_url()))
    assert response.status_code == 200
    # The engine's own histograms show the configured delays were applied (lower bounds only).
    assert metric(sim, "vllm:time_to_first_token_seconds_sum") >= 0.15
    assert metric(sim, "vllm:inter_token_latency_seconds_sum") >= 4 * 0.02


def test_client_disconnect_mid_stream_frees_the_slot(cluster: Cluster) -> None:
    sim = cluster.sim("--step-base-ms", "50", "--prefill-base-ms", "0")
    body = image_chat(MODEL, png_data_url(), stream=True)  # 24 tokens: over a second in all
    with httpx.Client(timeout=5) as client, client.stream("POST", chat_url(sim), json=body) as response:
        # next() rather than a for loop: breaking out of iter_lines() would close the connection.
        lines = response.iter_lines()
        data = 0
        while data < 3:
            data += next(lines).startswith("data: ")
        assert metric(sim, "vllm:num_requests_running") == 1
    # Leaving the block closes the half-read response, and with it the connection. Had the engine not
    # noticed, the request would still end (in about a second) but as `stop`, not `abort`: no clock needed.
    wait_for(lambda: metric(sim, "vllm:num_requests_running") == 0, timeout=10)
    assert metric(sim, "vllm:request_success_total", finished_reason="abort") == 1
    assert metric(sim, "vllm:request_success_total", finished_reason="stop") == 0


def test_client_disconnect_while_running_or_queued(cluster: Cluster) -> None:
    # 1 s steps: the first request runs for 24 s; the second waits, counted from the second step on.
    sim = cluster.sim("--max-running", "1", "--prefill-base-ms", "1000", "--step-base-ms", "1000")

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=30) as first, httpx.AsyncClient(timeout=30) as second:
            running = asyncio.create_task(first.post(chat_url(sim), json=image_chat(MODEL, png_data_url())))
            queued = asyncio.create_task(second.post(chat_url(sim), json=image_chat(MODEL, png_data_url())))
            # Each wait is well under the first request's 24 s, so a request that ended instead is a failure.
            await asyncio.to_thread(
                wait_for,
                lambda: (metric(sim, "vllm:num_requests_running"), metric(sim, "vllm:num_requests_waiting")) == (1, 1),
                10,
            )
            queued.cancel()
            await asyncio.to_thread(wait_for, lambda: metric(sim, "vllm:num_requests_waiting") == 0, 5)
            assert metric(sim, "vllm:num_requests_running") == 1
            running.cancel()
            await asyncio.to_thread(wait_for, lambda: metric(sim, "vllm:num_requests_running") == 0, 5)
            for task in (running, queued):
                with pytest.raises(asyncio.CancelledError):
                    await task

    asyncio.run(scenario())
    assert metric(sim, "vllm:kv_cache_usage_perc") == 0
    # Only the admitted request counts as aborted; the queued one never reached the batch.
    assert metric(sim, "vllm:request_success_total", finished_reason="abort") == 1


def test_official_openai_client(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    client = openai.OpenAI(base_url=sim.url + "/v1", api_key="x")
    try:
        messages = image_chat(MODEL, png_data_url())["messages"]
        completion = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7)
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.role == "assistant"
        assert completion.choices[0].message.content
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == 7
        assert completion.usage.prompt_tokens == TEXT_TOKENS + IMAGE_TOKENS

        stream = client.chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text.split()) == 24
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == TEXT_TOKENS + IMAGE_TOKENS + 24
        assert [m.id for m in client.models.list()] == [MODEL]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=messages)
    finally:
        client.close()
