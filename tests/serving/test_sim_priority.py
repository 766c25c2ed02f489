"""Priority scheduling in the simulated engine, as vLLM 0.32's `--scheduling-policy` does it.

The engine core's queue (priority: the lowest `priority` first, arrival order among equals; fcfs: arrival
order, priorities ignored; never a preemption), the request's `priority` field and `X-Vllm-Priority`
header, and a real `qvl sim` serving a later priority-0 request before waiting priority-10 ones.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import orjson
import pytest
from support.chat import image_chat, png_data_url
from support.metrics import metric_sum
from support.polling import wait_for
from support.servers import Cluster, Proc

from qvl.cli import parse_command
from qvl.images import ImageTokenCounter
from qvl.settings.serving import SchedulingPolicy
from serving.sim.core import CoreImage, CoreRequest, EngineCore, StepCosts
from serving.sim.openai_api import BadRequest, parse_chat

MODEL = "qwen3-vl-sim"
COSTS = StepCosts(0.010, 0.001, 0.002, 0.020, 0.0005, 0.0001, 0.75)
INTERACTIVE, FLEX, BATCH = 0, 5, 10
"""The priorities the router forwards for its classes."""


def core(policy: SchedulingPolicy, max_running: int = 1) -> EngineCore:
    return EngineCore(COSTS, max_running, 100_000, 16, policy)


def request(priority: int, output: int = 2) -> CoreRequest:
    return CoreRequest(10, (), output, priority=priority)


def run_step(engine: EngineCore) -> list[CoreRequest]:
    """Plan and finish one step; the requests it admitted."""
    assert engine.plan() is not None
    admitted = list(engine.admitting)
    engine.finish()
    return admitted


def admission_order(engine: EngineCore) -> list[CoreRequest]:
    """Step until the engine is idle; every request admitted meanwhile, in order."""
    order: list[CoreRequest] = []
    while not engine.idle:
        order += run_step(engine)
    return order


def queue_behind_a_running_batch_request(engine: EngineCore) -> tuple[list[CoreRequest], CoreRequest, CoreRequest]:
    """One batch request runs (max_running 1); then three batch requests, an interactive and a flex one
    arrive, in that order, and wait."""
    running = request(BATCH, output=3)
    engine.add(running)
    assert run_step(engine) == [running]
    batch = [request(BATCH) for _ in range(3)]
    interactive, flex = request(INTERACTIVE), request(FLEX)
    for waiting in (*batch, interactive, flex):
        engine.add(waiting)
    return batch, interactive, flex


def test_priority_policy_admits_a_later_priority_0_request_before_waiting_priority_10_ones() -> None:
    engine = core("priority")
    batch, interactive, flex = queue_behind_a_running_batch_request(engine)
    assert admission_order(engine) == [interactive, flex, *batch]


def test_fcfs_admits_in_arrival_order_whatever_the_priority() -> None:
    engine = core("fcfs")
    batch, interactive, flex = queue_behind_a_running_batch_request(engine)
    assert admission_order(engine) == [*batch, interactive, flex]


def test_a_waiting_priority_0_request_never_preempts_a_running_one() -> None:
    # vLLM preempts only when a running request cannot get KV blocks, which the simulator never runs out of.
    engine = core("priority")
    running = request(BATCH, output=5)
    engine.add(running)
    run_step(engine)
    interactive = request(INTERACTIVE)
    engine.add(interactive)
    finished: list[CoreRequest] = []
    while not interactive.admitted:
        engine.plan()
        finished += engine.finish().finished
    assert finished == [running]
    assert interactive.first_step == running.first_step + running.output_tokens


def test_an_aborted_waiting_request_gives_up_its_place() -> None:
    engine = core("priority")
    engine.add(request(BATCH))
    run_step(engine)
    interactive, batch = request(INTERACTIVE), request(BATCH)
    engine.add(batch)
    engine.add(interactive)
    engine.abort(interactive)
    assert engine.waiting == 1
    assert admission_order(engine) == [batch]


def test_priority_0_traffic_runs_step_for_step_as_under_fcfs() -> None:
    """What keeps the capacity planner's predictions (all priority 0) valid for replicas running `priority`."""
    traces = {}
    policies: tuple[SchedulingPolicy, ...] = ("fcfs", "priority")
    for policy in policies:
        rng = random.Random(17)
        engine = EngineCore(COSTS, 4, 300, 8, policy)
        pending = [
            CoreRequest(
                rng.randint(1, 200),
                tuple(CoreImage(bytes([rng.randint(0, 9)]), 50) for _ in range(rng.randint(0, 2))),
                rng.randint(1, 6),
            )
            for _ in range(80)
        ]
        ids = {id(r): i for i, r in enumerate(pending)}
        live: list[CoreRequest] = []
        trace: list[object] = []
        while pending or not engine.idle:
            for _ in range(rng.randint(0, 3)):
                if pending:
                    live.append(pending.pop(0))
                    engine.add(live[-1])
            if live and rng.random() < 0.1:
                engine.abort(live[rng.randrange(len(live))])
            duration = engine.plan()
            if duration is None:
                continue
            trace.append((duration, [ids[id(r)] for r in engine.admitting]))
            trace.append([ids[id(r)] for r in engine.finish().finished])
        traces[policy] = trace
    assert traces["fcfs"] == traces["priority"]
    assert len(traces["fcfs"]) > 40


