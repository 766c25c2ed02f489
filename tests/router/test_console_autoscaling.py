"""The operations page's autoscaling panel over real HTTP: a `qvl router` whose registry is a real redis-server,
into which the test writes the autoscaler's status document (tests/support/autoscaler.py builds it in the
shape `qvl cluster autoscale` writes). The panel's pure parts (rows, staleness, no registry) are checked
directly."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis
from support.autoscaler import status_doc
from support.console import OPERATOR, console_keys, sign_in
from support.servers import Cluster, Proc, RedisServer

from router.console.autoscaling import NO_REGISTRY, NO_REPORT, StatusDoc, autoscaling_panel, pool_row, stale_after_s

PREFIX = "shop:"
KEY = PREFIX + "autoscale:status"


@dataclass
class Setup:
    router: Proc
    redis: Redis
    server: RedisServer
    operator: httpx.Client


@pytest.fixture
def setup(cluster: Cluster, tmp_path: Path, redis_server: RedisServer) -> Iterator[Setup]:
    config = tmp_path / "router.yaml"
    config.write_text(f'registry: {{url: "{redis_server.url}", key_prefix: "{PREFIX}", timeout_s: 0.5}}\n')
    sim = cluster.sim()
    router = cluster.router(sim, flags=("--keys-file", str(console_keys(tmp_path)), "--config", str(config)), auth=True)
    operator, _ = sign_in(router.url, OPERATOR)
    with closing(operator), closing(Redis.from_url(redis_server.url)) as redis:
        yield Setup(router, redis, redis_server, operator)


def panel(setup: Setup) -> dict[str, Any]:
    answer = setup.operator.get("/console/api/operations")
    assert answer.status_code == 200, answer.text
    doc: dict[str, Any] = answer.json()
    assert doc["replicas"], "the rest of the page is there whatever the panel says"
    result: dict[str, Any] = doc["autoscaling"]
    return result


def test_the_panel_reads_the_status_the_autoscaler_wrote_under_the_registry_prefix(setup: Setup) -> None:
    assert panel(setup) == {"data": [], "error": None, "note": NO_REPORT}
    # Another cluster's status (the default prefix) is not this one's.
    setup.redis.set("qvl:autoscale:status", json.dumps(status_doc(time.time(), ["elsewhere"])), ex=60)
    assert panel(setup)["note"] == NO_REPORT

    now = time.time()
    setup.redis.set(KEY, json.dumps(status_doc(now, ["stable", "canary"])), ex=60)
    found = panel(setup)
    assert (found["error"], found["note"]) == (None, None)
    assert [row["pool"] for row in found["data"]] == ["stable", "canary"]
    row = found["data"][0]
    assert (row["min"], row["max"], row["desired"]) == (1, 8, 3)
    assert (row["starting"], row["serving"], row["draining"], row["needed"]) == (1, 2, 0, 2.4)
    load = {"prefill_tokens_s": 5100.0, "decode_tokens_s": 820.0, "batch_tokens_s": 0.0, "in_flight": 6.0}
    assert row["load"] == load
    assert row["capacity"] == {"prefill_tokens_s": 3000.0, "decode_tokens_s": 500.0, "source": "profile"}
    last = row["last"]
    assert (last["direction"], last["reason"], last["from"], last["to"]) == ("up", "demand_up", 2, 3)
    assert last["applied"] is True and last["outcome"] == "applied"
    assert (row["policy"], row["dry_run"], row["interval_s"], row["startup_s"]) == ("demand", False, 10.0, 120.0)
    assert row["stale"] is False and 0 <= row["age_s"] < 10
    assert len(row["history"]) == 12
    assert set(row["history"][0]) == {
        "at",
        "desired",
        "actual",
        "serving",
        "needed",
        "prefill_tokens_s",
        "decode_tokens_s",
    }
    assert row["history"][-1]["desired"] == 3

    page = setup.operator.get("/console/operations")
    assert page.status_code == 200
    assert 'data-panel="autoscaling"' in page.text and 'id="autoscaling"' in page.text
    assert 'id="autoscaling-note"' in page.text and "History (replicas):" in page.text


def test_a_stale_or_dry_run_status_is_marked_and_a_broken_one_is_an_error(setup: Setup) -> None:
    now = time.time()
    old = status_doc(now - stale_after_s(10.0) - 5, ["stable"], dry_run=True, source="learned")
    setup.redis.set(KEY, json.dumps(old), ex=60)
    (row,) = panel(setup)["data"]
    assert row["stale"] is True and row["age_s"] > stale_after_s(10.0)
    assert row["dry_run"] is True and row["last"]["applied"] is False and row["last"]["outcome"] == "dry_run"
    assert row["capacity"]["source"] == "learned"

    broken = status_doc(now, ["stable"])
    del broken["pools"][0]["capacity"]
    setup.redis.set(KEY, json.dumps(broken), ex=60)
    found = panel(setup)
    assert found["data"] == [] and found["error"]["code"] == "autoscaler_status_invalid"
    assert "pools.0.capacity" in found["error"]["message"]
    setup.redis.set(KEY, b"not json", ex=60)
    assert panel(setup)["error"]["code"] == "autoscaler_status_invalid"


def test_while_redis_is_down_the_panel_says_so_and_recovers_after(setup: Setup) -> None:
    setup.redis.set(KEY, json.dumps(status_doc(time.time(), ["stable"])), ex=60)
    assert len(panel(setup)["data"]) == 1
    setup.server.kill()
    down = panel(setup)
    assert down["data"] == [] and down["error"]["code"] == "autoscaler_status_unavailable"
    assert "127.0.0.1" not in down["error"]["message"]  # the exception's type, never Redis' address
    setup.server.start()  # empty: nothing is persisted
    assert panel(setup) == {"data": [], "error": None, "note": NO_REPORT}
    setup.redis.set(KEY, json.dumps(status_doc(time.time(), ["stable"])), ex=60)
    assert [row["pool"] for row in panel(setup)["data"]] == ["stable"]


def test_without_a_registry_the_panel_has_a_note_and_no_error() -> None:
    assert asyncio.run(autoscaling_panel(None)) == {"data": [], "error": None, "note": NO_REGISTRY}


def test_rows_mark_a_status_stale_past_three_intervals_and_thirty_seconds() -> None:
    doc = StatusDoc.model_validate(status_doc(1000.0, ["p"], interval_s=5.0))
    assert stale_after_s(5.0) == 45.0
    assert pool_row(doc, doc.pools[0], 1045.0)["stale"] is False
    assert pool_row(doc, doc.pools[0], 1045.5)["stale"] is True
    # Before its first decision, and while its signal has no value (no data), the autoscaler writes nulls.
    first = status_doc(1000.0, ["p"])
    first["pools"][0].update({"last": None, "history": [], "needed": None})
    doc = StatusDoc.model_validate_json(json.dumps(first))
    row = pool_row(doc, doc.pools[0], 1001.0)
    assert row["last"] is None and row["history"] == [] and row["needed"] is None and row["age_s"] == 1.0
