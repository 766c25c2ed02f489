"""`qvl gpu-exporter`: real processes scraped over HTTP, against this machine's missing NVML and against a
substitute `pynvml` (tests/serving/fake_nvml) whose values and faults the test sets in a JSON file; against a
real NVML in tests/gpu."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import ROOT
from support.nvml import nvml_works
from support.servers import Cluster, Proc

from qvl.procs import free_port, spawn
from qvl.settings import GpuExporterSettings, load_settings
from serving.gpu_exporter import GpuCollector, Nvml, exporter_command

FAKE_DIR = Path(__file__).resolve().parent / "fake_nvml"
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]

H100 = {
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-0b5e4f3a-1111-2222-3333-444455556666",
    "utilization": 37,
    "memory_used": 1_234_567_890,
    "memory_total": 85_520_809_984,
    "temperature": 41,
    "power_mw": 123_456,
    "power_limit_mw": 700_000,
}
# The second board does not report power draw.
L4 = {
    "name": "NVIDIA L4",
    "uuid": "GPU-7c8d9e0f-aaaa-bbbb-cccc-ddddeeeeffff",
    "utilization": 0,
    "memory_used": 0,
    "memory_total": 24_152_899_584,
    "temperature": 30,
    "power_mw": 1,
    "power_limit_mw": 72_000,
    "errors": {"power": 3},
}


def parse(text: str) -> Series:
    """Every sample as {(name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(gpu: str, board: dict[str, Any], host: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"gpu": gpu, "uuid": board["uuid"], "host": host, "name": board["name"]}.items()))


def expected(host: str) -> Series:
    series: Series = {("qvl_gpu_exporter_up", (("host", host),)): 1.0}
    for gpu, board in (("0", H100), ("1", L4)):
        ls = labels(gpu, board, host)
        series[("qvl_gpu_utilization_ratio", ls)] = board["utilization"] / 100
        series[("qvl_gpu_memory_used_bytes", ls)] = float(board["memory_used"])
        series[("qvl_gpu_memory_total_bytes", ls)] = float(board["memory_total"])
        series[("qvl_gpu_temperature_celsius", ls)] = float(board["temperature"])
        series[("qvl_gpu_power_limit_watts", ls)] = board["power_limit_mw"] / 1000
    series[("qvl_gpu_power_watts", labels("0", H100, host))] = 123.456
    return series


def scrape(proc: Proc) -> Series:
    return parse(httpx.get(proc.url + "/metrics", timeout=5).text)


def down(host: str) -> Series:
    return {("qvl_gpu_exporter_up", (("host", host),)): 0.0}


def write_state(path: Path, gpus: list[dict[str, Any]], init_error: int | None = None) -> None:
    path.write_text(json.dumps({"init_error": init_error, "gpus": gpus}))


def events(state: Path) -> list[str]:
    events_file = state.with_name(state.name + ".events")
    return events_file.read_text().split() if events_file.exists() else []


