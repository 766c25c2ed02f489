"""`qvl plan calibrate | validate | size | verify` end to end through the command line. Simulated replicas
whose costs the test chose (and the planner does not know) stand as "the real replicas"; one short
calibration runs on real vLLM replicas of the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.planner import make_profile
from support.servers import Cluster, Proc
from support.vllm import MAX_NUM_SEQS, VllmPair

from loadtests.planner.validate import validation_levels
from loadtests.workload import load_workload
from serving.sim.profile import CapacityProfile, load_profile, write_profile

ROOT = Path(__file__).resolve().parents[2]
CALIBRATION = ROOT / "loadtests" / "workloads" / "calibration.yaml"
HIDDEN = {
    "step_base_ms": 15.0,
    "per_decode_ms": 1.5,
    "prefill_base_ms": 30.0,
    "per_text_token_ms": 0.1,
    "per_image_token_ms": 0.2,
    "image_hit_discount": 0.8,
}
MAX_RUNNING = 8
MM_CACHE_ITEMS = 40
SLO = "ttft_p99<=1.5s,errors<=1%"
BOUNDS = "ttft_p50=20%,itl_p50=10%,e2e_p50=10%,ttft_p99=40%,bursty_ttft_p99=25%"
"""The validation bounds of these tests (see test_validation_passes_and_a_wrong_profile_fails_and_is_refused)."""
ENV = {**os.environ, "QVL_LOADTEST_KEY": "unused", "PYTHONUNBUFFERED": "1"}


def qvl_plan(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qvl", "plan", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def hidden_profile() -> CapacityProfile:
    return make_profile(max_running=MAX_RUNNING, mm_cache_items=MM_CACHE_ITEMS, **HIDDEN)


@pytest.fixture(scope="module")
def hidden(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Path]]:
    """Two simulated replicas running costs the planner must find, behind a real router."""
    tmp = tmp_path_factory.mktemp("hidden")
    write_profile(hidden_profile(), tmp / "hidden.yaml")
    cluster = Cluster(tmp)
    try:
        up = cluster.start(
            "up", "--engine", "sim", "--profile", str(tmp / "hidden.yaml"), "--replicas", "2", "--cache", "off",
            ready_path="/ready",
        )  # fmt: skip
        yield up, tmp
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def calibrated(hidden: tuple[Proc, Path]) -> Path:
    up, tmp = hidden
    out = tmp / "plan" / "profile.yaml"
    done = qvl_plan(
        "calibrate", "--target", up.url, "--workload", str(CALIBRATION), "--out", str(out),
        "--rates", "1,2,3,4,6,8", "--level-duration", "15s", "--max-running", str(MAX_RUNNING),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_calibration_recovers_every_hidden_cost_within_10_percent(calibrated: Path) -> None:
    profile = load_profile(calibrated)
    costs = profile.costs
    for name, value in HIDDEN.items():
        fitted = getattr(costs, name).value
        assert fitted == pytest.approx(value, rel=0.10), (name, fitted, value)
    # No KV term was hidden: what the fit gives it adds under 5 % to a step at 2,000 cached tokens.
    assert costs.per_kv_ktoken_ms.value * 2 <= 0.05 * HIDDEN["step_base_ms"]
    for name in HIDDEN:
        estimate = getattr(costs, name)
        assert estimate.low <= estimate.value <= estimate.high
    assert profile.engine.max_running == MAX_RUNNING
    calibration = json.loads((calibrated.parent / "calibration.json").read_text())
    low, high = calibration["limits"]["mm_cache_items_consistent"]
    assert profile.engine.mm_cache_items == low <= MM_CACHE_ITEMS <= (high or MM_CACHE_ITEMS)
    assert profile.tokens.natural_output_tokens is None  # the hidden profile's replicas answer to max_tokens
    assert profile.fitted_on.rates == [1, 2, 3, 4, 6, 8]
    assert profile.fitted_on.engine == "sim" and profile.fitted_on.replicas == 2
    assert len(calibration["runs"]) == 6 and calibration["requests"] == profile.fitted_on.requests


def test_validation_passes_and_a_wrong_profile_fails_and_is_refused(
    hidden: tuple[Proc, Path], calibrated: Path
) -> None:
    up, tmp = hidden
    # 45 s levels (about 150 answers at 3.5 req/s): at 30 s the P50 TTFT of a moderate level, which sits
    # between "found the replica idle" and "waited for a step", missed the same model's by 2 % to 13 %.
    # The P50 and P99 TTFT bounds are twice the defaults: under the whole suite on a shared two-core machine,
    # the measured P50 TTFT of a level swings by about 10 % from run to run (10.8 % in one CI run), while a
    # profile 1.6 times too slow misses by far more; the benchmark reports the errors at the defaults.
    validation = tmp / "plan" / "validation"
    done = qvl_plan(
        "validate", "--target", up.url, "--profile", str(calibrated), "--workload", str(CALIBRATION),
        "--slo", SLO, "--out", str(validation), "--level-duration", "45s", "--bounds", BOUNDS,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((validation / "validation.json").read_text())
    assert report["passed"] and {lv["kind"] for lv in report["levels"]} == {"between", "above", "bursty"}
    assert load_profile(calibrated).validation is not None

    wrong = tmp / "plan" / "wrong.yaml"
    data = yaml.safe_load(calibrated.read_text())
    data.pop("validation")
    for name in ("step_base_ms", "prefill_base_ms", "per_image_token_ms"):
        data["costs"][name] = {k: 1.6 * v for k, v in data["costs"][name].items()}
    wrong.write_text(yaml.safe_dump(data))
    done = qvl_plan(
        "validate", "--reuse", str(validation), "--profile", str(wrong), "--workload", str(CALIBRATION),
        "--slo", SLO, "--out", str(tmp / "plan" / "validation-wrong"), "--level-duration", "15s",
        "--bounds", BOUNDS,
    )  # fmt: skip
    assert done.returncode == 5, done.stderr[-3000:]
    assert "ttft_p50 error" in done.stderr and "over its bound 20%" in done.stderr

    sizing = ("--workload", str(CALIBRATION), "--slo", SLO, "--peak-rate", "12", "--duration", "60s")
    sizing += ("--bounds", BOUNDS)
    refused = qvl_plan("size", "--profile", str(wrong), *sizing, "--out", str(tmp / "size-wrong"))
    assert refused.returncode == 5 and "refusing to recommend" in refused.stderr
    assert not (tmp / "size-wrong" / "sizing.json").exists()
    sized = qvl_plan("size", "--profile", str(calibrated), *sizing, "--no-what-if", "--out", str(tmp / "size"))
    assert sized.returncode == 0, sized.stderr[-3000:]
    answer = json.loads((tmp / "size" / "sizing.json").read_text())
    assert answer["validated"] and answer["replicas"] >= 2 and answer["headroom_replicas"] > answer["replicas"]


def test_validation_levels_sit_between_and_above_the_calibration_rates_once_each() -> None:
    workload = load_workload(CALIBRATION)
    names = [name for name, _, _ in validation_levels(workload, [1, 2, 3, 4], 30)]
    assert names == ["between 2.45", "between 3.46", "above 4.6", "bursty 3"]
    # Two rates: the middle and the upper pair are the same pair, so its level comes once.
    assert [name for name, _, _ in validation_levels(workload, [1, 2], 30)] == ["between 1.41", "above 2.3", "bursty 2"]


def test_a_level_whose_generator_fell_behind_is_measured_once_more(cluster: Cluster, tmp_path: Path) -> None:
    # A send-lag bound of 0 ms makes every run INVALID, as a generator on a busy machine would: each level is
    # measured a second time, and a second INVALID run fails the validation (exit 5) saying so.
    profile = tmp_path / "profile.yaml"
    write_profile(hidden_profile(), profile)
    up = cluster.start("up", "--engine", "sim", "--replicas", "1", "--cache", "off", ready_path="/ready")
    out = tmp_path / "validation"
    done = qvl_plan(
        "validate", "--target", up.url, "--profile", str(profile), "--workload", str(CALIBRATION), "--slo", SLO,
        "--out", str(out), "--rates", "1,2,3,4", "--level-duration", "3s", "--max-send-lag-ms", "0",
    )  # fmt: skip
    assert done.returncode == 5, done.stderr[-3000:]
    report = json.loads((out / "validation.json").read_text())
    names = [level["name"] for level in report["levels"]]
    assert len(names) == 4 and done.stderr.count("once more") == 4, done.stderr[-3000:]
    for level in report["levels"]:
        first = out / level["name"].replace(" ", "-")
        assert level["folder"] == str(first) + "-again" and not level["valid"]
        assert (first / "workload.yaml").exists() and (Path(level["folder"]) / "workload.yaml").exists()
    assert sum("INVALID" in failure for failure in report["failures"]) == 4


def test_verify_holds_at_n_fails_at_n_minus_1_and_virtual_time_agrees(tmp_path: Path) -> None:
    # 60 s runs (about 480 requests): a P99 of 30 s (240 requests) is the third-highest value, and differed
    # from virtual time's by 5 % in one run and 26 % in the next.
    profile = tmp_path / "profile.yaml"
    write_profile(hidden_profile(), profile)
    common = ("--profile", str(profile), "--workload", str(CALIBRATION), "--slo", SLO)
    sized = qvl_plan("size", *common, "--peak-rate", "8", "--duration", "60s", "--no-what-if", "--unvalidated",
                     "--out", str(tmp_path / "size"))  # fmt: skip
    assert sized.returncode == 0, sized.stderr[-3000:]
    n = json.loads((tmp_path / "size" / "sizing.json").read_text())["replicas"]
    assert n == 2  # the rate is chosen so that one replica is not enough and two are: 2 real-time replicas
    done = qvl_plan("verify", *common, "--rate", "8", "--replicas", str(n), "--duration", "60s",
                    "--out", str(tmp_path / "verify"))  # fmt: skip
    result = json.loads((tmp_path / "verify" / "verify.json").read_text())
    assert done.returncode == 0, (done.stderr[-3000:], result["failures"])
    at_n, below = result["runs"]
    assert at_n["replicas"] == n and at_n["slo_held"] and at_n["predicted_slo_held"]
    assert below["replicas"] == n - 1 and not below["slo_held"] and not below["predicted_slo_held"]
    for name, bound in (("ttft_p50", 0.10), ("itl_p50", 0.10), ("e2e_p50", 0.10), ("ttft_p99", 0.20)):
        assert at_n["error"][name] <= bound, (name, at_n["error"])


@pytest.mark.vllm
def test_a_short_calibration_on_real_vllm_gives_a_profile_the_simulator_loads(
    cluster: Cluster, vllm_pair: VllmPair, tmp_path: Path
) -> None:
    args = ["router"]
    for replica in vllm_pair.replicas:
        args += ["--replica", replica.url]
    router = cluster.start(*args, "--cache", "off", ready_path="/ready")
    out = tmp_path / "profile.yaml"
    done = qvl_plan(
        "calibrate", "--target", router.url, "--workload", str(CALIBRATION), "--out", str(out),
        "--rates", "1,2", "--level-duration", "20s", "--max-running", str(MAX_NUM_SEQS), "--bootstrap", "50",
        timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    profile = load_profile(out)
    assert profile.fitted_on.engine == "vllm" and profile.fitted_on.engine_version.startswith("0.")
    assert profile.tokens.image_max_pixels == pytest.approx(448 * 448, rel=0.15)  # the tiny model's cap
    assert profile.costs.step_base_ms.value + profile.costs.per_decode_ms.value > 0
    sim = cluster.start("sim", "--profile", str(out), "--model", "tiny")
    assert sim.url  # it started with the profile: `qvl sim` checks a profile before it serves
