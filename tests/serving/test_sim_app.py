"""`qvl sim` as a real process: vLLM's JSON and SSE shapes, errors, metrics, disconnects, the openai client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message
from support.chat import image_chat, png_data_url
from support.polling import wait_for
from support.servers import Cluster, Proc

from qvl.settings import SimSettings
from serving.sim.app import create_app

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


def sim_with(cluster: Cluster, settings: Mapping[str, object], *flags: str) -> Proc:
    """`qvl sim` with `sim.*` settings that have no flag, given in a --config file (JSON is YAML)."""
    config = cluster.tmp / f"sim-{len(cluster.procs)}.yaml"
    config.write_bytes(orjson.dumps({"sim": settings}))
    return cluster.sim("--config", str(config), *flags)


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


ALIASES = ["qwen3-vl-8b@v2", "qwen3-vl-canary"]


def test_aliases_are_listed_accepted_and_echoed(cluster: Cluster) -> None:
    sim = sim_with(cluster, {"aliases": ALIASES}, "--zero-delay")
    cards = httpx.get(sim.url + "/v1/models").json()["data"]
    assert [card["id"] for card in cards] == [MODEL, *ALIASES]
    assert all(card["root"] == MODEL and card["object"] == "model" and card["max_model_len"] == 32768 for card in cards)
    assert len({card["permission"][0]["id"] for card in cards}) == len(cards)

    for name in ALIASES:
        doc = httpx.post(chat_url(sim), json=image_chat(name, png_data_url(), max_tokens=2)).json()
        assert doc["model"] == name
        body = image_chat(name, png_data_url(), stream=True, stream_options={"include_usage": True}, max_tokens=2)
        chunks = [orjson.loads(event) for event in sse_events(httpx.post(chat_url(sim), json=body).text)[:-1]]
        assert {chunk["model"] for chunk in chunks} == {name}
    # No `model`: the main name, as vLLM answers.
    unnamed = {key: value for key, value in image_chat(MODEL, png_data_url()).items() if key != "model"}
    assert httpx.post(chat_url(sim), json=unnamed).json()["model"] == MODEL
    assert httpx.post(chat_url(sim), json=image_chat(MODEL, png_data_url())).json()["model"] == MODEL

    for unknown in ("qwen3-vl-8b@v3", ["qwen3-vl-8b@v2"]):
        response = httpx.post(chat_url(sim), json={**image_chat(MODEL, png_data_url()), "model": unknown})
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "NotFoundError"


def test_fault_error_ratio_one_fails_every_request_with_vllms_500(cluster: Cluster) -> None:
    sim = sim_with(cluster, {"fault_error_ratio": 1.0}, "--zero-delay")
    for stream in (False, True):
        body = image_chat(MODEL, png_data_url(), stream=stream)
        response = httpx.post(chat_url(sim), json=body, headers={"x-request-id": "r-500"})
        assert response.status_code == 500, stream
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-request-id"] == "r-500"
        error = response.json()["error"]
        assert error["type"] == "InternalServerError" and error["code"] == 500 and error["param"] is None
        assert "injected fault" in error["message"]
    # Checked before the draw: a bad request is still a 400, an unknown model still a 404.
    assert httpx.post(chat_url(sim), json=image_chat(MODEL, png_data_url(), max_tokens=0)).status_code == 400
    assert httpx.post(chat_url(sim), json=image_chat("nope", png_data_url())).status_code == 404
    # The failed requests never reached the engine.
    assert metric(sim, "vllm:prompt_tokens_total") == 0
    assert metric(sim, "vllm:time_to_first_token_seconds_count") == 0


def test_fault_error_ratio_half_is_random_and_repeatable_with_a_seed(cluster: Cluster) -> None:
    settings = {"fault_error_ratio": 0.5, "fault_seed": 1234}
    outcomes = []
    for sim in (sim_with(cluster, settings, "--zero-delay"), sim_with(cluster, settings, "--zero-delay")):
        with httpx.Client(timeout=10) as client:
            body = image_chat(MODEL, png_data_url(), max_tokens=1)
            outcomes.append([client.post(chat_url(sim), json=body).status_code for _ in range(200)])
    assert set(outcomes[0]) == {200, 500}
    assert 70 <= outcomes[0].count(500) <= 130
    assert outcomes[0] == outcomes[1]  # the same seed, the same draws


def test_fault_added_ttft_delays_the_first_token_and_the_answer(cluster: Cluster) -> None:
    added = 0.3
    fast = cluster.sim("--zero-delay")
    slow = sim_with(cluster, {"fault_added_ttft_ms": added * 1000}, "--zero-delay")  # --zero-delay keeps it

    def first_token_and_answer(sim: Proc) -> tuple[float, float]:
        """The quickest of three runs: time to a stream's first token, and to a whole non-streamed answer."""
        firsts, answers = [], []
        with httpx.Client(timeout=10) as client:
            for _ in range(3):
                start = time.perf_counter()
                with client.stream("POST", chat_url(sim), json=image_chat(MODEL, png_data_url(), stream=True)) as r:
                    lines = r.iter_lines()
                    while not next(lines).startswith("data: "):
                        pass
                    firsts.append(time.perf_counter() - start)
                    for _line in lines:  # read to the end, so the connection can be reused
                        pass
                start = time.perf_counter()
                assert client.post(chat_url(sim), json=image_chat(MODEL, png_data_url())).status_code == 200
                answers.append(time.perf_counter() - start)
        return min(firsts), min(answers)

    fast_first, fast_answer = first_token_and_answer(fast)
    slow_first, slow_answer = first_token_and_answer(slow)
    assert slow_first - fast_first >= added * 0.9
    assert slow_answer - fast_answer >= added * 0.9
    # The engine's own TTFT counts the delay, as it would a slow replica's (a lower bound only).
    assert metric(slow, "vllm:time_to_first_token_seconds_sum") >= 6 * added * 0.9


@pytest.mark.parametrize("stream", [False, True])
def test_added_ttft_is_cancelled_with_the_request(stream: bool) -> None:
    # In process: a 60 s delay that a disconnect failed to cancel would outlast the wait below.
    app = create_app(SimSettings(model=MODEL, fault_added_ttft_ms=60_000).zero_delay())
    request: Message = {"type": "http.request", "body": orjson.dumps(image_chat(MODEL, png_data_url(), stream=stream))}
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    sent: list[Message] = []

    async def scenario() -> None:
        messages = [request]

        async def receive() -> Message:
            if messages:
                return messages.pop()
            await asyncio.sleep(0.05)  # the client leaves while the request waits out the delay
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)

        task = asyncio.ensure_future(app(scope, receive, send))
        done, _ = await asyncio.wait({task}, timeout=10)
        if not done:
            task.cancel()
        assert task in done
        task.result()

    asyncio.run(scenario())
    # A stream has its 200 headers (vLLM sends them before scheduling) and nothing more.
    assert [message["type"] for message in sent] == (["http.response.start"] if stream else [])
    assert app.engine.metrics.prompt_tokens == 0
    assert app.engine.metrics.finished == {"stop": 0, "length": 0, "abort": 0}
