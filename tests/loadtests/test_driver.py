"""Sending planned requests without servers: shares of the schedule, the run clock, and one request sent
through httpx.MockTransport and turned into a record."""

from __future__ import annotations

import ast
import json

import httpx
import pytest
from support import ROOT

from loadtests.driver import Dispatcher, RunClock, send
from loadtests.schedule import ImageRef, PlannedRequest

PLAN = PlannedRequest(
    index=7,
    send_at=1.5,
    user=None,
    tenant="web",
    task="question",
    images=(ImageRef(3, "listing", "jpeg"),),
    max_tokens=16,
    temperature=0.7,
    stream=True,
)


def plans(n: int) -> list[PlannedRequest]:
    return [PlannedRequest(i, i * 0.1, None, "web", "q", (), 8, 0.0, False) for i in range(n)]


def test_dispatcher_gives_each_worker_every_nth_request() -> None:
    shares = [Dispatcher(plans(10), i, 3) for i in range(3)]
    taken = [[p.index for p in iter(d.take, None)] for d in shares]
    assert taken == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert Dispatcher(plans(3)).take() is not None
    with pytest.raises(ValueError, match=r"not in 0\.\.1"):
        Dispatcher(plans(3), 2, 2)


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_run_clock_sleeps_until_the_planned_time_and_not_when_late() -> None:
    fake = FakeTime()
    clock = RunClock(fake)
    clock.sleep_until(2.5, fake.sleep)
    assert clock() == 2.5
    clock.sleep_until(1.0, fake.sleep)
    assert clock() == 2.5
    assert RunClock(fake, lead_s=0.5)() == -0.5


class Steps:
    """A run clock that moves 10 ms at every reading."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


def sse(*objs: object) -> bytes:
    return b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objs) + b"data: [DONE]\n\n"


def delta(text: str) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": {"content": text}}]}


def client(handler: httpx.MockTransport) -> httpx.Client:
    return httpx.Client(transport=handler, base_url="http://router")


def test_streamed_request_becomes_a_full_record() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        body = sse(
            delta("a"), delta("b"), delta("c"), {"choices": [], "usage": {"prompt_tokens": 900, "completion_tokens": 3}}
        )
        headers = {"content-type": "text/event-stream", "x-qvl-replica": "r2", "x-qvl-cache": "miss"}
        return httpx.Response(200, stream=httpx.ByteStream(body), headers=headers)

    clock = Steps(1.5)
    done = send(client(httpx.MockTransport(answer)), PLAN, b"{}", "key-web", clock, image_tokens=841, worker=1)
    record = done.record
    assert seen[0].headers["authorization"] == "Bearer key-web" and seen[0].url.path == "/v1/chat/completions"
    assert record.status == 200 and record.error_type is None
    assert record.send_lag_ms == pytest.approx(10.0)
    assert record.ttft_ms == pytest.approx(10.0)
    assert record.itl is not None and record.itl.count == 2 and len(done.gaps_s) == 2
    assert (record.prompt_tokens, record.output_tokens, record.image_tokens) == (900, 3, 841)
    assert (record.replica, record.cache, record.worker, record.image_buckets) == ("r2", "miss", 1, ["listing"])
    # The clock moves 10 ms a reading: sent at one, first token at the next, two gaps, the end three later.
    assert record.e2e_ms == pytest.approx(60.0) and done.gaps_s == pytest.approx([0.01, 0.01])


def test_error_json_and_transport_errors_are_typed() -> None:
    def limited(request: httpx.Request) -> httpx.Response:
        error = {"error": {"message": "slow down", "type": "rate_limit_exceeded", "code": "requests_per_minute"}}
        return httpx.Response(429, json=error)

    record = send(client(httpx.MockTransport(limited)), PLAN, b"{}", "k", Steps(0), 0).record
    assert (record.status, record.error_type, record.ttft_ms) == (429, "rate_limit_exceeded", None)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    record = send(client(httpx.MockTransport(refused)), PLAN, b"{}", "k", Steps(0), 0).record
    assert (record.status, record.error_type) == (None, "ConnectError")


def test_non_streamed_answer_reads_usage_and_a_closed_loop_has_no_lag() -> None:
    def whole(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": 9}})

    plan = PlannedRequest(0, None, 0, "web", "caption", (), 9, 0.0, False)
    record = send(client(httpx.MockTransport(whole)), plan, b"{}", "k", Steps(0), 0).record
    assert record.send_lag_ms is None and record.intended_s is None and record.itl is None
    assert (record.output_tokens, record.error_type) == (9, None)


def test_only_the_locustfile_imports_locust() -> None:
    # Importing locust monkey-patches the process with gevent: the router, replicas and tests must never.
    offenders = []
    folders = ("qvl", "router", "serving", "cache", "loadtests", "tools", "benchmarks", "tests")
    for path in sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py")):
        if path == ROOT / "loadtests" / "locustfile.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "locust" or n.startswith(("locust.", "gevent")) for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"only loadtests/locustfile.py may import locust or gevent: {offenders}"
