"""Replica settings become the right vLLM commands, environments and GPU layouts (no GPU needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qvl.cli import parse_command
from qvl.settings import ReplicaSettings
from serving.vllm_replica import (
    CPU_DEFAULTS,
    PlacementError,
    core_list,
    cpu_binding_env,
    detect_cpus,
    engine_flags,
    place,
    plan_replicas,
    served_name,
    split_cpus,
)


def flag_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_four_gpus_two_replicas_tensor_parallel_two(tmp_path: Path) -> None:
    spec = ReplicaSettings(
        model="/models/Qwen3-VL-8B-Instruct", tensor_parallel_size=2, gpu_memory_utilization=0.9, max_num_seqs=128
    )
    plans = plan_replicas(spec, spec.model or "", [9001, 9002], [0, 1, 2, 3], tmp_path, {"PATH": "/usr/bin"})
    assert [p.device for p in plans] == ["gpu", "gpu"]
    assert [p.gpus for p in plans] == [(0, 1), (2, 3)]
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in plans] == ["0,1", "2,3"]
    assert [p.cpus for p in plans] == [(), ()]  # GPU replicas keep vLLM's own thread settings
    assert "VLLM_CPU_OMP_THREADS_BIND" not in plans[0].env and "OMP_NUM_THREADS" not in plans[0].env
    first = plans[0].command
    assert first[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert flag_value(first, "--model") == "/models/Qwen3-VL-8B-Instruct"
    assert flag_value(first, "--served-model-name") == "Qwen3-VL-8B-Instruct"
    assert flag_value(first, "--port") == "9001" and flag_value(plans[1].command, "--port") == "9002"
    assert flag_value(first, "--tensor-parallel-size") == "2"
    assert flag_value(first, "--gpu-memory-utilization") == "0.9"
    assert flag_value(first, "--max-num-seqs") == "128"
    assert "--enforce-eager" not in first  # GPUs keep CUDA graphs unless asked
    assert "--kv-cache-memory-bytes" not in first
    env = plans[0].env
    assert env["PATH"] == "/usr/bin"
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["VLLM_CACHE_ROOT"].startswith(str(tmp_path / "replica-9001"))
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path / "replica-9001"))


def test_more_gpus_than_exist_is_refused_with_the_numbers() -> None:
    with pytest.raises(PlacementError, match=r"3 replica\(s\) x tensor parallel 2 need 6 GPUs, but 4 are available"):
        place(3, 2, [0, 1, 2, 3])
    assert place(2, 1, [4, 5, 6]) == [(4,), (5,)]


def test_cpu_replicas_get_working_defaults_and_no_gpus(tmp_path: Path) -> None:
    spec = ReplicaSettings(model="/m/tiny")
    (plan,) = plan_replicas(spec, "/m/tiny", [9100], [], tmp_path, {}, available_cpus=[0, 1])
    assert plan.cpus == (0, 1) and plan.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert plan.device == "cpu" and plan.gpus == () and plan.env["CUDA_VISIBLE_DEVICES"] == ""
    cmd = plan.command
    assert "--enforce-eager" in cmd
    assert flag_value(cmd, "--kv-cache-memory-bytes") == str(CPU_DEFAULTS["kv_cache_memory_bytes"])
    assert flag_value(cmd, "--max-num-seqs") == "16"
    assert flag_value(cmd, "--max-model-len") == "4096"
    assert "--gpu-memory-utilization" not in cmd
    assert json.loads(flag_value(cmd, "--limit-mm-per-prompt")) == {"image": 4, "video": 0}


def test_two_cpu_replicas_on_two_cores_get_one_core_each(tmp_path: Path) -> None:
    spec = ReplicaSettings(model="/m/tiny", device="cpu")
    # The launcher's own binding must not leak into every replica.
    base = {"OMP_NUM_THREADS": "8", "VLLM_CPU_OMP_THREADS_BIND": "0-7"}
    plans = plan_replicas(spec, "/m/tiny", [9101, 9102], [0], tmp_path, base, available_cpus=[0, 1])
    assert [p.cpus for p in plans] == [(0,), (1,)]
    assert [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in plans] == ["0", "1"]
    assert [p.env["OMP_NUM_THREADS"] for p in plans] == ["1", "1"]
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in plans[0].env  # vLLM applies it to its auto binding only


def test_cores_are_split_in_contiguous_even_blocks() -> None:
    assert split_cpus(2, [0, 1]) == [(0,), (1,)]
    assert split_cpus(2, [0, 1, 2, 3]) == [(0, 1), (2, 3)]
    assert split_cpus(2, [0, 1, 2, 3, 4]) == [(0, 1, 2), (3, 4)]  # the remainder goes to the first
    assert split_cpus(1, [4, 5, 6, 7]) == [(4, 5, 6, 7)]
    assert split_cpus(2, [1, 1, 3]) == [(1,), (3,)]  # a core named twice is one core
    assert core_list([0, 1, 2, 3, 6, 8, 9]) == "0-3,6,8-9"
    assert cpu_binding_env([2, 3]) == {"VLLM_CPU_OMP_THREADS_BIND": "2-3", "OMP_NUM_THREADS": "2"}
    assert cpu_binding_env([]) == {}
    assert detect_cpus() == sorted(os.sched_getaffinity(0))


def test_more_cpu_replicas_than_cores_is_refused_with_the_numbers(tmp_path: Path) -> None:
    with pytest.raises(PlacementError, match=r"3 CPU replica\(s\) need a core each, but 2 are available \(0-1\)"):
        plan_replicas(ReplicaSettings(device="cpu"), "/m", [1, 2, 3], [], tmp_path, {}, available_cpus=[0, 1])
    with pytest.raises(PlacementError, match=r"1 CPU replica\(s\) need a core each, but 0 are available \(none\)"):
        split_cpus(1, [])


def test_explicit_cpus_setting_and_gpu_replicas_ignore_it(tmp_path: Path) -> None:
    spec = ReplicaSettings(model="/m/tiny", device="cpu", cpus=[4, 5, 6, 7, 8, 9])
    plans = plan_replicas(spec, "/m/tiny", [9201, 9202, 9203], [], tmp_path, {})
    assert [p.env["VLLM_CPU_OMP_THREADS_BIND"] for p in plans] == ["4-5", "6-7", "8-9"]
    assert [p.env["OMP_NUM_THREADS"] for p in plans] == ["2", "2", "2"]
    on_gpus = ReplicaSettings(model="/m/tiny", cpus=[0])
    plans = plan_replicas(on_gpus, "/m/tiny", [9301, 9302], [0, 1], tmp_path, {})  # 2 GPU replicas, 1 core: fine
    assert [p.gpus for p in plans] == [(0,), (1,)] and [p.cpus for p in plans] == [(), ()]


def test_tensor_parallel_on_cpu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PlacementError, match="tensor parallelism needs GPUs"):
        plan_replicas(ReplicaSettings(tensor_parallel_size=2, device="cpu"), "/m", [1], [0, 1], tmp_path, {})


def test_explicit_settings_and_engine_args_pass_through() -> None:
    spec = ReplicaSettings(
        enable_prefix_caching=False,
        enforce_eager=False,
        dtype="bfloat16",
        quantization="fp8",
        mm_processor_cache_gb=4,
        kv_cache_memory_bytes=1 << 30,
        engine_args={
            "swap_space": 4,
            "disable_log_stats": True,
            "trust_remote_code": False,
            "speculative_config": {"method": "ngram"},
        },
    )
    flags = engine_flags(spec, "gpu")
    assert "--no-enable-prefix-caching" in flags and "--no-enforce-eager" in flags
    assert flag_value(flags, "--dtype") == "bfloat16" and flag_value(flags, "--quantization") == "fp8"
    assert flag_value(flags, "--mm-processor-cache-gb") == "4.0"
    assert flag_value(flags, "--kv-cache-memory-bytes") == str(1 << 30)
    assert flag_value(flags, "--swap-space") == "4"
    assert "--disable-log-stats" in flags and "--no-trust-remote-code" in flags
    assert flag_value(flags, "--speculative-config") == '{"method":"ngram"}'


def test_served_name_defaults_to_the_directory() -> None:
    assert served_name(ReplicaSettings(), "/models/Qwen3-VL-4B-Instruct/") == "Qwen3-VL-4B-Instruct"
    assert served_name(ReplicaSettings(served_model_name="shop-vl"), "/models/x") == "shop-vl"


def test_socket_dir_stays_short_enough_for_vllm_ipc_paths(tmp_path: Path) -> None:
    from serving.vllm_replica import socket_dir

    assert socket_dir(Path("/srv/qvl/.qvl-run/replica-9001")) == Path("/srv/qvl/.qvl-run/replica-9001/tmp")
    deep = Path("/tmp/pytest-of-root/pytest-36/test_qvl_up_with_vllm_answers_0/replica-35421")
    short = socket_dir(deep)
    assert len(str(short)) + 1 + 36 <= 107
    assert short == socket_dir(deep) and short != socket_dir(deep.with_name("replica-35422"))


def test_replicas_run_priority_scheduling_unless_told_fcfs(tmp_path: Path) -> None:
    # The router forwards class priorities; vLLM's own default (fcfs) would ignore them.
    (plan,) = plan_replicas(ReplicaSettings(model="/m/tiny"), "/m/tiny", [9100], [], tmp_path, {}, available_cpus=[0])
    assert flag_value(plan.command, "--scheduling-policy") == "priority"
    fcfs = ReplicaSettings(model="/m/tiny", scheduling_policy="fcfs")
    assert flag_value(engine_flags(fcfs, "gpu"), "--scheduling-policy") == "fcfs"
    _, settings = parse_command(["replica", "--scheduling-policy", "fcfs"])
    assert settings.replica.scheduling_policy == "fcfs"


def test_aliases_follow_the_main_name_in_served_model_name(tmp_path: Path) -> None:
    spec = ReplicaSettings(model="/models/Qwen3-VL-8B-Instruct", aliases=["qwen3-vl-8b@v2", "canary"])
    (plan,) = plan_replicas(spec, spec.model or "", [9100], [0], tmp_path, {})
    cmd = plan.command
    # vLLM's --served-model-name takes every following value; the first is the main name.
    start = cmd.index("--served-model-name") + 1
    assert cmd[start : start + 4] == ["Qwen3-VL-8B-Instruct", "qwen3-vl-8b@v2", "canary", "--host"]
    assert cmd.count("--served-model-name") == 1
    (plain,) = plan_replicas(ReplicaSettings(model="/m/tiny"), "/m/tiny", [9101], [0], tmp_path, {})
    assert plain.command[plain.command.index("--served-model-name") + 2] == "--host"
