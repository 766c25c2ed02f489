"""Pools and versions behind one router (`qvl up --engine sim` with three pools): each name reaches only
its pool, the split is weighted and sticky, every answer names its version, and the cache never answers
one version's request with another's entry."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from support.batch import batch_lines, wait_batch
from support.servers import Cluster, Proc

from router.routes import Route, assign

SMALL, LARGE = "qwen3-vl-4b", "qwen3-vl-8b"
POOLS = f"""
up: {{engine: sim}}
sim: {{step_base_ms: 2, prefill_base_ms: 2, output_tokens: 4}}
pools:
  - {{name: small, model: {SMALL}, version: v1, replicas: 1}}
  - {{name: large-v1, model: {LARGE}, version: v1, replicas: 1}}
  - {{name: large-v2, model: {LARGE}, version: v2, replicas: 1}}
router:
  routes:
    {LARGE}: {{versions: {{v1: 50, v2: 50}}, sticky: session}}
"""


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    tmp = tmp_path_factory.mktemp("versions")
    cluster = Cluster(tmp)
    config = tmp / "qvl.yaml"
    config.write_text(
        POOLS + f'  batch: {{files_dir: "{tmp / "files"}"}}\n  audit: {{path: "{tmp / "audit.jsonl"}"}}\n'
    )
    try:
        yield cluster.start("up", "--config", str(config), ready_path="/ready", timeout=90)
    finally:
        cluster.stop_all()


def _chat(model: str, text: str = "hello", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def _replica_versions(router: Proc) -> dict[str, dict[str, str]]:
    doc = httpx.get(router.url + "/v1/cluster").json()
    return {r["name"]: r["versions"] for r in doc["replicas"]}


def test_each_model_reaches_only_its_pool_and_models_lists_both(router: Proc) -> None:
    models = httpx.get(router.url + "/v1/models").json()["data"]
    assert {m["id"]: m["versions"] for m in models} == {SMALL: ["v1"], LARGE: ["v1", "v2"]}
    serving = _replica_versions(router)
    cluster = httpx.get(router.url + "/v1/cluster").json()
    assert {(p["name"], p["model"], p["version"], p["healthy"]) for p in cluster["pools"]} == {
        ("small", SMALL, "v1", 1),
        ("large-v1", LARGE, "v1", 1),
        ("large-v2", LARGE, "v2", 1),
    }
    with httpx.Client(base_url=router.url, timeout=30) as client:
        for i in range(30):
            for model in (SMALL, LARGE):
                answer = client.post(
                    "/v1/chat/completions", json=_chat(model, f"q{i}"), headers={"x-session-id": f"s{i}"}
                )
                assert answer.status_code == 200, answer.text
                replica = answer.headers["x-qvl-replica"]
                version = answer.headers["x-qvl-model-version"]
                assert serving[replica] == {model: version}, (model, replica, serving)
                assert answer.json()["model"] == model


def test_assignment_is_weighted_and_sticky_per_session(router: Proc) -> None:
    route = Route(LARGE, (("v1", 50.0), ("v2", 50.0)))
    seen: dict[str, set[str]] = {}
    with httpx.Client(base_url=router.url, timeout=30) as client:
        for turn in range(3):
            for s in range(60):
                session = f"conversation-{s}"
                answer = client.post(
                    "/v1/chat/completions", json=_chat(LARGE, f"turn {turn}"), headers={"x-session-id": session}
                )
                assert answer.status_code == 200
                seen.setdefault(session, set()).add(answer.headers["x-qvl-model-version"])
    assert all(len(versions) == 1 for versions in seen.values())
    # The router's choice is the pure function's, so any router gives the same.
    assert all(versions == {assign(route, b"s\x1f" + s.encode())} for s, versions in seen.items())
    split = Counter(next(iter(v)) for v in seen.values())
    assert split["v1"] > 10 and split["v2"] > 10


def test_a_pinned_name_reaches_its_version_and_an_unserved_version_is_a_404(router: Proc) -> None:
    answer = httpx.post(router.url + "/v1/chat/completions", json=_chat(f"{LARGE}@v2"), timeout=30)
    assert answer.status_code == 200 and answer.headers["x-qvl-model-version"] == "v2"
    missing = httpx.post(router.url + "/v1/chat/completions", json=_chat(f"{LARGE}@v9"), timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_the_cache_never_crosses_versions(router: Proc) -> None:
    route = Route(LARGE, (("v1", 50.0), ("v2", 50.0)))
    sessions = {assign(route, b"s\x1f" + f"cache-{i}".encode()): f"cache-{i}" for i in range(50)}
    body = _chat(LARGE, "describe the red shoe", temperature=0)
    with httpx.Client(base_url=router.url, timeout=30) as client:
        first = client.post("/v1/chat/completions", json=body, headers={"x-session-id": sessions["v1"]})
        again = client.post("/v1/chat/completions", json=body, headers={"x-session-id": sessions["v1"]})
        other = client.post("/v1/chat/completions", json=body, headers={"x-session-id": sessions["v2"]})
        other_again = client.post("/v1/chat/completions", json=body, headers={"x-session-id": sessions["v2"]})
    assert (first.headers["x-qvl-cache"], first.headers["x-qvl-model-version"]) == ("miss", "v1")
    assert (again.headers["x-qvl-cache"], again.headers["x-qvl-model-version"]) == ("hit", "v1")
    assert (other.headers["x-qvl-cache"], other.headers["x-qvl-model-version"]) == ("miss", "v2")
    assert other.headers["x-qvl-replica"] != "cache"
    assert (other_again.headers["x-qvl-cache"], other_again.headers["x-qvl-model-version"]) == ("hit", "v2")


def test_versions_are_in_the_metrics(router: Proc) -> None:
    text = httpx.get(router.url + "/metrics").text
    assert f'qvl_version_requests_total{{code="2xx",model="{LARGE}",version="v2"}}' in text
    assert f'qvl_route_weight_percent{{model="{LARGE}",version="v1"}} 50.0' in text


def test_a_batch_job_keeps_the_version_current_when_it_was_created(router: Proc) -> None:
    """The route splits LARGE 50/50 (the tie goes to v1, listed first): every line of a job created now
    runs on v1, where interactive requests with the same bodies spread over both versions."""
    with openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0) as client:
        uploaded = client.files.create(file=("lines.jsonl", batch_lines(LARGE, 24)), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = wait_batch(client, batch.id, timeout=60)
    assert done.status == "completed" and done.request_counts is not None and done.request_counts.completed == 24
    audit = Path(router.log).parent / "audit.jsonl"
    lines = [orjson.loads(line) for line in audit.read_text().splitlines()]
    versions = Counter(line["version"] for line in lines if line["batch_id"] == batch.id)
    assert versions == Counter({"v1": 24})
