"""NVML in tests: whether this machine has a usable one (GPU-only tests skip without), and a GPU exporter
reading the substitute module of tests/serving/fake_nvml where it has none."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from support.servers import Cluster, Proc


def nvml_works() -> bool:
    """True when the real `pynvml` initialises here (it shuts down again before returning)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, or any NVMLError: there is no usable NVML here
        return False
    pynvml.nvmlShutdown()
    return True


FAKE_NVML = Path(__file__).resolve().parents[1] / "serving" / "fake_nvml"
"""The folder of the substitute `pynvml` (tests/serving/fake_nvml/pynvml.py)."""


def fake_gpu(
    uuid: str, utilization: int, memory_used_gib: int, memory_total_gib: int, temperature: int, power_w: int,
    power_limit_w: int, name: str = "NVIDIA H100 80GB HBM3",
) -> dict[str, Any]:  # fmt: skip
    """One GPU of the substitute NVML's state file, in the units its functions return."""
    return {
        "name": name, "uuid": uuid, "utilization": utilization, "memory_used": memory_used_gib * 2**30,
        "memory_total": memory_total_gib * 2**30, "temperature": temperature, "power_mw": power_w * 1000,
        "power_limit_mw": power_limit_w * 1000, "errors": {},
    }  # fmt: skip


def start_fake_exporter(cluster: Cluster, state: Path, gpus: list[dict[str, Any]], host: str) -> Proc:
    """A real `qvl gpu-exporter` process reading the substitute NVML, whose GPUs are `gpus` (the JSON in
    `state`, which a test may rewrite between scrapes); its series carry `host`."""
    state.write_text(json.dumps({"init_error": None, "gpus": gpus}))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FAKE_NVML_STATE", str(state))
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_NVML), os.environ.get("PYTHONPATH")])))
        env.setenv("QVL_GPU_EXPORTER__NODE_NAME", host)
        return cluster.start("gpu-exporter", ready_path="/metrics")
