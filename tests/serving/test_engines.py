"""The engine registry: one entry per engine name, and the commands each gives a launcher (no engine started)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml

from qvl.procs import StartError
from qvl.settings import EngineName, Settings, load_settings
from serving.engines import ENGINES
from serving.tiny_model import SERVED_NAME
from serving.vllm_replica import PlacementError


def settings(**sections: dict[str, object]) -> Settings:
    return load_settings(None, sections)


def flag_value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_every_engine_name_is_registered_once() -> None:
    assert sorted(ENGINES) == sorted(get_args(EngineName))


def test_sim_runs_qvl_sim_with_the_launchers_settings(tmp_path: Path) -> None:
    sim = ENGINES["sim"]
    conf = sim.with_model(settings(sim={"step_base_ms": 7}), "shop-vl")
    assert sim.served_model(conf) == "shop-vl"
    local = sim.local(conf, 3)
    assert local.gpus == [(), (), ()] and local.cpus == [(), (), ()]  # the simulator binds nothing
    assert local.log_name is None and not local.gpu_exporter
    assert local.host == "127.0.0.1" and local.startup_timeout_s == conf.up.ready_timeout_s

    command = sim.command(conf, "10.0.0.5", 9100, (), tmp_path / "replica")
    assert command.argv[:4] == [sys.executable, "-m", "qvl", "sim"]
    assert flag_value(command.argv, "--host") == "10.0.0.5" and flag_value(command.argv, "--port") == "9100"
    written = yaml.safe_load(Path(flag_value(command.argv, "--config")).read_text())
    assert written["sim"]["model"] == "shop-vl" and written["sim"]["step_base_ms"] == 7
    assert "api_keys" not in written
    assert command.summary == "simulated engine"


def test_vllm_on_the_gpus_it_is_given(tmp_path: Path) -> None:
    model = tmp_path / "Qwen3-VL-8B-Instruct"
    model.mkdir()
    vllm = ENGINES["vllm"]
    conf = vllm.with_model(settings(replica={"tensor_parallel_size": 2, "gpus": [4, 5, 6, 7]}), str(model))
    assert vllm.served_model(conf) == "Qwen3-VL-8B-Instruct"
    local = vllm.local(conf, 2)
    assert local.gpus == [(4, 5), (6, 7)] and local.cpus == [(), ()]
    assert local.log_name == "vllm.log" and local.gpu_exporter
    assert local.startup_timeout_s == max(conf.up.ready_timeout_s, conf.replica.startup_timeout_s)

    workdir = tmp_path / "replica-9001"
    command = vllm.command(conf, "10.0.0.5", 9001, (6, 7), workdir)
    assert command.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert flag_value(command.argv, "--model") == str(model)
    assert flag_value(command.argv, "--served-model-name") == "Qwen3-VL-8B-Instruct"
    assert flag_value(command.argv, "--host") == "10.0.0.5" and flag_value(command.argv, "--port") == "9001"
    assert command.env["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert Path(command.env["TMPDIR"]).is_dir() and workdir.is_dir()
    assert command.summary == "vLLM on GPUs 6,7" and command.cpus == ()


def test_vllm_on_the_cpu_and_its_refusals(tmp_path: Path) -> None:
    vllm = ENGINES["vllm"]
    model = tmp_path / "m"
    model.mkdir()
    cpu = settings(replica={"model": str(model), "device": "cpu", "gpus": [0, 1], "cpus": [0, 1]})
    assert vllm.local(cpu, 2).gpus == [(), ()] and vllm.local(cpu, 2).cpus == [(0,), (1,)]
    command = vllm.command(cpu, "127.0.0.1", 9002, (0,), tmp_path / "w")  # Ray may place GPUs; device cpu wins
    assert command.env["CUDA_VISIBLE_DEVICES"] == "" and command.summary == "vLLM on the CPU"  # Ray: vLLM's binding
    assert "VLLM_CPU_OMP_THREADS_BIND" not in command.env and command.cpus == ()
    bound = vllm.command(cpu, "127.0.0.1", 9004, (), tmp_path / "b", (1,))
    assert bound.summary == "vLLM on CPU cores 1" and bound.cpus == (1,)
    assert bound.env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and bound.env["OMP_NUM_THREADS"] == "1"
    with pytest.raises(PlacementError, match=r"3 CPU replica\(s\) need a core each, but 2 are available \(0-1\)"):
        vllm.local(cpu, 3)
    with pytest.raises(PlacementError, match="tensor parallelism needs GPUs"):
        vllm.local(settings(replica={"device": "cpu", "tensor_parallel_size": 2}), 1)
    with pytest.raises(PlacementError, match="need 4 GPUs, but 1 are available"):
        vllm.local(settings(replica={"tensor_parallel_size": 2, "gpus": [0]}), 2)
    missing = settings(replica={"model": str(tmp_path / "nowhere")})
    with pytest.raises(StartError, match=r"does not exist on .* \(models are never downloaded\)"):
        vllm.command(missing, "127.0.0.1", 9003, (), tmp_path / "x")


def test_without_a_model_vllm_serves_the_tiny_model_by_its_name() -> None:
    vllm = ENGINES["vllm"]
    assert vllm.served_model(settings()) == SERVED_NAME  # named without building it
    assert vllm.served_model(settings(replica={"served_model_name": "shop"})) == "shop"
