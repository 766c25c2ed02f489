"""Real vLLM replicas (the tiny Qwen3-VL on the CPU) run priority scheduling: they answer every class's
priority, and a later interactive request is served before batch requests that waited longer. (Under fcfs
vLLM 0.32 takes the same priorities and ignores them, which the simulator copies; no fcfs replica is started
here: it would add a minute of start-up to every run.)

The session's `vllm_pair` (tests/support/vllm.py) is started by the same command builder as `qvl up`.
"""

from __future__ import annotations

import asyncio

import httpx
import psutil
import pytest
from support.metrics import metric_sum
from support.polling import wait_for
from support.vllm import MAX_NUM_SEQS, VllmPair

from qvl.procs import Child
from serving.tiny_model import SERVED_NAME

pytestmark = pytest.mark.vllm
MODEL = SERVED_NAME
INTERACTIVE, FLEX, BATCH = 0, 5, 10
"""The priorities the router forwards for its classes."""


def chat(priority: int | None = None, max_tokens: int = 16, stream: bool = False) -> dict:
    doc: dict = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Describe this product."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,  # exactly max_tokens tokens: the tiny model would stop at random
        "temperature": 0,
        "stream": stream,
    }
    if priority is not None:
        doc["priority"] = priority
    return doc


def running_policy(replica: Child) -> str:
    cmdline = psutil.Process(replica.pid).cmdline()
    return cmdline[cmdline.index("--scheduling-policy") + 1]


def test_replicas_run_priority_scheduling_and_answer_every_class(vllm_pair: VllmPair) -> None:
    assert [running_policy(replica) for replica in vllm_pair.replicas] == ["priority", "priority"]
    url = vllm_pair.replicas[0].url + "/v1/chat/completions"
    for value in (INTERACTIVE, FLEX, BATCH):
        response = httpx.post(url, json=chat(value), timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 16


async def finishing_order(url: str, queued: list[dict]) -> list[int]:
    """Fill every slot of the replica at `url` with streams that last until cancelled, queue `queued` one
    by one, then cancel the streams: the indexes of `queued` in the order their answers came back."""

    def load(name: str) -> float:
        return metric_sum(url, f"vllm:num_requests_{name}", model_name=MODEL)

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:

        async def hold() -> None:
            async with http.stream("POST", "/v1/chat/completions", json=chat(max_tokens=2000, stream=True)) as r:
                async for _ in r.aiter_bytes():
                    pass

        blockers = [asyncio.create_task(hold()) for _ in range(MAX_NUM_SEQS)]
        await asyncio.to_thread(wait_for, lambda: load("running") == MAX_NUM_SEQS, 60)
        done: list[int] = []

        async def post(index: int, doc: dict) -> None:
            response = await http.post("/v1/chat/completions", json=doc)
            assert response.status_code == 200, response.text
            done.append(index)

        tasks = []
        for index, doc in enumerate(queued):
            tasks.append(asyncio.create_task(post(index, doc)))
            # One at a time, so that arrival order is the order of `queued`.
            await asyncio.to_thread(wait_for, lambda n=index + 1: load("waiting") == n, 60)
        assert load("running") == MAX_NUM_SEQS  # the blockers still hold every slot
        for blocker in blockers:
            blocker.cancel()  # the disconnect makes vLLM abort them
        await asyncio.gather(*tasks)
        await asyncio.gather(*blockers, return_exceptions=True)
        return done


def batch_then_interactive() -> list[dict]:
    """One more batch request than there are slots, then an interactive one."""
    return [*(chat(BATCH, max_tokens=32) for _ in range(MAX_NUM_SEQS)), chat(INTERACTIVE, max_tokens=32)]


def test_a_later_interactive_request_is_served_before_waiting_batch_ones(vllm_pair: VllmPair) -> None:
    order = asyncio.run(finishing_order(vllm_pair.replicas[0].url, batch_then_interactive()))
    # The interactive request takes one of the freed slots; a batch one waits for a slot to free again.
    assert sorted(order) == list(range(MAX_NUM_SEQS + 1))
    assert order[-1] != MAX_NUM_SEQS, order
