"""deploy/prometheus and deploy/grafana against a real Prometheus scraping a real `qvl up --engine sim`.

One run per module: `qvl up --engine sim` with two pools of one model (three replicas of version v1, one of
v2) and a rollout of v2 at 10 % held for the whole run (the version panels need both), two GPU exporters (this
machine's, which has no NVML and reports `qvl_gpu_exporter_up 0`, and one reading the substitute NVML module
of tests/serving/fake_nvml, since no GPU is here), the autoscaler's metrics for both pools (a small exporter
process serving autoscale.metrics with a scripted scale-up: tests/support/autoscaler.py, as `qvl cluster
autoscale` places replicas on Ray, which is not here), Prometheus (Debian's package) with the shipped config at a
1 s interval, the answer cache in a real redis-server, and ~25 s of shop traffic
(loadtests/workloads/shop.yaml through loadtests/traffic.py, broken requests included) during which one
replica is SIGKILLed while it answers a stream and a plain request (so a stream is cut and a request retried,
for certain) and Redis is killed and restarted. Then every recording rule and every panel query of every
dashboard is evaluated through the HTTP API.

What cannot return data from this machine's own hardware: every per-GPU query (utilization, memory,
temperature, power, the GPU inventory and host:qvl_gpu_utilization_ratio:avg) needs NVML. Here those
series come from the substitute NVML exporter, and the real exporter is checked for what it exports
without NVML: `qvl_gpu_exporter_up 0` and no per-GPU series.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from support.autoscaler import start_exporter
from support.batch import batch_lines
from support.chat import image_chat, png_data_url
from support.nvml import fake_gpu, start_fake_exporter
from support.servers import Cluster, Proc, RedisServer, sim_pid

from loadtests.traffic import ShopTraffic
from qvl.procs import free_port
from tools.promstack import (
    DASHBOARDS_DIR,
    PanelQuery,
    PrometheusServer,
    dashboard_queries,
    finite,
    live_form,
    recording_rules,
    write_config,
)

MODEL = "Qwen/Qwen3-VL-4B-Instruct"
FAKE_HOST = "gpu-node-fake"
REAL_HOST = "cpu-node-real"
FAKE_GPUS = [fake_gpu("GPU-fake-0", 87, 71, 80, 66, 512, 700), fake_gpu("GPU-fake-1", 41, 70, 80, 58, 301, 700)]
SIM_SETTINGS = """\
up: {engine: sim, model: "Qwen/Qwen3-VL-4B-Instruct"}
pools:
  - {name: stable, model: "Qwen/Qwen3-VL-4B-Instruct", version: v1, replicas: 3}
  - {name: canary, model: "Qwen/Qwen3-VL-4B-Instruct", version: v2, replicas: 1}
# session: the fault probes below are pinned to the victim by their session id; the shop traffic
# carries none and goes least-loaded.
router: {policy: session}
sim: {prefill_base_ms: 25, step_base_ms: 15, output_tokens: 32, max_running: 8}
"""
# Per-GPU series: on this machine they exist only through the substitute NVML (see the docstring).
PER_GPU = ("qvl_gpu_utilization", "qvl_gpu_memory", "qvl_gpu_temperature", "qvl_gpu_power")


@dataclass
class Run:
    prometheus: PrometheusServer
    router: Proc
    real_exporter: Proc
    fake_exporter: Proc
    autoscaler: Proc
    traffic: ShopTraffic
    killed_replica: str


def _session_on(router: Proc, replica_url: str) -> str:
    """A session id that the session policy pins to `replica_url` (no load bound can move it)."""
    name = replica_url.removeprefix("http://")
    for i in range(200):
        session = f"probe-{i}"
        doc = image_chat(MODEL, png_data_url((i, 60, 90)), temperature=0.7, max_tokens=1)
        response = httpx.post(router.url + "/v1/chat/completions", json=doc, headers={"x-session-id": session})
        assert response.status_code == 200
        if response.headers["x-qvl-replica"] == name:
            return session
    raise AssertionError(f"no session of 200 went to {name}")


def _start_rollout(router: Proc, timeout_s: float = 20.0) -> None:
    """A rollout of v2 at 10 % that no analysis advances during the run (it may abort it, as the canary's
    one replica is slower under this load; the version panels have their data either way). Returns once
    this router applies its route, so that the victim's session found next stays on v1."""
    body = {"model": MODEL, "to": "v2", "steps": [10, 100], "min_requests": 10**6, "min_duration_s": 3600, "shadow": 0}
    deadline = time.monotonic() + timeout_s
    while True:  # the v2 replica may not be healthy in the router yet
        answer = httpx.post(router.url + "/v1/rollouts/start", json=body, timeout=10)
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert answer.status_code == 200, answer.text
    while time.monotonic() < deadline:
        state = httpx.get(f"{router.url}/v1/rollouts/{MODEL}", timeout=10).json()
        if state["applied_here"] == state["route"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"the router did not apply the rollout's route within {timeout_s}s")


