"""The engine registry: what a launcher needs to start a replica of each engine, by name.

An `Engine` turns the settings into the command and environment of one replica on a host, port and set
of GPUs (or CPU cores), and says which model that replica serves. The local launcher (`qvl up`) and the Ray supervisor
look engines up in `ENGINES` (keyed by the `EngineName` of the settings) and never branch on the name.

- `vllm`: `python -m vllm.entrypoints.openai.api_server` (serving/vllm_replica.py); without a model
  setting it serves the tiny test model, built on first use under `replica.run_dir`.
- `sim`: `python -m qvl sim --config FILE` (serving/sim/), its settings written into the replica's workdir.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

import yaml

from qvl.procs import StartError
from qvl.settings import EngineName, PoolSettings, Settings
from serving.tiny_model import SERVED_NAME, ensure_tiny_model
from serving.vllm_replica import core_list, cpu_layout, detect_cpus, detect_gpus, layout, plan_replica, served_name

log = logging.getLogger("qvl.engines")


@dataclass(frozen=True)
class ReplicaCommand:
    """How to start one replica: argv, its whole environment, and what runs where (for messages)."""

    argv: list[str]
    env: dict[str, str]
    summary: str
    """For example "vLLM on GPUs 0,1", "vLLM on CPU cores 0-3", "vLLM on the CPU" (unbound), "simulated engine"."""
    cpus: tuple[int, ...] = ()
    """The cores the replica's threads are bound to (what a benchmark records); () for none."""


@dataclass(frozen=True)
class LocalLayout:
    """How `qvl up` runs replicas of an engine on this host."""

    host: str
    """Address the replicas listen on."""
    gpus: list[tuple[int, ...]]
    """Each replica's GPUs, one entry per replica (() for none)."""
    cpus: list[tuple[int, ...]]
    """Each replica's own CPU cores, one entry per replica (() for none: GPU replicas, unbound engines)."""
    startup_timeout_s: float
    """How long the launcher waits for each replica to become healthy."""
    log_name: str | None
    """The file a replica's output goes to, in a lasting workdir under `replica.run_dir` (caches live there
    too); None: the workdir is temporary and the output is the launcher's own."""
    gpu_exporter: bool
    """Whether the host's GPU exporter belongs beside these replicas."""


class Engine(Protocol):
    """One engine a replica can run. `command` may block (it may build files, such as the tiny model)."""

    def served_model(self, settings: Settings) -> str:
        """The model name a replica answers to (what the router and the registry list); builds nothing."""
        ...

    def with_model(self, settings: Settings, model: str) -> Settings:
        """The settings with every replica serving `model` (a checkpoint for vllm, a name for sim)."""
        ...

    def local(self, settings: Settings, replicas: int) -> LocalLayout:
        """Where `replicas` replicas run on this host. Raises PlacementError (a ValueError) when they do not fit."""
        ...

    def for_pool(self, settings: Settings, pool: PoolSettings) -> Settings:
        """The settings a replica of `pool` runs with: its model, its public and versioned names, its engine
        settings over the shared ones. May block (vllm builds a tiny model of another seed)."""
        ...

    def command(
        self, settings: Settings, host: str, port: int, gpus: Sequence[int], workdir: Path, cpus: Sequence[int] = ()
    ) -> ReplicaCommand:
        """One replica on `host:port` with exactly `gpus` (on the CPU: its threads on `cpus` when given; ()
        leaves the engine's own binding), its files under `workdir` (created). Raises StartError when it
        cannot start here (a model path that does not exist)."""
        ...


