"""The answer cache through real routers, simulated replicas and a real redis-server."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import time

import httpx
import pytest
from support.chat import image_chat, png_data_url
from support.metrics import metric_sum
from support.polling import wait_for
from support.servers import Cluster, Proc

MODEL = "qwen3-vl-sim"


def question(color: tuple[int, int, int] = (200, 30, 30), **extra: object) -> dict:
    return image_chat(MODEL, png_data_url(color), text="What colour is this mug?", temperature=0, **extra)


def post(router: Proc, doc: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(router.url + "/v1/chat/completions", json=doc, headers=headers, timeout=60)


def upstream_calls(*sims: Proc) -> float:
    """Requests the replicas themselves finished, from their own vLLM metrics."""
    total = 0.0
    for sim in sims:
        text = httpx.get(sim.url + "/metrics", timeout=5).text
        total += sum(float(v) for v in re.findall(r"^vllm:request_success_total\{[^}]*\} (\S+)$", text, re.M))
    return total


def cache_metric(router: Proc, result: str) -> float:
    text = httpx.get(router.url + "/metrics", timeout=5).text
    match = re.search(rf'^qvl_cache_requests_total\{{result="{result}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def sse_content(text: str) -> tuple[str, dict | None]:
    content, usage = "", None
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            for choice in event.get("choices", []):
                content += choice["delta"].get("content") or ""
            usage = event.get("usage") or usage
    return content, usage


def test_miss_then_hit_in_memory_and_a_hit_replays_as_a_stream(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    router = cluster.router(sim)
    first = post(router, question())
    assert first.headers["x-qvl-cache"] == "miss"
    second = post(router, question())
    assert second.headers["x-qvl-cache"] == "hit" and second.headers["x-qvl-replica"] == "cache"
    assert second.json() == first.json()
    streamed = post(router, question(stream=True, stream_options={"include_usage": True}))
    assert streamed.headers["x-qvl-cache"] == "hit"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    content, usage = sse_content(streamed.text)
    assert content == first.json()["choices"][0]["message"]["content"]
    assert usage == first.json()["usage"]
    assert streamed.text.endswith("data: [DONE]\n\n")
    assert upstream_calls(sim) == 1


def test_only_deterministic_requests_are_cached(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    router = cluster.router(sim)
    sampled = image_chat(MODEL, png_data_url(), text="Describe it")  # no temperature: the model samples
    assert [post(router, sampled).headers["x-qvl-cache"] for _ in range(2)] == ["bypass", "bypass"]
    seeded = image_chat(MODEL, png_data_url(), text="Describe it", temperature=0.8, seed=7)
    assert [post(router, seeded).headers["x-qvl-cache"] for _ in range(2)] == ["miss", "hit"]
    assert upstream_calls(sim) == 3


def test_cache_control_no_cache_and_no_store(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    router = cluster.router(sim)
    doc = question((1, 2, 3))
    assert post(router, doc).headers["x-qvl-cache"] == "miss"
    assert post(router, doc, {"cache-control": "no-cache"}).headers["x-qvl-cache"] == "miss"  # fresh, stored
    assert post(router, doc).headers["x-qvl-cache"] == "hit"
    other = question((4, 5, 6))
    assert post(router, other, {"Cache-Control": "no-store"}).headers["x-qvl-cache"] == "miss"
    assert post(router, other).headers["x-qvl-cache"] == "miss"  # the no-store answer was not kept
    assert upstream_calls(sim) == 4


def test_a_streamed_miss_is_recorded_and_stored(cluster: Cluster) -> None:
    sim = cluster.sim("--step-base-ms", "5")
    router = cluster.router(sim)
    with_usage = {"stream": True, "stream_options": {"include_usage": True}}
    streamed = post(router, question((9, 9, 9), **with_usage))
    assert streamed.headers["x-qvl-cache"] == "miss"
    content, usage = sse_content(streamed.text)
    replayed = post(router, question((9, 9, 9)))
    assert replayed.headers["x-qvl-cache"] == "hit"
    assert replayed.json()["choices"][0]["message"]["content"] == content
    assert replayed.json()["usage"] == usage
    # Without include_usage the stream cannot become a complete non-streamed answer: not stored.
    assert post(router, question((8, 8, 8), stream=True)).headers["x-qvl-cache"] == "miss"
    assert post(router, question((8, 8, 8))).headers["x-qvl-cache"] == "miss"
    assert upstream_calls(sim) == 3


def test_entries_expire_after_the_ttl(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QVL_CACHE__TTL_S", "1")
    sim = cluster.sim("--zero-delay")
    router = cluster.router(sim)
    assert [post(router, question()).headers["x-qvl-cache"] for _ in range(2)] == ["miss", "hit"]
    time.sleep(1.3)
    assert post(router, question()).headers["x-qvl-cache"] == "miss"


def test_two_routers_share_redis(cluster: Cluster, redis_server) -> None:
    sim = cluster.sim("--zero-delay")
    a = cluster.router(sim, flags=("--cache", redis_server.url))
    b = cluster.router(sim, flags=("--cache", redis_server.url))
    assert post(a, question((7, 7, 7))).headers["x-qvl-cache"] == "miss"
    hit = post(b, question((7, 7, 7)))
    assert hit.headers["x-qvl-cache"] == "hit"
    assert upstream_calls(sim) == 1


def test_fifty_identical_concurrent_requests_through_two_routers_cost_one_upstream_call(
    cluster: Cluster, redis_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This test is about single-flight: 25 connections opening at once on a loaded 2-core machine can
    # take longer than the 20 ms default and be (correctly) bypassed, which is another test's subject.
    monkeypatch.setenv("QVL_CACHE__REDIS_TIMEOUT_S", "0.5")
    sims = [cluster.sim("--prefill-base-ms", "590", "--step-base-ms", "10") for _ in range(2)]
    routers = [cluster.router(*sims, flags=("--cache", redis_server.url)) for _ in range(2)]
    doc = question((42, 42, 42))

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(
                *(http.post(routers[i % 2].url + "/v1/chat/completions", json=doc) for i in range(50))
            )

    responses = asyncio.run(run())
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1
    results = collections.Counter(r.headers["x-qvl-cache"] for r in responses)
    assert results["miss"] == 1 and results["coalesced"] + results["hit"] == 49, results
    assert upstream_calls(*sims) == 1


def test_a_dead_leader_holds_other_routers_only_until_its_lock_expires(
    cluster: Cluster, redis_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QVL_CACHE__LOCK_TTL_S", "2")
    sim = cluster.sim("--prefill-base-ms", "5000")
    leader = cluster.router(sim, flags=("--cache", redis_server.url))
    follower = cluster.router(sim, flags=("--cache", redis_server.url))
    doc = question((5, 6, 7), max_tokens=2)

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(timeout=60) as http:
            lead = asyncio.create_task(http.post(leader.url + "/v1/chat/completions", json=doc))
            await asyncio.sleep(0.5)  # the leader holds the lock and waits on the slow replica
            follow = asyncio.create_task(http.post(follower.url + "/v1/chat/completions", json=doc))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(leader.kill)  # the leader dies without publishing
            lead.cancel()
            await asyncio.gather(lead, return_exceptions=True)
            return await follow

    started = time.monotonic()
    answer = asyncio.run(run())
    assert answer.status_code == 200
    assert answer.headers["x-qvl-cache"] == "miss"  # went upstream itself once the lock expired
    assert time.monotonic() - started < 15


def test_redis_dying_mid_run_fails_no_request_and_hits_resume(cluster: Cluster, redis_server) -> None:
    sim = cluster.sim("--prefill-base-ms", "4", "--step-base-ms", "1")
    router = cluster.router(sim, flags=("--cache", redis_server.url))
    docs = [question((i, 0, 0)) for i in range(30)]

    async def run() -> list[httpx.Response | Exception]:
        """8 workers for 3 s (at most 3,000 requests), Redis killed 1 s in."""
        results: list[httpx.Response | Exception] = []
        deadline = time.monotonic() + 3.0
        async with httpx.AsyncClient(timeout=60) as http:

            async def worker(offset: int) -> None:
                i = offset
                while time.monotonic() < deadline and len(results) < 3000:
                    try:
                        results.append(await http.post(router.url + "/v1/chat/completions", json=docs[i % 30]))
                    except httpx.HTTPError as exc:
                        results.append(exc)
                    i += 1

            async def killer() -> None:
                await asyncio.sleep(1.0)
                await asyncio.to_thread(redis_server.kill)

            await asyncio.gather(killer(), *(worker(w) for w in range(8)))
        return results

    results = asyncio.run(run())
    assert len(results) > 50
    assert [r for r in results if not (isinstance(r, httpx.Response) and r.status_code == 200)] == []
    assert cache_metric(router, "hit") > 0 and cache_metric(router, "error") > 0
    # The health ping (every router.health.interval_s = 1 s) sees Redis gone, then back.
    wait_for(lambda: metric_sum(router.url, "qvl_cache_store_up", store="redis") == 0, timeout=10)
    redis_server.restart()
    wait_for(lambda: metric_sum(router.url, "qvl_cache_store_up", store="redis") == 1, timeout=10)
    fresh = question((99, 99, 99))
    deadline = time.monotonic() + 10
    while post(router, fresh).headers["x-qvl-cache"] != "hit" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert post(router, fresh).headers["x-qvl-cache"] == "hit"
