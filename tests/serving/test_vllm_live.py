"""Real vLLM replicas on the CPU (the tiny Qwen3-VL), behind the router, driven by the openai client.

Two replicas are started once for the session (`vllm_pair`, tests/support/vllm.py); every test starts
its own router in front of them.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import signal
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from PIL import Image
from support.chat import image_chat, png_data_url
from support.servers import Cluster, Proc
from support.vllm import STARTUP_S, VllmPair

from qvl.procs import StartError, free_port, spawn
from qvl.settings import ReplicaSettings
from serving.tiny_model import SERVED_NAME
from serving.vllm_replica import core_list, detect_cpus, launch, plan_replicas

pytestmark = pytest.mark.vllm
MODEL = SERVED_NAME


def one_vllm_replica(model: Path, run_dir: Path) -> list[str]:
    """`qvl up` arguments for one vLLM replica of `model` with its files under `run_dir`."""
    return ["up", "--engine", "vllm", "--replicas", "1", "--model", str(model), "--run-dir", str(run_dir), "--no-auth"]


def router_for(cluster: Cluster, pair: VllmPair, policy: str) -> Proc:
    args = ["router", "--policy", policy]
    for replica in pair.replicas:
        args += ["--replica", replica.url]
    return cluster.start(*args, ready_path="/ready")


def client(router: Proc) -> openai.OpenAI:
    """Use as `with client(router) as c:` so its connections are closed, not left to the collector."""
    return openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(router: Proc, image_url: str, **extra: object) -> httpx.Response:
    doc = image_chat(MODEL, image_url, text="What product is this?", temperature=0, max_tokens=12, **extra)
    return httpx.post(router.url + "/v1/chat/completions", json=doc, timeout=120)


def noisy_png() -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.effect_noise((128, 96), 120).convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_openai_client_image_question_streamed_and_not(cluster: Cluster, vllm_pair: VllmPair) -> None:
    router = router_for(cluster, vllm_pair, "least-loaded")
    messages = image_chat(MODEL, png_data_url((200, 30, 30), (128, 96)), text="What product is this?")["messages"]
    with client(router) as c:
        answer = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        text = answer.choices[0].message.content
        assert text and answer.usage is not None and answer.usage.completion_tokens == 12
        assert answer.usage.prompt_tokens > 12  # the image's tokens are in the prompt
        chunks = streamed_chunks(c, messages)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def streamed_chunks(c: openai.OpenAI, messages: list) -> list:
    stream = c.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    return list(stream)


def test_each_replica_computes_on_its_own_cores(vllm_pair: VllmPair) -> None:
    first, second = (set(plan.cpus) for plan in vllm_pair.plans)
    assert first and second and not first & second
    for plan, replica in zip(vllm_pair.plans, vllm_pair.replicas, strict=True):
        assert plan.env["VLLM_CPU_OMP_THREADS_BIND"] == core_list(plan.cpus)
        workers = [p for p in psutil.Process(replica.pid).children(recursive=True) if p.name() == "VLLM::Worker"]
        assert len(workers) == 1, workers
        # vLLM pins every thread of its engine worker (the one that runs the model) to the replica's cores.
        pinned = {cores for t in workers[0].threads() if (cores := thread_cores(t.id))}
        assert pinned == {plan.cpus}, pinned
        assert f"core ids={list(plan.cpus)}" in (plan.workdir / "vllm.log").read_text()


def thread_cores(tid: int) -> tuple[int, ...]:
    """The cores a thread may run on; () when it has ended meanwhile."""
    try:
        return tuple(sorted(os.sched_getaffinity(tid)))
    except ProcessLookupError:
        return ()


def test_greedy_output_is_the_same_across_requests_and_replicas(cluster: Cluster, vllm_pair: VllmPair) -> None:
    router = router_for(cluster, vllm_pair, "round-robin")
    image = png_data_url((20, 120, 220), (128, 96))
    answers = [ask(router, image) for _ in range(4)]
    assert {r.status_code for r in answers} == {200}
    assert len({r.headers["x-qvl-replica"] for r in answers}) == 2
    assert len({r.json()["choices"][0]["message"]["content"] for r in answers}) == 1


def test_different_images_give_different_answers(cluster: Cluster, vllm_pair: VllmPair) -> None:
    router = router_for(cluster, vllm_pair, "image-affinity")
    red = ask(router, png_data_url((220, 20, 20), (128, 96))).json()["choices"][0]["message"]["content"]
    noise = ask(router, noisy_png()).json()["choices"][0]["message"]["content"]
    assert red != noise


def test_least_loaded_reads_the_real_vllm_queue(
    cluster: Cluster, vllm_pair: VllmPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QVL_ROUTER__LOAD_SCRAPE_INTERVAL_S", "0.2")
    router = router_for(cluster, vllm_pair, "least-loaded")
    # 32 requests of exactly 256 tokens (ignore_eos) on 2 replicas batching 4 each: the queue lasts
    # seconds, not the few milliseconds a burst of short answers from the tiny model would.
    docs = [
        image_chat(MODEL, png_data_url((i * 7, 80, 80), (128, 96)), temperature=0, max_tokens=256, ignore_eos=True)
        for i in range(32)
    ]
    seen_waiting: list[float] = []

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=router.url, timeout=300) as http:

            async def watch() -> None:
                while True:
                    state = (await http.get("/v1/cluster")).json()
                    seen_waiting.append(max(r["engine_waiting"] for r in state["replicas"]))
                    await asyncio.sleep(0.1)

            watcher = asyncio.create_task(watch())
            responses = await asyncio.gather(*(http.post("/v1/chat/completions", json=d) for d in docs))
            watcher.cancel()
            return [r.status_code for r in responses]

    assert asyncio.run(run()) == [200] * 32
    # vLLM queued requests, and the router saw it in the replicas' /metrics.
    assert max(seen_waiting) > 0
    text = httpx.get(router.url + "/metrics", timeout=10).text
    assert re.search(r"^qvl_replica_engine_waiting\{replica=\"127\.0\.0\.1:\d+\"\} ", text, re.M)


def test_a_killed_replica_is_ejected_and_requests_finish_on_the_other(cluster: Cluster, vllm_pair: VllmPair) -> None:
    router = router_for(cluster, vllm_pair, "round-robin")
    victim = vllm_pair.replicas[1]
    docs = [
        image_chat(MODEL, png_data_url((i * 9, 40, 200), (96, 96)), temperature=0, max_tokens=24) for i in range(24)
    ]

    async def run() -> list[httpx.Response | Exception]:
        async with httpx.AsyncClient(base_url=router.url, timeout=300) as http:

            async def one(doc: dict) -> httpx.Response | Exception:
                try:
                    return await http.post("/v1/chat/completions", json=doc)
                except httpx.HTTPError as exc:
                    return exc

            tasks = [asyncio.create_task(one(d)) for d in docs]
            await asyncio.sleep(1.0)
            victim.kill()
            return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(run())
        failed = [r for r in results if not (isinstance(r, httpx.Response) and r.status_code == 200)]
        assert failed == []
        answered = collections.Counter(r.headers["x-qvl-replica"] for r in results)  # type: ignore[union-attr]
        survivor = vllm_pair.replicas[0].url.removeprefix("http://")
        assert answered[survivor] >= 12
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            state = {r["url"]: r["healthy"] for r in httpx.get(router.url + "/v1/cluster").json()["replicas"]}
            if state[victim.url] is False:
                break
            time.sleep(0.2)
        assert state[victim.url] is False
    finally:
        vllm_pair.restart(1)  # later tests get both replicas back


def test_qvl_up_with_vllm_answers_through_the_router(
    cluster: Cluster, vllm_pair: VllmPair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter_port = free_port()
    monkeypatch.setenv("QVL_GPU_EXPORTER__PORT", str(exporter_port))
    up = cluster.start(
        *one_vllm_replica(vllm_pair.model, tmp_path),
        ready_path="/ready",
        timeout=STARTUP_S,
    )
    with client(up) as c:
        models = [m.id for m in c.models.list().data]
        assert models == [vllm_pair.model.name]
        reply = c.chat.completions.create(
            model=models[0],
            max_tokens=6,
            temperature=0,
            messages=image_chat("x", png_data_url())["messages"],
        )
    assert reply.choices[0].message.content
    # Its only replica is bound to every core `qvl up` may use (another launcher's replicas may share them).
    assert "replica-" in up.output() and f"vLLM on CPU cores {core_list(detect_cpus())}" in up.output()
    # The host's GPU exporter runs beside the replica; without NVML (a CPU machine) it says up 0.
    gpu_metrics = f"http://127.0.0.1:{exporter_port}/metrics"
    assert f"GPU exporter at {gpu_metrics}" in up.output()
    up_value = 1 if shutil.which("nvidia-smi") else 0
    text = httpx.get(gpu_metrics, timeout=5).text
    assert re.search(rf'^qvl_gpu_exporter_up{{host="[^"]+"}} {up_value}\.0$', text, re.M), text


def test_a_replica_that_cannot_start_fails_with_its_log(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    spec = ReplicaSettings(device="cpu", run_dir=str(tmp_path))
    (plan,) = plan_replicas(spec, str(empty), [free_port()], [], tmp_path, os.environ)
    replica = launch(plan, "127.0.0.1")
    with pytest.raises(StartError) as info:
        replica.wait_ready(STARTUP_S)
    message = str(info.value)
    assert message.startswith(f"{plan.name} exited with status")
    assert str(plan.workdir / "vllm.log") in message
    assert len(message.splitlines()) > 3  # the log's tail follows


def test_sigint_while_vllm_starts_stops_everything(cluster: Cluster, vllm_pair: VllmPair, tmp_path: Path) -> None:
    import subprocess
    import sys

    exporter_port = free_port()
    argv = [
        sys.executable,
        "-m",
        "qvl",
        *one_vllm_replica(vllm_pair.model, tmp_path),
        "--port",
        str(free_port()),
        "--gpu-exporter-port",
        str(exporter_port),
    ]
    up = spawn("qvl up", argv, log=tmp_path / "up.log", env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # Until the replica process exists.
        up.wait_ready(120, check=lambda: "vLLM on CPU cores" in up.output(), interval_s=0.1)
        time.sleep(2)
        up.popen.send_signal(signal.SIGINT)  # the launcher alone, as a terminal's ^C would reach it
        up.popen.wait(60)
    finally:
        if up.poll() is None:
            up.kill()
    out = up.output()
    match = re.search(r"on ports (\d+)", out)
    port = match.group(1) if match else ""
    assert up.poll() == 1
    assert "start-up interrupted" in out and "stopped 1 replica(s) and the GPU exporter" in out
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{exporter_port}/metrics", timeout=2)
    assert port
    pattern = f"vllm.entrypoints.openai.api_server.*--port {port}"
    leftovers = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    assert leftovers == []