class VllmEngine:
    """`vllm serve` (serving/vllm_replica.py)."""

    def served_model(self, settings: Settings) -> str:
        spec = settings.replica
        if spec.model is None:
            return spec.served_model_name or SERVED_NAME
        return served_name(spec, spec.model)

    def with_model(self, settings: Settings, model: str) -> Settings:
        return settings.model_copy(update={"replica": settings.replica.model_copy(update={"model": model})})

    def for_pool(self, settings: Settings, pool: PoolSettings) -> Settings:
        spec = settings.replica
        model = pool.path
        if model is None and pool.tiny_seed:
            target = Path(spec.run_dir).resolve() / f"tiny-model-seed{pool.tiny_seed}"
            model = str(ensure_tiny_model(target, seed=pool.tiny_seed))
        update = {
            "model": model,
            "served_model_name": pool.model,
            "aliases": [pool.versioned],
            "tensor_parallel_size": pool.tensor_parallel_size or spec.tensor_parallel_size,
            "engine_args": {**spec.engine_args, **pool.engine_args},
        }
        return settings.model_copy(update={"replica": type(spec).model_validate({**spec.model_dump(), **update})})

    def local(self, settings: Settings, replicas: int) -> LocalLayout:
        spec = settings.replica
        available = spec.gpus if spec.gpus is not None else detect_gpus()
        cpus = spec.cpus if spec.cpus is not None else detect_cpus()
        return LocalLayout(
            host=spec.host,
            gpus=layout(spec, replicas, available),
            cpus=cpu_layout(spec, replicas, available, cpus),
            startup_timeout_s=max(settings.up.ready_timeout_s, spec.startup_timeout_s),
            log_name="vllm.log",
            gpu_exporter=True,
        )

    def command(
        self, settings: Settings, host: str, port: int, gpus: Sequence[int], workdir: Path, cpus: Sequence[int] = ()
    ) -> ReplicaCommand:
        spec = settings.replica
        model = spec.model
        if model is None:
            target = Path(spec.run_dir).resolve() / "tiny-model"
            log.info("no model given: serving the tiny test model at %s (built on first use)", target)
            model = str(ensure_tiny_model(target))
        elif not Path(model).exists():
            host_name = socket.gethostname()
            raise StartError(f"model path {model} does not exist on {host_name} (models are never downloaded)")
        spec = spec.model_copy(update={"served_model_name": self.served_model(settings)})
        plan = plan_replica(spec, model, host, port, gpus, workdir, os.environ, cpus)
        Path(plan.env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
        workdir.mkdir(parents=True, exist_ok=True)
        if plan.device == "gpu":
            where = f"GPUs {','.join(map(str, plan.gpus))}"
        else:
            where = f"CPU cores {core_list(plan.cpus)}" if plan.cpus else "the CPU"
        return ReplicaCommand(plan.command, plan.env, f"vLLM on {where}", plan.cpus)


class SimEngine:
    """The simulated engine, `qvl sim` (serving/sim/): vLLM's HTTP API on the CPU, for load tests."""

    def served_model(self, settings: Settings) -> str:
        return settings.sim.model

    def with_model(self, settings: Settings, model: str) -> Settings:
        return settings.model_copy(update={"sim": settings.sim.model_copy(update={"model": model})})

    def for_pool(self, settings: Settings, pool: PoolSettings) -> Settings:
        values = {**settings.sim.model_dump(), **pool.sim, "model": pool.model, "aliases": [pool.versioned]}
        return settings.model_copy(update={"sim": type(settings.sim).model_validate(values)})

    def local(self, settings: Settings, replicas: int) -> LocalLayout:
        return LocalLayout(
            host=settings.sim.host,
            gpus=[()] * replicas,
            cpus=[()] * replicas,
            startup_timeout_s=settings.up.ready_timeout_s,
            log_name=None,
            gpu_exporter=False,
        )

    def command(
        self, settings: Settings, host: str, port: int, gpus: Sequence[int], workdir: Path, cpus: Sequence[int] = ()
    ) -> ReplicaCommand:
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "settings.yaml"
        # The whole tree, so the replica runs with the launcher's settings whatever its environment says.
        config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude={"api_keys"})))
        argv = [sys.executable, "-m", "qvl", "sim", "--config", str(config), "--host", host, "--port", str(port)]
        return ReplicaCommand(argv, dict(os.environ), "simulated engine")


ENGINES: Mapping[EngineName, Engine] = MappingProxyType({"vllm": VllmEngine(), "sim": SimEngine()})
"""Every engine by the name settings use (`up.engine`, `cluster.engine`)."""
