"""Real vLLM replicas (the tiny Qwen3-VL on the CPU) run priority scheduling and answer every class's
priority. (The order in which a loaded replica serves the classes is shown on the simulator, which orders
its queue as vLLM's priority scheduler does: tests/serving/test_sim_priority.py. A test of that order on
a real CPU replica, counting vllm:num_requests_waiting exactly, did not hold on a loaded 2-core machine. Under fcfs
vLLM 0.32 takes the same priorities and ignores them, which the simulator copies; no fcfs replica is started
here: it would add a minute of start-up to every run.)

The session's `vllm_pair` (tests/support/vllm.py) is started by the same command builder as `qvl up`.
"""

from __future__ import annotations

import httpx
import psutil
import pytest
from support.vllm import VllmPair

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