def _kill_while_answering(router: Proc, session: str, pid: int) -> tuple[httpx.Response, bytes]:
    """Send a streamed and a non-streamed question pinned to the replica `pid`, kill it while it answers
    both: the stream must end with an error event, the other must be retried elsewhere and succeed."""
    doc = image_chat(MODEL, png_data_url((7, 7, 7)), temperature=0.7, max_tokens=32)  # ~0.5 s each
    headers = {"x-session-id": session}
    url = router.url + "/v1/chat/completions"

    begun = threading.Event()

    def streamed() -> bytes:
        with httpx.stream("POST", url, json={**doc, "stream": True}, headers=headers, timeout=30) as response:
            chunks = response.iter_raw()
            first = next(chunks, b"")
            begun.set()
            return first + b"".join(chunks)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stream = pool.submit(streamed)
        plain = pool.submit(httpx.post, url, json=doc, headers=headers, timeout=30)
        # The kill waits for the stream's first chunk rather than a fixed time: on a loaded machine the
        # requests may not reach the victim within one, and a stream not yet begun is retried, not cut.
        # The plain request is under way by then or, sent later, meets the dead victim: retried either way.
        assert begun.wait(30), "the pinned stream never began"
        os.kill(pid, signal.SIGKILL)
        return plain.result(), stream.result()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("observability")
    cluster = Cluster(tmp)
    prometheus = PrometheusServer(tmp, free_port())
    redis = RedisServer(free_port(), tmp)
    autoscaler: Proc | None = None
    try:
        redis.start()
        config = tmp / "qvl.yaml"
        batch_dir = (
            f"router: {{policy: session, batch: {{files_dir: '{tmp / 'batch'}'}}, "
            f"rollout: {{store: '{redis.url}', poll_interval_s: 0.2}}}}"
        )
        config.write_text(
            SIM_SETTINGS.replace("router: {policy: session}", batch_dir) + f"cache: {{backend: '{redis.url}'}}\n"
        )
        router = cluster.start("up", "--config", str(config), ready_path="/ready")
        # A small batch beside the shop traffic: the batch panels need its lines.
        with openai.OpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0) as batches:
            upload = batches.files.create(file=("tags.jsonl", batch_lines(MODEL, 20)), purpose="batch")
            batches.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        listed = httpx.get(router.url + "/v1/cluster", timeout=5).json()["replicas"]
        replicas = [r["url"] for r in listed]
        stable = [r["url"] for r in listed if r["versions"].get(MODEL) == "v1"]
        with pytest.MonkeyPatch.context() as env:
            env.setenv("QVL_GPU_EXPORTER__NODE_NAME", REAL_HOST)
            real_exporter = cluster.start("gpu-exporter", ready_path="/metrics")
        fake_exporter = start_fake_exporter(cluster, tmp / "nvml.json", FAKE_GPUS, FAKE_HOST)
        autoscaler = start_exporter(tmp, free_port(), ["stable", "canary"])
        targets = {
            "qvl-router": [router.url.removeprefix("http://")],
            "qvl-vllm": [url.removeprefix("http://") for url in replicas],
            "qvl-gpu": [real_exporter.url.removeprefix("http://"), fake_exporter.url.removeprefix("http://")],
            "qvl-autoscaler": [autoscaler.url.removeprefix("http://")],
        }
        prometheus.start(write_config(tmp, targets, interval_s=1))
        prometheus.wait_for('count(up{job=~"qvl-.*"} == 1) == 8', timeout_s=30)

        _start_rollout(router)
        victim = stable[1]
        victim_pid = sim_pid(int(victim.rsplit(":", 1)[1]))
        session = _session_on(router, victim)
        traffic = ShopTraffic(router.url, MODEL, seed=5)
        faults: dict[str, object] = {}

        def tick(elapsed: float) -> None:
            """Faults: the victim dies at 8 s while it answers two pinned requests; Redis is down from
            16 s to 19 s. (Blocking here pauses the test's clients for a moment, not the cluster.)"""
            if elapsed >= 8 and "plain" not in faults:
                faults["plain"], faults["stream"] = _kill_while_answering(router, session, victim_pid)
            if 16 <= elapsed < 17:
                redis.kill()
            if 19 <= elapsed < 20:
                redis.start()

        asyncio.run(traffic.run(seconds=25, concurrency=12, tick=tick))
        plain, stream = faults["plain"], faults["stream"]
        assert isinstance(plain, httpx.Response) and isinstance(stream, bytes)
        assert plain.status_code == 200 and plain.headers["x-qvl-replica"] != victim.removeprefix("http://")
        assert b'"type":"stream_interrupted"' in stream and stream.endswith(b"data: [DONE]\n\n")
        # Two evaluation rounds after the last scrape, so the recording rules saw the whole run.
        time.sleep(3)
        yield Run(prometheus, router, real_exporter, fake_exporter, autoscaler, traffic, victim.removeprefix("http://"))
    finally:
        prometheus.stop()
        if autoscaler is not None:
            autoscaler.stop()
        cluster.stop_all()
        redis.kill()


