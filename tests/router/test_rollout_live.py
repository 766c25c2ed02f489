"""Rollouts end to end: simulated replicas for v1 and v2 of one model (v2 healthy, failing or slow by the
simulator's fault settings), routers with the rollout store in a real Redis, load while the analysis runs."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from support import ROOT
from support.polling import wait_for
from support.servers import Cluster, Proc, RedisServer

MODEL = "qwen3-vl-8b"
SIM = "step_base_ms: 20, prefill_base_ms: 0, per_decode_ms: 0.1, output_tokens: 4"


def _sim(cluster: Cluster, tmp: Path, version: str, faults: str = "") -> Proc:
    config = tmp / f"sim-{version}-{uuid.uuid4().hex[:6]}.yaml"
    extra = f", {faults}" if faults else ""
    config.write_text(f'sim: {{model: {MODEL}, aliases: ["{MODEL}@{version}"], {SIM}{extra}}}\n')
    return cluster.start("sim", "--config", str(config))


def _router(cluster: Cluster, tmp: Path, redis: RedisServer, replicas: list[Proc], audit: Path | None = None) -> Proc:
    config = tmp / f"router-{uuid.uuid4().hex[:6]}.yaml"
    audit_line = f'\n  audit: {{path: "{audit}"}}' if audit else ""
    config.write_text(
        f"""router:
  routes: {{{MODEL}: {{versions: {{v1: 100}}}}}}
  rollout: {{store: "{redis.url}", interval_s: 0.3, poll_interval_s: 0.2, flush_interval_s: 0.2, lease_s: 2,
             min_samples: 20, window_s: 60}}
  batch: {{enabled: false}}{audit_line}
