"""The router against real `qvl sim` replicas on free ports: policies, failover, errors, disconnects."""

from __future__ import annotations

import asyncio
import collections
import math
import re
import time

import httpx
import pytest
from support.chat import image_chat, png_data_url
from support.metrics import metric_sum
from support.polling import wait_for
from support.servers import Cluster, Proc

MODEL = "qwen3-vl-sim"


def chat(router: Proc, doc: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(router.url + "/v1/chat/completions", json=doc, headers=headers, timeout=30)


async def fire(router: Proc, docs: list[dict], concurrency: int) -> list[httpx.Response | Exception]:
    """Send every doc with at most `concurrency` in flight; returns responses (or the exception)."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=router.url, timeout=60, limits=limits) as client:

        async def one(doc: dict) -> httpx.Response | Exception:
            async with sem:
                try:
                    return await client.post("/v1/chat/completions", json=doc)
                except httpx.HTTPError as exc:
                    return exc

        return await asyncio.gather(*(one(d) for d in docs))


def engine_gauge(proc: Proc, name: str) -> float:
    text = httpx.get(proc.url + "/metrics", timeout=5).text
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)]
    return sum(values)


def replica_state(router: Proc) -> dict[str, dict]:
    return {r["url"]: r for r in httpx.get(router.url + "/v1/cluster", timeout=5).json()["replicas"]}


def test_answers_carry_request_id_and_replica_and_echo_given_id(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    router = cluster.router(sim)
    resp = chat(router, image_chat(MODEL, png_data_url()), headers={"x-request-id": "abc-123"})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "abc-123"
    assert resp.headers["x-qvl-replica"] == f"127.0.0.1:{sim.port}"
    assert resp.json()["choices"][0]["message"]["content"]
    generated = chat(router, image_chat(MODEL, png_data_url()), headers={"x-request-id": "bad id!"})
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])


def test_errors_are_openai_shaped_with_stable_types(cluster: Cluster) -> None:
    router = cluster.router(cluster.sim("--zero-delay"))
    unknown = chat(router, image_chat("no-such-model", png_data_url()))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "model_not_found"
    assert unknown.headers["x-request-id"]
    assert unknown.headers["x-qvl-replica"] == "none"
    bad = httpx.post(router.url + "/v1/chat/completions", content=b"{not json", timeout=10)
    assert bad.status_code == 400
    assert bad.json()["error"] == {
        "message": "request body is not valid JSON",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_json",
    }
    image = chat(router, image_chat(MODEL, "data:image/png;base64,@@@"))
    assert image.status_code == 400 and image.json()["error"]["code"] == "invalid_image_url"
    missing = httpx.get(router.url + "/v2/nothing", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"


def test_models_are_the_union_and_requests_go_to_a_replica_serving_the_model(cluster: Cluster) -> None:
    a = cluster.sim("--zero-delay", model="model-a")
    b = cluster.sim("--zero-delay", model="model-b")
    router = cluster.router(a, b, flags=("--policy", "round-robin"))
    ids = [m["id"] for m in httpx.get(router.url + "/v1/models", timeout=5).json()["data"]]
    assert ids == ["model-a", "model-b"]
    for _ in range(4):
        assert chat(router, image_chat("model-b", png_data_url())).headers["x-qvl-replica"].endswith(f":{b.port}")


def test_round_robin_alternates(cluster: Cluster) -> None:
    sims = [cluster.sim("--zero-delay") for _ in range(2)]
    router = cluster.router(*sims, flags=("--policy", "round-robin"))
    seen = [chat(router, image_chat(MODEL, png_data_url())).headers["x-qvl-replica"] for _ in range(6)]
    assert seen[0::2] == [seen[0]] * 3 and seen[1::2] == [seen[1]] * 3 and seen[0] != seen[1]


def test_session_policy_pins_a_conversation(cluster: Cluster) -> None:
    sims = [cluster.sim("--zero-delay") for _ in range(3)]
    router = cluster.router(*sims, flags=("--policy", "session"))
    used = set()
    for i in range(20):
        hdr = {"x-session-id": f"shopper-{i}"}
        first = chat(router, image_chat(MODEL, png_data_url()), hdr).headers["x-qvl-replica"]
        assert all(
            chat(router, image_chat(MODEL, png_data_url()), hdr).headers["x-qvl-replica"] == first for _ in range(2)
        )
        used.add(first)
    assert len(used) >= 2


def test_image_affinity_same_image_same_replica(cluster: Cluster) -> None:
    sims = [cluster.sim("--zero-delay") for _ in range(3)]
    router = cluster.router(*sims, flags=("--policy", "image-affinity"))
    homes = {}
    for i in range(12):
        url = png_data_url((i * 20, 255 - i * 20, 7))
        got = {chat(router, image_chat(MODEL, url)).headers["x-qvl-replica"] for _ in range(4)}
        assert len(got) == 1, f"image {i} went to {got}"
        homes[i] = got.pop()
    assert len(set(homes.values())) >= 2
    # The replicas' own multimodal caches see the effect: repeated images are hits.
    hits = sum(engine_gauge(s, "vllm:mm_cache_hits_total") for s in sims)
    queries = sum(engine_gauge(s, "vllm:mm_cache_queries_total") for s in sims)
    assert queries == 48 and hits == 36


def test_image_affinity_hot_image_spills_past_the_load_bound(cluster: Cluster) -> None:
    slow = ("--prefill-base-ms", "380", "--step-base-ms", "20", "--output-tokens", "5")
    sims = [cluster.sim(*slow) for _ in range(2)]
    router = cluster.router(*sims, flags=("--policy", "image-affinity", "--load-factor", "1.25"))
    hot = png_data_url((1, 2, 3))
    home = chat(router, image_chat(MODEL, hot)).headers["x-qvl-replica"]
    results = asyncio.run(fire(router, [image_chat(MODEL, hot)] * 8, concurrency=8))
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results)
    counts = collections.Counter(r.headers["x-qvl-replica"] for r in results)  # type: ignore[union-attr]
    assert len(counts) == 2, counts
    assert counts[home] >= counts.most_common()[-1][1]
    assert counts[home] <= math.ceil(1.25 * 8 / 2)


def test_least_loaded_sends_fewer_requests_to_a_slow_replica(cluster: Cluster) -> None:
    fast = cluster.sim("--prefill-base-ms", "4", "--step-base-ms", "1", "--output-tokens", "4")
    slow = cluster.sim("--prefill-base-ms", "160", "--step-base-ms", "40", "--output-tokens", "4")
    router = cluster.router(fast, slow, flags=("--policy", "least-loaded"))
    docs = [image_chat(MODEL, png_data_url((i % 250, 0, 0))) for i in range(80)]
    results = asyncio.run(fire(router, docs, concurrency=8))
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in results)
    counts = collections.Counter(r.headers["x-qvl-replica"] for r in results)  # type: ignore[union-attr]
    assert counts[f"127.0.0.1:{slow.port}"] < 0.3 * len(docs), counts


def test_killing_a_replica_mid_run_loses_no_request(cluster: Cluster) -> None:
    sims = [cluster.sim("--prefill-base-ms", "5", "--step-base-ms", "5", "--output-tokens", "8") for _ in range(3)]
    router = cluster.router(*sims, flags=("--policy", "round-robin"))
    docs = [image_chat(MODEL, png_data_url((i % 200, 9, 9))) for i in range(300)]

    victim = f"127.0.0.1:{sims[1].port}"

    async def run() -> list[httpx.Response | Exception]:
        task = asyncio.create_task(fire(router, docs, concurrency=16))
        # Killed once it has answered a few (not after a fixed time, which a slow machine may not fill).
        while not task.done():
            if await asyncio.to_thread(metric_sum, router.url, "qvl_requests_total", replica=victim) >= 3:
                break
            await asyncio.sleep(0.02)
        sims[1].kill()
        return await task

    results = asyncio.run(run())
    failed = [r for r in results if not (isinstance(r, httpx.Response) and r.status_code == 200)]
    assert failed == []
    answered_by = collections.Counter(r.headers["x-qvl-replica"] for r in results)  # type: ignore[union-attr]
    assert answered_by[f"127.0.0.1:{sims[1].port}"] > 0  # it did take traffic before it died
    wait_for(lambda: replica_state(router)[sims[1].url]["healthy"] is False, timeout=10)
    dead = f"127.0.0.1:{sims[1].port}"
    assert metric_sum(router.url, "qvl_upstream_errors_total", replica=dead) > 0
    assert metric_sum(router.url, "qvl_retries_total", model=MODEL) > 0
    assert metric_sum(router.url, "qvl_replica_healthy", replica=dead, model=MODEL) == 0
    assert metric_sum(router.url, "qvl_requests_total", status="200") == 300


def test_a_stream_cut_by_replica_death_ends_with_an_error_event(cluster: Cluster) -> None:
    sim = cluster.sim("--step-base-ms", "100", "--output-tokens", "100")
    router = cluster.router(sim)
    events: list[str] = []
    started = time.monotonic()
    doc = image_chat(MODEL, png_data_url(), stream=True)
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=doc, timeout=20) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    sim.kill()
    assert time.monotonic() - started < 15
    assert events[-1] == "[DONE]"
    assert '"type":"stream_interrupted"' in events[-2]
    assert len(events) < 50
    # Counted as the failure it was, though the HTTP status sent was 200.
    labels = {"status": "502", "error_type": "stream_interrupted", "replica": f"127.0.0.1:{sim.port}"}
    assert metric_sum(router.url, "qvl_requests_total", **labels) == 1
    assert metric_sum(router.url, "qvl_upstream_errors_total", type="stream_interrupted") == 1
    assert metric_sum(router.url, "qvl_time_to_first_token_seconds_count") == 0


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_upstream_request(cluster: Cluster, stream: bool) -> None:
    sim = cluster.sim("--step-base-ms", "100", "--output-tokens", "200")
    router = cluster.router(sim)
    doc = image_chat(MODEL, png_data_url(), stream=stream)
    if stream:
        with httpx.stream("POST", router.url + "/v1/chat/completions", json=doc, timeout=20) as resp:
            lines = resp.iter_lines()  # held: a dropped generator would close the response early
            assert next(lines).startswith("data: ")
            assert engine_gauge(sim, "vllm:num_requests_running") == 1
    else:
        with pytest.raises(httpx.ReadTimeout):
            chat_timeout = httpx.Timeout(5, read=0.5)
            httpx.post(router.url + "/v1/chat/completions", json=doc, timeout=chat_timeout)
    # 200 tokens at 100 ms would take 20 s; the engine drops the request as soon as the client leaves.
    wait_for(lambda: engine_gauge(sim, "vllm:num_requests_running") == 0, timeout=5)
    wait_for(lambda: replica_state(router)[sim.url]["in_flight"] == 0, timeout=5)


def test_ejection_and_readmission_follow_health(cluster: Cluster) -> None:
    a, b = cluster.sim("--zero-delay"), cluster.sim("--zero-delay")
    router = cluster.router(a, b)
    port = b.port
    b.kill()
    wait_for(lambda: replica_state(router)[b.url]["healthy"] is False, timeout=10)
    for _ in range(5):
        assert chat(router, image_chat(MODEL, png_data_url())).headers["x-qvl-replica"].endswith(f":{a.port}")
    cluster.sim("--zero-delay", port=port)
    wait_for(lambda: replica_state(router)[b.url]["healthy"] is True, timeout=10)
    a.kill()
    wait_for(lambda: httpx.get(router.url + "/ready", timeout=5).status_code == 200, timeout=10)
    b_alive = cluster.procs[-1]
    b_alive.kill()
    wait_for(lambda: httpx.get(router.url + "/ready", timeout=5).status_code == 503, timeout=10)
    down = chat(router, image_chat(MODEL, png_data_url()))
    assert down.status_code == 503 and down.json()["error"]["type"] == "no_healthy_replica"


def test_every_attempt_failing_is_a_502_that_leaks_no_internals(cluster: Cluster) -> None:
    sims = [cluster.sim("--zero-delay") for _ in range(2)]
    router = cluster.router(*sims)
    for sim in sims:
        sim.kill()
    # Immediately: both replicas are still admitted (ejection needs two failures), so both are tried.
    resp = chat(router, image_chat(MODEL, png_data_url()))
    assert resp.status_code == 502
    error = resp.json()["error"]
    assert error["type"] == "upstream_unavailable"
    assert error["message"] == "no replica could answer after 2 attempt(s); the request was not processed"
    assert "127.0.0.1" not in resp.text
    for sim in sims:
        assert metric_sum(router.url, "qvl_upstream_errors_total", replica=f"127.0.0.1:{sim.port}", type="connect") == 1
    assert metric_sum(router.url, "qvl_retries_total", model=MODEL) == 1
    labels = {"error_type": "upstream_unavailable", "model": MODEL, "replica": "none", "status": "502"}
    assert metric_sum(router.url, "qvl_requests_total", cache="bypass", **labels) == 1
    assert metric_sum(router.url, "qvl_rejections_total") == 0  # every replica was tried: not a refusal


def test_router_from_a_config_file(cluster: Cluster, tmp_path) -> None:
    sims = [cluster.sim("--zero-delay") for _ in range(2)]
    config = tmp_path / "qvl.yaml"
    config.write_text("router:\n  policy: round-robin\n  replicas:\n" + "".join(f"    - {s.url}\n" for s in sims))
    router = cluster.start("router", "--config", str(config), ready_path="/ready")
    state = httpx.get(router.url + "/v1/cluster", timeout=5).json()
    assert state["policy"] == "round-robin"
    assert [r["url"] for r in state["replicas"]] == [s.url for s in sims]