def test_the_run_was_real_traffic_with_a_replica_lost(run: Run) -> None:
    report = run.traffic.report
    assert report.sent > 300
    assert report.transport_errors == {}
    # Broken requests were refused at the edge; everything else succeeded, streams cut by the kill
    # aside (their HTTP status was 200 and they ended with an error event).
    refused = {kind: status for kind, status in report.statuses if kind in ("unknown-model", "malformed-json")}
    assert refused and set(refused.values()) <= {400, 404}
    answered = [s for (kind, s), n in report.statuses.items() if kind not in refused and kind != "bad-base64"]
    assert set(answered) == {200}
    # Every task of the workload and every extra went out (the panels' data needs them all).
    kinds = {kind for kind, _ in report.statuses}
    assert kinds >= {task.name for task in run.traffic.workload.tasks} | {"bad-base64"}
    assert report.abandoned > 0
    victim = run.prometheus.query(f'up{{job="qvl-vllm", instance="{run.killed_replica}"}}')
    assert [float(s["value"][1]) for s in victim] == [0.0]


def test_every_target_of_every_job_is_scraped(run: Run) -> None:
    targets = run.prometheus.targets()
    jobs = {t["labels"]["job"] for t in targets}
    assert jobs == {"qvl-router", "qvl-vllm", "qvl-gpu", "qvl-autoscaler"}
    down = [t["labels"]["instance"] for t in targets if t["health"] != "up"]
    assert down == [run.killed_replica]


@pytest.mark.parametrize(("record", "expr"), recording_rules(), ids=[r for r, _ in recording_rules()])
def test_every_recording_rule_returns_data(run: Run, record: str, expr: str) -> None:
    assert finite(run.prometheus.query(record)), f"{record} has no data; its expression is {expr}"