"""
    )
    return cluster.router(*replicas, flags=("--config", str(config)))


@dataclass
class Load:
    """Threads sending chat requests through routers, each with a new session, until stopped."""

    urls: list[str]
    statuses: Counter[int] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self, threads: int = 4) -> Load:
        for i in range(threads):
            thread = threading.Thread(target=self._run, args=(self.urls[i % len(self.urls)],), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not self._stop.is_set():
                body = {"model": MODEL, "messages": [{"role": "user", "content": "tag this"}]}
                try:
                    answer = client.post("/v1/chat/completions", json=body, headers={"x-session-id": uuid.uuid4().hex})
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                self.statuses[answer.status_code] += 1
                self.versions[answer.headers.get("x-qvl-model-version", "?")] += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path)
    try:
        yield running
    finally:
        running.stop_all()


def _start(router: Proc, **body: object) -> dict:
    answer = httpx.post(router.url + "/v1/rollouts/start", json={"model": MODEL, "to": "v2", **body}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _until_ended(router: Proc, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = httpx.get(f"{router.url}/v1/rollouts/{MODEL}", timeout=10).json()
        if state["status"] in ("promoted", "aborted"):
            return state
        time.sleep(0.2)
    raise AssertionError(f"rollout still {state['status']} after {timeout_s}s: {state['reason']}")


def test_a_healthy_canary_is_promoted_step_by_step(cluster: Cluster, tmp_path: Path, redis_server: RedisServer) -> None:
    audit = tmp_path / "audit.jsonl"
    router = _router(
        cluster, tmp_path, redis_server, [_sim(cluster, tmp_path, "v1"), _sim(cluster, tmp_path, "v2")], audit
    )
    load = Load([router.url]).start()
    try:
        _start(router, steps=[10, 50, 100], min_requests=40, min_duration_s=1, shadow=0)
        state = _until_ended(router, 60)
    finally:
        load.stop()
    assert state["status"] == "promoted", state["reason"]
    assert [e["decision"] for e in reversed(state["events"])] == ["start", "advance", "promote"]
    assert state["route"]["versions"] == [["v2", 100.0]]
    assert set(load.statuses) == {200} and not load.failures
    # This router applies the promoted route at its next poll of the store (poll_interval_s, 0.2 s here).
    wait_for(lambda: httpx.get(f"{router.url}/v1/rollouts/{MODEL}").json()["applied_here"] == state["route"], 5)
    after = httpx.post(
        router.url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    assert after.headers["x-qvl-model-version"] == "v2"
    metrics = httpx.get(router.url + "/metrics").text
    assert (
        f'qvl_rollout_decisions_total{{by="analysis",cause="checks_passed",decision="promote",model="{MODEL}"}} 1.0'
        in metrics
    )
    assert load.versions["v1"] > 0 and load.versions["v2"] > 0


@pytest.mark.parametrize(
    ("faults", "check"),
    [("fault_error_ratio: 0.1, fault_seed: 1", "errors"), ("fault_added_ttft_ms: 150", "ttft_p95")],
    ids=["failing", "slow"],
)
def test_a_bad_canary_is_aborted_and_everyone_returns_to_the_baseline(
    cluster: Cluster, tmp_path: Path, redis_server: RedisServer, faults: str, check: str
) -> None:
    audit = tmp_path / "audit.jsonl"
    v2 = _sim(cluster, tmp_path, "v2", faults)
    router = _router(cluster, tmp_path, redis_server, [_sim(cluster, tmp_path, "v1"), v2], audit)
    load = Load([router.url]).start()
    try:
        _start(router, steps=[20, 100], min_requests=100_000, min_duration_s=600, shadow=0)
        state = _until_ended(router, 60)
        aborted_at = time.monotonic()
        time.sleep(1.0)  # every router has re-read the route by now (poll_interval_s 0.2)
        load.versions.clear()
        time.sleep(1.0)
    finally:
        load.stop()
    del aborted_at
    assert state["status"] == "aborted" and check in state["reason"], state["reason"]
    assert state["route"]["versions"] == [["v2", 0.0], ["v1", 100.0]]
    assert set(load.versions) == {"v1"}, load.versions
    failed = next(c for c in state["analysis"]["checks"] if c["name"] == check)
    assert not failed["passed"] and failed["p_value"] < 0.001
    lines = [line for line in audit.read_text().splitlines() if '"rollout:abort"' in line]
    assert len(lines) == 1 and check in lines[0]
    metrics = httpx.get(router.url + "/metrics").text
    pattern = rf'qvl_rollout_decisions_total\{{by="analysis",cause="[a-z0-9_+]*{check}[a-z0-9_+]*",decision="abort"'
    assert re.search(pattern, metrics), metrics


def test_route_changes_reach_two_routers_within_two_seconds_and_survive_a_restart(
    cluster: Cluster, tmp_path: Path, redis_server: RedisServer
) -> None:
    replicas = [_sim(cluster, tmp_path, "v1"), _sim(cluster, tmp_path, "v2")]
    first = _router(cluster, tmp_path, redis_server, replicas)
    second = _router(cluster, tmp_path, redis_server, replicas)
    load = Load([first.url, second.url]).start()
    try:
        time.sleep(0.5)
        changed = time.monotonic()
        _start(first, steps=[30, 100], min_requests=100_000, min_duration_s=3600)
        seen = None
        while time.monotonic() - changed < 5:
            routes = httpx.get(second.url + "/v1/cluster", timeout=5).json()["routes"]
            if routes[0]["versions"] == [["v2", 30.0], ["v1", 70.0]]:
                seen = time.monotonic() - changed
                break
            time.sleep(0.05)
        paused = httpx.post(second.url + "/v1/rollouts/pause", json={"model": MODEL}, timeout=10)
        assert paused.status_code == 200 and paused.json()["status"] == "paused"
        again = httpx.post(first.url + "/v1/rollouts/start", json={"model": MODEL, "to": "v2"}, timeout=10)
        assert again.status_code == 409 and again.json()["error"]["code"] == "rollout_active"
        time.sleep(1.0)
    finally:
        load.stop()
    # The propagation contract (routers poll the route revision every poll_interval_s, 0.2 s here), which
    # the issue states as "within 2 s": not a speed target.
    assert seen is not None, "the second router never applied the new route"
    assert seen <= 2.0, f"the second router applied the route after {seen:.2f}s"
    assert set(load.statuses) == {200} and not load.failures, (load.statuses, load.failures[:3])
    assert load.versions["v2"] > 0
    assert f'qvl_rollout_step_percent{{model="{MODEL}",version="v2"}} 30.0' in httpx.get(second.url + "/metrics").text
    second.kill()
    restarted = _router(cluster, tmp_path, redis_server, replicas)
    state = httpx.get(f"{restarted.url}/v1/rollouts/{MODEL}", timeout=10).json()
    assert state["status"] == "paused" and state["route"]["versions"] == [["v2", 30.0], ["v1", 70.0]]


def test_the_command_line_drives_a_rollout(cluster: Cluster, tmp_path: Path, redis_server: RedisServer) -> None:
    router = _router(cluster, tmp_path, redis_server, [_sim(cluster, tmp_path, "v1"), _sim(cluster, tmp_path, "v2")])

    def qvl(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "qvl", "rollout", *args, "--url", router.url]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)

    started = qvl("start", MODEL, "--to", "v2", "--steps", "5,100", "--min-requests", "1000")
    assert started.returncode == 0, started.stderr
    assert "v1 -> v2 running at step 1/2 (5%)" in started.stdout
    bad = qvl("start", MODEL, "--to", "v3")
    assert (bad.returncode == 1 and "invalid_rollout" in bad.stderr) or "rollout_active" in bad.stderr
    status = qvl("status", MODEL)
    assert status.returncode == 0 and "route: v2 5, v1 95" in status.stdout
    aborted = qvl("abort", MODEL)
    assert aborted.returncode == 0 and "aborted" in aborted.stdout
    final = qvl("status", MODEL)
    assert final.returncode == 3 and "abort by operator" in final.stdout