@pytest.fixture
def fake_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The processes this test starts import the fake pynvml; returns its state file (two GPUs)."""
    state = tmp_path / "nvml.json"
    write_state(state, [H100, L4])
    monkeypatch.setenv("FAKE_NVML_STATE", str(state))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_DIR), os.environ.get("PYTHONPATH")])))
    return state


def test_without_nvml_it_serves_up_0_and_warns_once(cluster: Cluster) -> None:
    if nvml_works():
        pytest.skip("this host has NVML; tests/gpu covers it")
    exporter = cluster.start("gpu-exporter", ready_path="/metrics")
    host = socket.gethostname()
    for _ in range(5):
        assert scrape(exporter) == down(host)
    assert "qvl_gpu_utilization_ratio" not in httpx.get(exporter.url + "/metrics", timeout=5).text
    warnings = [line for line in exporter.output().splitlines() if "exporting qvl_gpu_exporter_up 0" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    assert exporter.popen.poll() is None


def test_two_gpus_exact_series_read_at_each_scrape(cluster: Cluster, fake_env: Path) -> None:
    exporter = cluster.start("gpu-exporter", "--node-name", "node-a", ready_path="/metrics")
    for _ in range(3):
        assert scrape(exporter) == expected("node-a")
    skipped = [line for line in exporter.output().splitlines() if "cannot read power" in line]
    assert len(skipped) == 1 and "GPU 1" in skipped[0] and "NVMLError_NotSupported" in skipped[0]

    write_state(fake_env, [{**H100, "utilization": 100, "temperature": 77}, L4])
    series = scrape(exporter)
    assert series[("qvl_gpu_utilization_ratio", labels("0", H100, "node-a"))] == 1.0
    assert series[("qvl_gpu_temperature_celsius", labels("0", H100, "node-a"))] == 77.0

    os.kill(exporter.popen.pid, signal.SIGTERM)
    assert exporter.popen.wait(10) == 0
    assert events(fake_env) == ["init", "shutdown"]


def test_a_lost_gpu_turns_the_scrape_into_up_0(cluster: Cluster, fake_env: Path) -> None:
    exporter = cluster.start("gpu-exporter", "--node-name", "node-b", ready_path="/metrics")
    assert scrape(exporter)[("qvl_gpu_exporter_up", (("host", "node-b"),))] == 1.0
    write_state(fake_env, [H100, {**L4, "errors": {"temperature": 15}}])
    for _ in range(3):  # nvmlInit is not retried within 60 s, so it stays down
        assert scrape(exporter) == down("node-b")
    assert events(fake_env) == ["init", "shutdown"]
    lost = [line for line in exporter.output().splitlines() if "NVML lost" in line]
    assert len(lost) == 1 and "NVMLError_GpuIsLost" in lost[0]


def test_nvml_init_failure_serves_up_0(cluster: Cluster, fake_env: Path) -> None:
    write_state(fake_env, [H100, L4], init_error=9)
    exporter = cluster.start("gpu-exporter", "--node-name", "node-c", ready_path="/metrics")
    for _ in range(3):
        assert scrape(exporter) == down("node-c")
    warnings = [line for line in exporter.output().splitlines() if "nvmlInit failed" in line]
    assert len(warnings) == 1 and "NVMLError_DriverNotLoaded: Driver Not Loaded" in warnings[0]
    assert events(fake_env) == ["init"]


# In-process: the collector with the fake module and a clock the test moves.


def fake_module() -> Nvml:
    spec = importlib.util.spec_from_file_location("fake_pynvml", FAKE_DIR / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return cast(Nvml, module)


def collected(collector: GpuCollector) -> Series:
    registry = CollectorRegistry()
    registry.register(collector)
    return parse(generate_latest(registry).decode())


def test_init_is_retried_at_most_every_60_s_and_a_late_driver_is_picked_up(
    fake_env: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_state(fake_env, [H100, L4], init_error=9)
    now = [1000.0]
    nvml = fake_module()
    collector = GpuCollector("h", load=lambda: nvml, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="qvl.gpu_exporter"):
        assert collected(collector) == down("h")
        now[0] += 59
        assert collected(collector) == down("h")
        assert events(fake_env) == ["init"]
        now[0] += 2
        assert collected(collector) == down("h")
        assert events(fake_env) == ["init", "init"]
        write_state(fake_env, [H100, L4])  # the driver is loaded now
        assert collected(collector) == down("h")  # not before the next 60 s are up
        now[0] += 60
        assert collected(collector) == expected("h")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "nvmlInit failed (NVMLError_DriverNotLoaded",
        "GPU 1",
    ]
    collector.close()
    assert events(fake_env) == ["init", "init", "init", "shutdown"]


def test_missing_pynvml_is_up_0(caplog: pytest.LogCaptureFixture) -> None:
    def missing() -> Nvml:
        raise ImportError("No module named 'pynvml'")

    collector = GpuCollector("h", load=missing, retry_s=0)
    with caplog.at_level(logging.WARNING, logger="qvl.gpu_exporter"):
        for _ in range(3):
            assert collected(collector) == down("h")
    assert len(caplog.records) == 1 and "install nvidia-ml-py" in caplog.records[0].getMessage()
    collector.close()


def test_after_a_lost_gpu_nvml_comes_back_on_the_next_init(fake_env: Path) -> None:
    now = [0.0]
    collector = GpuCollector("h", load=fake_module, clock=lambda: now[0])
    assert collected(collector) == expected("h")
    write_state(fake_env, [{**H100, "errors": {"memory": 15}}, L4])
    assert collected(collector) == down("h")
    write_state(fake_env, [H100, L4])
    now[0] += 60
    assert collected(collector) == expected("h")
    collector.close()
    assert events(fake_env) == ["init", "shutdown", "init", "shutdown"]


# What the launchers start.


def test_the_launcher_command_serves_the_settings(tmp_path: Path, fake_env: Path) -> None:
    settings = GpuExporterSettings(port=free_port(), node_name="rack1-gpu3")
    command = exporter_command(settings, "warning")
    assert command == [
        sys.executable,
        "-m",
        "qvl",
        "gpu-exporter",
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.port),
        "--node-name",
        "rack1-gpu3",
        "--log-level",
        "warning",
    ]
    assert "--node-name" not in exporter_command(GpuExporterSettings(), "info")
    url = f"http://127.0.0.1:{settings.port}"
    proc = spawn("gpu-exporter", command, url=url, log=tmp_path / "exporter.log", cwd=ROOT)
    try:
        proc.wait_ready(30, "/metrics", interval_s=0.05)
        assert scrape(proc) == expected("rack1-gpu3")
    finally:
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.popen.wait(10) == 0


def test_settings_from_env_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = load_settings()
    assert (defaults.gpu_exporter.host, defaults.gpu_exporter.port, defaults.gpu_exporter.node_name) == (
        "127.0.0.1",
        9835,
        "",
    )
    assert defaults.up.gpu_exporter is True
    monkeypatch.setenv("QVL_GPU_EXPORTER__PORT", "9911")
    monkeypatch.setenv("QVL_UP__GPU_EXPORTER", "false")
    env = load_settings(overrides={"gpu_exporter": {"node_name": "n"}})
    assert (env.gpu_exporter.port, env.gpu_exporter.node_name, env.up.gpu_exporter) == (9911, "n", False)