QUERIES = [q for path in sorted(DASHBOARDS_DIR.glob("*.json")) for q in dashboard_queries(path)]


@pytest.mark.parametrize("query", QUERIES, ids=[f"{q.dashboard}/{q.panel}/{q.expr[:40]}" for q in QUERIES])
def test_every_panel_query_returns_data(run: Run, query: PanelQuery) -> None:
    result = run.prometheus.query(live_form(query.expr))
    assert finite(result), f"{query.dashboard} / {query.panel}: no data for {query.expr}"
    if any(name in query.expr for name in PER_GPU):
        hosts = {series["metric"].get("host") for series in result} - {None}
        # Per-GPU data can only come from the substitute NVML: this machine has no GPU.
        assert REAL_HOST not in hosts


def test_without_nvml_the_exporter_reports_up_0_and_no_gpu(run: Run) -> None:
    prometheus = run.prometheus
    up = {s["metric"]["host"]: float(s["value"][1]) for s in prometheus.query("qvl_gpu_exporter_up")}
    assert up == {REAL_HOST: 0.0, FAKE_HOST: 1.0}
    assert prometheus.query(f'qvl_gpu_utilization_ratio{{host="{REAL_HOST}"}}') == []
    gpus = prometheus.query(f'qvl_gpu_utilization_ratio{{host="{FAKE_HOST}"}}')
    assert sorted((s["metric"]["gpu"], float(s["value"][1])) for s in gpus) == [("0", 0.87), ("1", 0.41)]


def test_router_metrics_saw_the_failover(run: Run) -> None:
    prometheus = run.prometheus
    errors = prometheus.query(f'sum by (type) (qvl_upstream_errors_total{{replica="{run.killed_replica}"}})')
    assert {s["metric"]["type"] for s in errors} & {"connect", "disconnect", "stream_interrupted"}
    healthy = prometheus.query(f'max by (replica) (qvl_replica_healthy{{replica="{run.killed_replica}"}})')
    assert [float(s["value"][1]) for s in healthy] == [0.0]
    assert float(prometheus.query("sum(max by (replica) (qvl_replica_healthy))")[0]["value"][1]) == 3.0
    rejected = {s["metric"]["reason"] for s in prometheus.query("qvl_rejections_total")}
    assert {"model_not_found", "invalid_json"} <= rejected
    assert float(prometheus.query("sum(qvl_retries_total)")[0]["value"][1]) >= 1
    interrupted = prometheus.query('sum(qvl_requests_total{status="502", error_type="stream_interrupted"})')
    assert float(interrupted[0]["value"][1]) >= 1


def test_the_cache_store_outage_was_seen(run: Run) -> None:
    prometheus = run.prometheus
    assert float(prometheus.query('sum(qvl_cache_requests_total{result="error"})')[0]["value"][1]) > 0
    outage = prometheus.query('min_over_time(qvl_cache_store_up{store="redis"}[1m])')
    assert [float(s["value"][1]) for s in outage] == [0.0]
    assert [float(s["value"][1]) for s in prometheus.query('qvl_cache_store_up{store="redis"}')] == [1.0]


def test_the_autoscaler_job_has_each_pool_scaled_up(run: Run) -> None:
    prometheus = run.prometheus
    (up,) = prometheus.query('up{job="qvl-autoscaler"}')
    assert up["metric"]["instance"] == run.autoscaler.url.removeprefix("http://")
    desired = {s["metric"]["pool"]: float(s["value"][1]) for s in prometheus.query("qvl_autoscaler_desired_replicas")}
    assert desired == {"stable": 3.0, "canary": 3.0}
    serving = prometheus.query('sum(qvl_autoscaler_actual_replicas{state="serving"})')
    assert float(serving[0]["value"][1]) == 6.0
    ups = prometheus.query('sum by (pool) (qvl_autoscaler_decisions_total{direction="up", reason="demand_up"})')
    assert sorted((s["metric"]["pool"], float(s["value"][1])) for s in ups) == [("canary", 1.0), ("stable", 1.0)]
