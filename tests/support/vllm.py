"""Two real vLLM replicas of the tiny Qwen3-VL on the CPU, started once for the test session (about 30 s
each, in parallel) by the `vllm_pair` fixture in tests/conftest.py; every test puts its own router in front."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qvl.procs import Child, free_port
from qvl.settings import ReplicaSettings
from serving.tiny_model import SERVED_NAME, build_tiny_model
from serving.vllm_replica import ReplicaPlan, launch, plan_replicas

STARTUP_S = 300
MAX_NUM_SEQS = 4
"""A burst of 16 requests leaves some waiting, which least-loaded must see (and calibration can)."""


@dataclass
class VllmPair:
    model: Path
    plans: list[ReplicaPlan]
    replicas: list[Child]

    def restart(self, index: int) -> None:
        self.replicas[index].stop()
        self.replicas[index] = launch(self.plans[index], "127.0.0.1")
        self.replicas[index].wait_ready(STARTUP_S)


@contextmanager
def vllm_pair(run_dir: Path) -> Iterator[VllmPair]:
    """Each replica gets its own half of the cores this process may use (one each on a 2-core machine)."""
    model = build_tiny_model(run_dir / "tiny").path
    spec = ReplicaSettings(served_model_name=SERVED_NAME, device="cpu", max_num_seqs=MAX_NUM_SEQS, run_dir=str(run_dir))
    plans = plan_replicas(spec, str(model), [free_port(), free_port()], [], run_dir, os.environ)
    replicas = [launch(plan, "127.0.0.1") for plan in plans]
    pair = VllmPair(model, plans, replicas)
    try:
        for replica in replicas:
            replica.wait_ready(STARTUP_S)
        yield pair
    finally:
        for replica in pair.replicas:
            replica.terminate()
        for replica in pair.replicas:
            replica.stop()