COUNTER = ImageTokenCounter(min_pixels=65536, max_pixels=16777216)
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Is this bag leather?"}]}


def priority(doc: dict, header: bytes | None = None) -> int:
    return parse_chat(orjson.dumps(doc), MODEL, COUNTER, priority_header=header).request.priority


def test_priority_field_as_vllm_reads_it() -> None:
    assert priority(BODY) == 0
    assert [priority({**BODY, "priority": p}) for p in (INTERACTIVE, FLEX, BATCH, -3)] == [0, 5, 10, -3]
    # vLLM's pydantic model is lax: these pass there, so they pass here.
    assert [priority({**BODY, "priority": p}) for p in (True, 5.0, " 7 ", -(2**63))] == [1, 5, 7, -(2**63)]


@pytest.mark.parametrize("value", [1.5, None, "high", [1], 2**63])
def test_a_priority_vllm_refuses_is_a_400(value: object) -> None:
    with pytest.raises(BadRequest) as caught:
        priority({**BODY, "priority": value})
    assert caught.value.status == 400 and caught.value.param == "priority"


def test_an_integer_x_vllm_priority_header_wins_over_the_body() -> None:
    assert priority({**BODY, "priority": BATCH}, b"0") == 0
    assert priority(BODY, b" 5 ") == 5
    assert priority({**BODY, "priority": BATCH}, b"urgent") == BATCH  # not an integer: vLLM ignores it


async def serving_order(sim: Proc, queued: list[dict]) -> list[int]:
    """Hold the one slot of `sim` (max_running 1) with a long request, queue `queued` one by one, then
    free the slot: the indexes of `queued` in the order their answers came back (each one 200)."""

    def load(name: str) -> float:
        return metric_sum(sim.url, f"vllm:num_requests_{name}", model_name=MODEL)

    async with httpx.AsyncClient(base_url=sim.url, timeout=30) as http:
        # Thousands of output tokens: it holds the slot until cancelled.
        blocker = asyncio.create_task(http.post("/v1/chat/completions", json=image_chat(MODEL, png_data_url())))
        await asyncio.to_thread(wait_for, lambda: load("running") == 1, 10)
        done: list[int] = []

        async def post(index: int, doc: dict) -> None:
            response = await http.post("/v1/chat/completions", json=doc)
            assert response.status_code == 200, response.text
            done.append(index)

        tasks = []
        for index, doc in enumerate(queued):
            tasks.append(asyncio.create_task(post(index, doc)))
            # One at a time, so that arrival order is the order of `queued`.
            await asyncio.to_thread(wait_for, lambda n=index + 1: load("waiting") == n, 10)
        assert load("running") == 1
        blocker.cancel()
        await asyncio.gather(*tasks)
        with pytest.raises(asyncio.CancelledError):
            await blocker
        return done


def queued_bodies() -> list[dict]:
    """Three batch requests, then an interactive one, then a flex one."""
    return [
        image_chat(MODEL, png_data_url(), priority=value, max_tokens=2)
        for value in (BATCH, BATCH, BATCH, INTERACTIVE, FLEX)
    ]


def sim_with_one_slot(cluster: Cluster, policy: str) -> Proc:
    return cluster.sim("--max-running", "1", "--output-tokens", "5000", "--scheduling-policy", policy)


def test_sim_serves_a_later_interactive_request_before_waiting_batch_ones(cluster: Cluster) -> None:
    sim = sim_with_one_slot(cluster, "priority")
    assert asyncio.run(serving_order(sim, queued_bodies())) == [3, 4, 0, 1, 2]


def test_the_sim_runs_priority_unless_told_fcfs() -> None:
    assert parse_command(["sim"])[1].sim.scheduling_policy == "priority"
    assert parse_command(["sim", "--scheduling-policy", "fcfs"])[1].sim.scheduling_policy == "fcfs"


def test_sim_under_fcfs_accepts_priorities_and_serves_in_arrival_order(cluster: Cluster) -> None:
    # vLLM 0.32 takes a non-zero priority under fcfs (no 400) and ignores it; so does the simulator.
    sim = sim_with_one_slot(cluster, "fcfs")
    assert asyncio.run(serving_order(sim, queued_bodies())) == [0, 1, 2, 3, 4]


def test_sim_answers_each_class_priority_and_refuses_a_malformed_one(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    url = sim.url + "/v1/chat/completions"
    for value in (INTERACTIVE, FLEX, BATCH):
        assert httpx.post(url, json=image_chat(MODEL, png_data_url(), priority=value)).status_code == 200
    header = httpx.post(url, json=image_chat(MODEL, png_data_url()), headers={"x-vllm-priority": "10"})
    assert header.status_code == 200
    bad = httpx.post(url, json=image_chat(MODEL, png_data_url(), priority="high"))
    assert bad.status_code == 400
    assert bad.json() == {
        "error": {
            "message": "`priority` must be an integer in int64's range",
            "type": "BadRequestError",
            "param": "priority",
            "code": 400,
        }
    }
