"""The shop workload and its traffic generator, without servers: shop.yaml loads and plans the same schedule
every time, the request kinds follow the tasks' shares with the extras on top, and every kind of request
goes out as it should (through httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

import httpx
import pytest

from loadtests.schedule import build_schedule, schedule_digest, substream
from loadtests.traffic import (
    ABANDON_SHARE,
    ABANDONED,
    BAD_IMAGE_URL,
    BROKEN,
    BROKEN_SHARE,
    EXTRAS_STREAM,
    WORKLOAD,
    ShopTraffic,
    shop_workload,
    steps,
)
from loadtests.workload import ClosedLoop, Workload, WorkloadError, load_workload

MODEL = "Qwen/Qwen3-VL-4B-Instruct"
SSE = b'data: {"choices": [{"delta": {"content": "a"}}]}\n\ndata: [DONE]\n\n'


def cut(workload: Workload, requests: int) -> Workload:
    """A closed-loop workload cut to `requests` planned requests (shop.yaml plans 20,000)."""
    arrivals = workload.arrivals
    assert isinstance(arrivals, ClosedLoop)
    return workload.model_copy(update={"arrivals": arrivals.model_copy(update={"requests": requests})})


def small(transport: httpx.AsyncBaseTransport, requests: int = 300) -> ShopTraffic:
    """ShopTraffic over shop.yaml cut to `requests` planned requests, sending through `transport`."""
    workload = cut(load_workload(WORKLOAD), requests)
    environ = {"QVL_LOADTEST_KEY_WEB": "sk-web"}
    return ShopTraffic("http://shop.test", MODEL, workload=workload, environ=environ, transport=transport)


def test_shop_yaml_loads_as_a_closed_loop_of_the_shop_mix() -> None:
    workload = load_workload(WORKLOAD)
    assert workload.name == "shop"
    assert isinstance(workload.arrivals, ClosedLoop)
    assert {t.name: (t.temperature, t.stream) for t in workload.tasks} == {
        "catalogue": (0, False),
        "catalogue-stream": (0, True),
        "question": (0.7, False),
        "question-stream": (0.7, True),
    }
    assert {t.key_env for t in workload.tenants} == {"QVL_LOADTEST_KEY_WEB", "QVL_LOADTEST_KEY_APP"}


def test_the_schedule_and_its_extras_are_the_same_every_time() -> None:
    first = build_schedule(cut(shop_workload(seed=9, products=200), 2000))
    second = build_schedule(cut(shop_workload(seed=9, products=200), 2000))
    assert schedule_digest(first) == schedule_digest(second)
    kinds = [s.kind for s in steps(first, substream(9, EXTRAS_STREAM))]
    assert kinds == [s.kind for s in steps(second, substream(9, EXTRAS_STREAM))]
    assert schedule_digest(build_schedule(cut(shop_workload(seed=10, products=200), 2000))) != schedule_digest(first)


def test_seed_and_products_replace_the_files_and_are_validated() -> None:
    workload = shop_workload(seed=5, products=200)
    assert (workload.seed, workload.popularity.catalogue) == (5, 200)
    assert shop_workload().seed == load_workload(WORKLOAD).seed
    with pytest.raises(WorkloadError, match=r"popularity\.catalogue"):
        shop_workload(products=0)


def test_kinds_follow_the_task_shares_with_the_extras_on_top() -> None:
    workload = load_workload(WORKLOAD)
    plans = build_schedule(workload)
    counts = collections.Counter(s.kind for s in steps(plans, substream(workload.seed, "extras")))
    total = sum(counts.values())
    planned_share = 1 - ABANDON_SHARE - BROKEN_SHARE
    task_total = sum(t.share for t in workload.tasks)
    expected = {t.name: planned_share * t.share / task_total for t in workload.tasks}
    expected[ABANDONED] = ABANDON_SHARE
    expected.update({kind: BROKEN_SHARE / len(BROKEN) for kind in BROKEN})
    assert counts.keys() == expected.keys()
    for kind, share in expected.items():
        assert counts[kind] / total == pytest.approx(share, abs=0.01), kind
    # Every planned request goes out once, in schedule order.
    assert [s.plan.index for s in steps(plans, substream(1, "x")) if s.kind == s.plan.task] == list(range(len(plans)))


@pytest.mark.parametrize(("abandon", "broken"), [(-0.1, 0.05), (0.3, 0.3)])
def test_impossible_extra_shares_are_refused(abandon: float, broken: float) -> None:
    with pytest.raises(ValueError, match="extra shares"):
        next(steps([], substream(1, "x"), abandon, broken))


def test_every_kind_goes_out_as_it_should() -> None:
    seen: list[tuple[str, dict[str, Any] | None, str | None]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        try:
            body = json.loads(request.content)
        except ValueError:
            seen.append(("malformed", None, request.headers.get("authorization")))
            return httpx.Response(400, json={"error": {"type": "invalid_request_error"}})
        seen.append(("json", body, request.headers.get("authorization")))
        if body["model"] != MODEL:
            return httpx.Response(404, json={"error": {"type": "invalid_request_error"}})
        if body["stream"]:
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=SSE)
        return httpx.Response(200, json={"choices": [{"message": {"content": "a"}}]})

    traffic = small(httpx.MockTransport(answer))
    extras = substream(traffic.workload.seed, EXTRAS_STREAM)
    expected = collections.Counter(s.kind for s in steps(build_schedule(traffic.workload), extras))
    assert expected.keys() >= {ABANDONED, *BROKEN}  # this seed's 300 requests have every extra
    # The schedule ends long before the time does: run returns when it is sent.
    asyncio.run(traffic.run(seconds=600, concurrency=4))

    report = traffic.report
    assert report.sent == len(seen) == sum(expected.values())
    assert report.transport_errors == {}
    assert report.abandoned == expected[ABANDONED]
    by_kind = collections.Counter(kind for kind, _ in report.statuses.elements())
    assert by_kind == expected - collections.Counter({ABANDONED: expected[ABANDONED]})
    assert {status for (kind, status) in report.statuses if kind not in BROKEN} == {200}
    assert dict(report.statuses)["unknown-model", 404] == expected["unknown-model"]
    bodies = [body for how, body, _ in seen if body is not None]
    assert sum(how == "malformed" for how, _, _ in seen) == expected["malformed-json"]
    images = [part["image_url"]["url"] for b in bodies for part in b["messages"][0]["content"] if "image_url" in part]
    assert sum(url == BAD_IMAGE_URL for url in images) == expected["bad-base64"]
    # Abandoned streams leave the temperature out (so the cache never serves them); planned ones keep theirs.
    assert sum("temperature" not in b for b in bodies) == expected[ABANDONED]
    assert {b["temperature"] for b in bodies if "temperature" in b} == {0, 0.7}
    # web's key is set, app's is not: app's requests go without a key (a --no-auth router takes them).
    assert {auth for _, _, auth in seen} == {"Bearer sk-web", None}
