"""locust drives a workload against `qvl up --engine sim`: records, TTFT/ITL entries in locust's CSV, and
the INVALID verdict (exit 3) when the generator cannot keep to the schedule. Locust runs in a subprocess:
importing it would monkey-patch this test process with gevent."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

from support import ROOT
from support.loadtests import LOCUST, RECORD_FIELDS, loadtest_env, tiny_workload
from support.servers import Proc

from qvl.procs import free_port

# The runs here check what a run records, not how precisely this shared 2-core machine keeps time: their
# validity bound is generous (the default, 10 ms, is for real load machines). The overloaded run lags by
# seconds and is invalid under either bound.
TEST_MAX_SEND_LAG_MS = "100"


def locust(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    bound = () if "--max-send-lag-ms" in args else ("--max-send-lag-ms", TEST_MAX_SEND_LAG_MS)
    argv = [str(LOCUST), "-f", "loadtests/locustfile.py", "--headless", "--only-summary", *bound, *args]
    env = loadtest_env()
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_storefront_run_writes_records_and_ttft_itl_entries(sim_router: Proc, tmp_path: Path) -> None:
    records = tmp_path / "storefront.jsonl"
    done = locust(
        *("-u", "8", "-r", "8", "-t", "15s", "--host", sim_router.url),
        *(
            "--workload",
            "loadtests/workloads/storefront.yaml",
            "--records",
            str(records),
            "--csv",
            str(tmp_path / "sf"),
        ),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "run valid" in output

    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert len(lines) > 60, f"only {len(lines)} requests in 15 s at 8/s"
    assert all(set(line) == RECORD_FIELDS for line in lines)
    assert all(line["status"] == 200 and line["error_type"] is None for line in lines)
    assert {line["tenant"] for line in lines} == {"web", "app"}
    # Answers from the router's answer cache say `cache` (the cluster is shared with the other load tests,
    # whose greedy captions may be stored already); the rest came from both replicas.
    replicas = {line["replica"] for line in lines} - {"cache"}
    assert None not in replicas and len(replicas) == 2, replicas
    for line in lines:
        assert line["stream"] and line["ttft_ms"] > 0 and line["e2e_ms"] >= line["ttft_ms"]
        # A stream from the answer cache arrives at once: one chunk, no gaps between tokens to measure.
        gaps = 0 if line["cache"] == "hit" else line["output_tokens"] - 1
        assert line["itl"]["count"] == gaps and line["output_tokens"] > 1, line
        assert line["send_lag_ms"] is not None and line["image_tokens"] > 0 and line["prompt_tokens"] > 0
        assert line["cache"] in ("miss", "hit", "coalesced", "bypass", "none")

    with (tmp_path / "sf_stats.csv").open() as f:
        types = {(row["Type"], row["Name"]) for row in csv.DictReader(f)}
    assert {("POST", "question"), ("TTFT", "question"), ("ITL", "question")} <= types

    summary = json.loads((tmp_path / "storefront.summary.json").read_text())
    assert summary["valid"] is True and summary["requests"] == len(lines) and summary["errors"] == 0
    assert summary["send_lag_p99_ms"] <= 10 and summary["ttft_p99_ms"] >= summary["ttft_p50_ms"] > 0


OVERLOAD = tiny_workload("{process: constant, rate: 400, duration_s: 3}")


def test_a_generator_that_falls_behind_makes_the_run_invalid(sim_router: Proc, tmp_path: Path) -> None:
    workload = tmp_path / "overload.yaml"
    workload.write_text(OVERLOAD)
    records = tmp_path / "overload.jsonl"
    done = locust(
        *("-u", "1", "-r", "1", "-t", "4s", "--host", sim_router.url, "--max-send-lag-ms", "10"),
        *("--workload", str(workload), "--records", str(records)),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 3, output[-3000:]
    assert "run INVALID: the generator fell behind (P99 send lag" in output and "> 10 ms)" in output
    summary = json.loads((tmp_path / "overload.summary.json").read_text())
    assert summary["valid"] is False and summary["send_lag_p99_ms"] > 10
    assert len(records.read_text().splitlines()) == summary["requests"] > 0


def test_distributed_workers_split_the_schedule(sim_router: Proc, tmp_path: Path) -> None:
    port = str(free_port())
    records = tmp_path / "dist.jsonl"
    argv = [str(LOCUST), "-f", "loadtests/locustfile.py", "--worker", "--master-port", port]
    env = loadtest_env()
    workers = [
        subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    try:
        done = locust(
            *("--master", "--master-bind-port", port, "--expect-workers", "2"),
            *("-u", "8", "-r", "8", "-t", "10s", "--host", sim_router.url, "--render-ahead-s", "10"),
            *("--workload", "loadtests/workloads/storefront.yaml", "--records", str(records)),
        )
    finally:
        for worker in workers:
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("qvl: run valid") == 2, output[-3000:]
    indices = [
        [json.loads(line)["index"] for line in (tmp_path / f"dist.w{i}.jsonl").read_text().splitlines()] for i in (0, 1)
    ]
    assert len(indices[0]) >= 5 and len(indices[1]) >= 5, indices
    assert all(i % 2 == 0 for i in indices[0]) and all(i % 2 == 1 for i in indices[1])


def test_a_finished_schedule_ends_the_run_with_every_request_sent(sim_router: Proc, tmp_path: Path) -> None:
    workload = tmp_path / "short.yaml"
    workload.write_text(tiny_workload("{process: constant, rate: 10, duration_s: 2}"))
    records = tmp_path / "short.jsonl"
    done = locust(
        *("-u", "4", "-r", "4", "-t", "30s", "--host", sim_router.url),
        *("--workload", str(workload), "--records", str(records)),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "qvl: the schedule is done" in output
    assert sorted(json.loads(line)["index"] for line in records.read_text().splitlines()) == list(range(20))


def test_a_closed_loop_sends_every_request_without_a_schedule(sim_router: Proc, tmp_path: Path) -> None:
    workload = tmp_path / "closed.yaml"
    closed = "{process: closed, users: 3, think_s: 0.05, requests: 30}"
    workload.write_text(tiny_workload(closed))
    records = tmp_path / "closed.jsonl"
    done = locust(
        *("-u", "3", "-r", "3", "-t", "30s", "--host", sim_router.url),
        *("--workload", str(workload), "--records", str(records)),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("qvl: the schedule is done") == 1 and "run valid: P99 send lag n/a (closed loop)" in output
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(30))
    assert all(line["intended_s"] is None and line["send_lag_ms"] is None and line["sent_s"] >= 0 for line in lines)
