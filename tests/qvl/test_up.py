"""`qvl up --engine sim` end to end, driven by the official openai client."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest
from support.chat import image_chat, png_data_url
from support.servers import Cluster


def image_messages(url: str) -> list:
    return image_chat("unused", url, text="What product is shown?")["messages"]


def test_openai_client_through_qvl_up(cluster: Cluster) -> None:
    up = cluster.start(
        "up",
        "--engine",
        "sim",
        "--replicas",
        "2",
        "--model",
        "Qwen/Qwen3-VL-4B-Instruct",
        ready_path="/ready",
    )
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="unused", max_retries=0)
    try:
        exercise(client, up.url)
    finally:
        client.close()


def exercise(client: openai.OpenAI, url: str) -> None:
    assert [m.id for m in client.models.list().data] == ["Qwen/Qwen3-VL-4B-Instruct"]

    raw = client.chat.completions.with_raw_response.create(
        model="Qwen/Qwen3-VL-4B-Instruct", messages=image_messages(png_data_url()), max_tokens=12
    )
    answer = raw.parse()
    assert raw.headers["x-qvl-replica"].startswith("127.0.0.1:")
    assert raw.headers["x-request-id"]
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens == 12
    assert answer.usage.prompt_tokens > 0

    stream = client.chat.completions.create(
        model="Qwen/Qwen3-VL-4B-Instruct",
        messages=image_messages(png_data_url((0, 90, 200))),
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)

    replicas = httpx.get(url + "/v1/cluster", timeout=5).json()["replicas"]
    assert len(replicas) == 2 and all(r["healthy"] for r in replicas)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_qvl_up_prints_ready_and_a_signal_stops_every_child(cluster: Cluster, sig: signal.Signals) -> None:
    up = cluster.start("up", "--engine", "sim", "--replicas", "2", ready_path="/ready")
    replica_urls = [r["url"] for r in httpx.get(up.url + "/v1/cluster", timeout=5).json()["replicas"]]
    assert wait_text(up, "qvl: ready at " + up.url)
    assert "GPU exporter" not in up.output()  # simulated replicas run on CPU machines: no GPU telemetry
    os.kill(up.popen.pid, sig)
    assert up.popen.wait(20) == 0
    for url in replica_urls:
        try:
            httpx.get(url + "/health", timeout=1)
        except httpx.HTTPError:
            continue
        raise AssertionError(f"{url} still answers after qvl up stopped")


def wait_text(proc, text: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.output():
            return True
        time.sleep(0.1)
    return False
