"""Two versions of one model on real vLLM (CPU): `qvl up --engine vllm` with two pools, the tiny
Qwen3-VL of seed 0 as v1 and of seed 1 (another checkpoint, as new weights would be) as v2, behind one
route; the router sends each session to one version, says which, and mirrors greedy requests to v2."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from support.polling import wait_for
from support.servers import Cluster, Proc

pytestmark = pytest.mark.vllm
MODEL = "qwen3-vl-tiny"


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    tmp = tmp_path_factory.mktemp("vllm-versions")
    config = tmp / "qvl.yaml"
    config.write_text(
        f"""up: {{engine: vllm, ready_timeout_s: 400, gpu_exporter: false}}
replica: {{device: cpu, max_num_seqs: 4, run_dir: "{tmp / "run"}"}}
cache: {{backend: "off"}}
pools:
  - {{name: tiny-v1, model: {MODEL}, version: v1, tiny_seed: 0, replicas: 1}}
  - {{name: tiny-v2, model: {MODEL}, version: v2, tiny_seed: 1, replicas: 1}}
router:
  routes: {{{MODEL}: {{versions: {{v1: 50, v2: 50}}, shadow: {{v2: 1.0}}}}}}
  batch: {{files_dir: "{tmp / "files"}"}}
"""
    )
    cluster = Cluster(tmp)
    try:
        yield cluster.start("up", "--config", str(config), ready_path="/ready", timeout=600)
    finally:
        cluster.stop_all()


def _ask(router: Proc, session: str, text: str) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 8}
    return httpx.post(router.url + "/v1/chat/completions", json=body, headers={"x-session-id": session}, timeout=120)


def test_two_checkpoints_serve_one_route_by_session(router: Proc) -> None:
    models = httpx.get(router.url + "/v1/models").json()["data"]
    assert [(m["id"], m["versions"]) for m in models] == [(MODEL, ["v1", "v2"])]
    serving = {r["name"]: r["versions"] for r in httpx.get(router.url + "/v1/cluster").json()["replicas"]}
    assert sorted(v[MODEL] for v in serving.values()) == ["v1", "v2"]
    answers: dict[str, list[tuple[str, str]]] = {}
    for session in (f"shopper-{i}" for i in range(8)):
        for _ in range(2):
            answer = _ask(router, session, "Describe the product in the photo.")
            assert answer.status_code == 200, answer.text
            version = answer.headers["x-qvl-model-version"]
            assert serving[answer.headers["x-qvl-replica"]] == {MODEL: version}
            assert answer.json()["model"] == MODEL
            answers.setdefault(session, []).append((version, answer.json()["choices"][0]["message"]["content"]))
    # A conversation stays on its version; the same greedy request gets the same answer there.
    assert all(len(set(turns)) == 1 for turns in answers.values())
    by_version = {turns[0][0]: turns[0][1] for turns in answers.values()}
    assert set(by_version) == {"v1", "v2"}
    assert by_version["v1"] != by_version["v2"]  # other weights, other answers: two checkpoints indeed


def test_greedy_requests_on_v1_are_mirrored_to_v2_and_compared(router: Proc) -> None:
    def compared() -> float:
        text = httpx.get(router.url + "/metrics").text
        lines = [line for line in text.splitlines() if line.startswith("qvl_shadow_comparisons_total{")]
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in lines if 'result="differ"' in line or 'result="same"' in line
        )

    before = compared()
    for i in range(6):
        assert _ask(router, f"mirror-{i}", "What colour is it?").status_code == 200
    wait_for(lambda: compared() > before, timeout=60)
    text = httpx.get(router.url + "/metrics").text
    assert f'qvl_shadow_comparisons_total{{model="{MODEL}",result="differ",version="v2"}}' in text
