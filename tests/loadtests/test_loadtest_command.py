"""`qvl loadtest` against `qvl up --engine sim`: each shipped workload for 20 s leaves a complete run folder
(records, scraped metrics, summary), the measured answer-cache hit ratio is close to the predicted one, an
SLO is judged (exit 4 when missed), a sweep finds the knee, local worker processes merge, and a run that
cannot be made says why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT
from support.loadtests import LIMITED_KEY, RECORD_FIELDS, loadtest_env, tiny_workload
from support.servers import Proc

from loadtests.runfolder import RunFolder
from loadtests.slo import parse_slo
from loadtests.summary import summarise_run

WORKLOADS = ROOT / "loadtests" / "workloads"
# What these runs leave behind is under test, not how precisely this shared 2-core machine keeps time while
# it also runs the cluster (and, on a developer's machine, anything else): a generous validity bound. The
# default, 10 ms, is for a load machine of its own; test_locust_run.py shows a late generator is caught.
LAG_BOUND = ("--max-send-lag-ms", "250")


def qvl_loadtest(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qvl", "loadtest", *args]
    return subprocess.run(
        argv, cwd=ROOT, env=env or loadtest_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


# (workload, rate, SLO, expected exit status): storefront's TTFT bound cannot be met (exit 4).
RUNS = [
    ("storefront", "8", "ttft_p99<=1ms,errors<=1%", 4),
    ("catalogue", "20", "e2e_p99<=30s,errors<=1%", 0),
    ("flash_sale", "15", "ttft_p99<=30s,itl_p99<=5s,errors<=1%", 0),
]


@pytest.mark.parametrize(("name", "rate", "slo", "status"), RUNS, ids=[r[0] for r in RUNS])
def test_a_shipped_workload_leaves_a_complete_run_folder(
    sim_router: Proc, tmp_path: Path, name: str, rate: str, slo: str, status: int
) -> None:
    out = tmp_path / name
    done = qvl_loadtest(
        *("--workload", str(WORKLOADS / f"{name}.yaml"), "--target", sim_router.url, "--rate", rate),
        *("--duration", "20s", "--slo", slo, "--out", str(out), "--scrape-interval", "1s", *LAG_BOUND),
    )
    output = done.stdout + done.stderr
    assert done.returncode == status, output[-3000:]
    assert f"workload {name}" in output and "expected answer-cache hit ratio" in output
    assert "qvl loadtest: " in output and "answered" in output  # the progress line
    assert "run valid" in output and ("SLO held" if status == 0 else "SLO MISSED: ttft_p99<=1ms") in output

    folder = RunFolder(out)
    for file in ("workload.yaml", "run.json", "records.jsonl", "metrics.jsonl", "summary.json", "locust_stats.csv"):
        assert (out / file).stat().st_size > 0, file
    lines = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert all(set(line) == RECORD_FIELDS for line in lines)
    meta = folder.meta()
    assert len(lines) == meta["planned_requests"] > 100  # every planned request was sent and answered
    assert all(line["status"] == 200 for line in lines), {line["error_type"] for line in lines}
    for line in lines:
        if line["stream"]:
            # A stream from the answer cache arrives at once: no gaps between its tokens to measure.
            gaps = 0 if line["cache"] == "hit" else line["output_tokens"] - 1
            assert line["ttft_ms"] > 0 and line["itl"]["count"] == gaps
        else:
            assert line["ttft_ms"] is None and line["itl"] is None

    # The summary on disk is the summary of the records on disk.
    records = folder.records()
    again = summarise_run(records, folder.process_summaries(), parse_slo(slo), 250.0)
    assert json.loads(again.to_json()) == folder.summary()
    assert folder.summary()["throughput_rps"] > 0 and folder.summary()["goodput_rps"] is not None

    # Answer cache: the share of requests served from it (hits, and repeats coalesced onto one in flight)
    # is within 5 points of the expectation printed before the run.
    served = sum(1 for r in records if r.cache in ("hit", "coalesced")) / len(records)
    predicted = meta["predicted"]["answer_cache_hit_ratio"]
    assert abs(served - predicted) <= 0.05, (served, predicted)

    # The router and both replicas were scraped through the run, with the engine's queue and cache counters.
    scrapes = folder.scrapes()
    sources = {s.source for s in scrapes if s.ok}
    assert "router" in sources and len(sources) == 3, sources
    replica = [s for s in scrapes if s.ok and s.source.startswith("replica")]
    assert len(replica) >= 2 * 15
    assert all(s.value("vllm:num_requests_waiting") is not None for s in replica)
    assert all(s.value("vllm:kv_cache_usage_perc") is not None for s in replica)
    by_source: dict[str, list[float]] = {}
    for s in replica:
        by_source.setdefault(s.source, []).append(s.value("vllm:mm_cache_queries_total") or 0.0)
    looked_up = sum(values[-1] - values[0] for values in by_source.values())
    assert looked_up >= sum(1 for r in records if r.cache not in ("hit", "coalesced")) * 0.9
    assert min(s.t_s for s in scrapes) < 1 and max(s.t_s for s in scrapes) >= 19  # on the records' clock


def test_a_sweep_reports_the_knee(sim_router: Proc, tmp_path: Path) -> None:
    # The catalogue's tenant sends with a key limited to 5 requests/s (a burst of 50): 2/s holds an error
    # SLO of 1%, 30/s does not (quota answers 429).
    env = {**loadtest_env(), "QVL_LOADTEST_KEY_INDEXER": LIMITED_KEY}
    out = tmp_path / "sweep"
    done = qvl_loadtest(
        *("sweep", "--workload", str(WORKLOADS / "catalogue.yaml"), "--target", sim_router.url, "--rates", "2,30"),
        *("--duration", "4s", "--slo", "errors<=1%", "--out", str(out), *LAG_BOUND),
        env=env,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    result = json.loads((out / "sweep.json").read_text())
    assert result["knee_rps"] == 2
    assert [(lv["rate"], lv["valid"], lv["slo_held"]) for lv in result["levels"]] == [
        (2, True, True),
        (30, True, False),
    ]
    assert "Knee (highest valid rate whose SLO held): **2 requests/s**" in (out / "sweep.md").read_text()
    high = RunFolder(out / "rate-30")
    assert high.summary()["errors_by_type"]["rate_limit_exceeded"] > 10
    assert high.meta()["rate"] == 30 and high.meta()["label"] == "30/s"


def test_local_worker_processes_split_the_schedule_and_merge(sim_router: Proc, tmp_path: Path) -> None:
    out = tmp_path / "two"
    done = qvl_loadtest(
        *("--workload", str(WORKLOADS / "storefront.yaml"), "--target", sim_router.url, "--rate", "8"),
        *("--duration", "8s", "--processes", "2", "--out", str(out), *LAG_BOUND),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    folder = RunFolder(out)
    assert [p.name for p in folder.record_files()] == ["records.w0.jsonl", "records.w1.jsonl"]
    records = folder.records()
    assert [r.index for r in records] == list(range(folder.meta()["planned_requests"]))
    assert {r.worker for r in records} == {0, 1}
    assert all(r.worker == r.index % 2 for r in records)
    assert folder.summary()["requests"] == len(records) and folder.summary()["valid"] is True
    assert sorted(s.worker for s in folder.process_summaries()) == [0, 1]


def test_a_run_that_cannot_be_made_says_why(sim_router: Proc, tmp_path: Path) -> None:
    storefront = str(WORKLOADS / "storefront.yaml")
    unreachable = qvl_loadtest("--workload", storefront, "--target", "http://127.0.0.1:9", "--out", str(tmp_path / "a"))
    assert unreachable.returncode == 1 and "cannot reach the router at http://127.0.0.1:9" in unreachable.stderr
    no_key = {k: v for k, v in loadtest_env().items() if k != "QVL_LOADTEST_KEY_APP"}
    missing = qvl_loadtest(
        "--workload", storefront, "--target", sim_router.url, "--out", str(tmp_path / "b"), env=no_key
    )
    assert missing.returncode == 2 and "tenant app: set QVL_LOADTEST_KEY_APP to its API key" in missing.stderr
    bad_slo = qvl_loadtest(
        "--workload", storefront, "--target", sim_router.url, "--slo", "ttft<=1s", "--out", str(tmp_path / "c")
    )
    assert bad_slo.returncode == 2 and "unknown metric 'ttft'" in bad_slo.stderr
    closed = qvl_loadtest(
        "--workload", storefront, "--target", sim_router.url, "--rate", "0", "--out", str(tmp_path / "d")
    )
    assert closed.returncode == 2 and "the rate must be positive" in closed.stderr
    used = tmp_path / "used"
    used.mkdir()
    (used / "records.jsonl").write_text("")
    taken = qvl_loadtest("--workload", storefront, "--target", sim_router.url, "--out", str(used))
    assert taken.returncode == 2 and "is not empty" in taken.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


CLOSED = tiny_workload("{process: closed, users: 2, think_s: 0.05, requests: 30}")


def test_a_closed_loop_runs_until_its_requests_are_done(sim_router: Proc, tmp_path: Path) -> None:
    workload = tmp_path / "closed.yaml"
    workload.write_text(CLOSED)
    out = tmp_path / "closed"
    done = qvl_loadtest("--workload", str(workload), "--target", sim_router.url, "--users", "3", "--out", str(out))
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "run valid: a closed loop (no schedule to fall behind)" in output
    folder = RunFolder(out)
    assert [r.index for r in folder.records()] == list(range(30))
    assert folder.meta()["users"] == 3 and folder.meta()["rate"] is None
    assert "users: 3" in (out / "workload.yaml").read_text()
