"""The GPU exporter against this machine's real NVML: GPU-only (marker `gpu`), skipped where there is none.
The exporter's behaviour without a GPU, and against a substitute pynvml, is in tests/serving/test_gpu_exporter.py."""

from __future__ import annotations

import pytest
from support.nvml import nvml_works

from serving.gpu_exporter import GpuCollector

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_nvml() -> None:
    if not nvml_works():
        pytest.skip("no NVML here (no NVIDIA driver or GPU)")


def test_real_nvml_every_gpu_has_memory_and_a_utilization_ratio() -> None:
    collector = GpuCollector("h")
    try:
        samples = [sample for family in collector.collect() for sample in family.samples]
    finally:
        collector.close()
    up = [(s.labels, s.value) for s in samples if s.name == "qvl_gpu_exporter_up"]
    assert up == [({"host": "h"}, 1.0)]
    totals = [s.value for s in samples if s.name == "qvl_gpu_memory_total_bytes"]
    assert totals and all(v > 0 for v in totals)
    ratios = [s.value for s in samples if s.name == "qvl_gpu_utilization_ratio"]
    assert len(ratios) == len(totals) and all(0 <= v <= 1 for v in ratios)
