"""A stand-in for nvidia-ml-py's `pynvml`, with just what serving/gpu_exporter.py uses.

Tests put this folder first on PYTHONPATH (or load the file under another name). Every call reads the
JSON file named by FAKE_NVML_STATE, so a test changes values and injects faults between scrapes:

    {"init_error": null or an NVML error code (9: driver not loaded),
     "gpus": [{"name", "uuid", "utilization" (percent), "memory_used", "memory_total" (bytes),
               "temperature" (Celsius), "power_mw", "power_limit_mw",
               "errors": {field: NVML error code}}]}   # field: utilization, memory, temperature, power, ...

nvmlInit and nvmlShutdown append a line ("init" or "shutdown") to the state file's name plus ".events".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

NVML_TEMPERATURE_GPU = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_GPU_IS_LOST = 15
_MESSAGES = {1: "Uninitialized", 3: "Not Supported", 9: "Driver Not Loaded", 15: "GPU is lost"}
_initialised = False


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, "Unknown Error")


class NVMLError_Uninitialized(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_DriverNotLoaded(NVMLError):
    pass


class NVMLError_GpuIsLost(NVMLError):
    pass


# pynvml's own class names, so log lines read as they would with the real module.
_CLASSES = {
    1: NVMLError_Uninitialized,
    3: NVMLError_NotSupported,
    9: NVMLError_DriverNotLoaded,
    15: NVMLError_GpuIsLost,
}


def _error(code: int) -> NVMLError:
    return _CLASSES.get(code, NVMLError)(code)


def _path() -> Path:
    return Path(os.environ["FAKE_NVML_STATE"])


def _state() -> dict[str, Any]:
    return json.loads(_path().read_text())


def _event(name: str) -> None:
    with _path().with_name(_path().name + ".events").open("a") as f:
        f.write(name + "\n")


def _gpu(handle: int, field: str) -> dict[str, Any]:
    if not _initialised:
        raise _error(NVML_ERROR_UNINITIALIZED)
    gpu: dict[str, Any] = _state()["gpus"][handle]
    code = gpu.get("errors", {}).get(field)
    if code is not None:
        raise _error(code)
    return gpu


def nvmlInit() -> None:
    global _initialised
    _event("init")
    code = _state().get("init_error")
    if code is not None:
        raise _error(code)
    _initialised = True


def nvmlShutdown() -> None:
    global _initialised
    _event("shutdown")
    _initialised = False


def nvmlDeviceGetCount() -> int:
    if not _initialised:
        raise _error(NVML_ERROR_UNINITIALIZED)
    return len(_state()["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    _gpu(index, "handle")
    return index


def nvmlDeviceGetName(handle: int) -> str:
    return str(_gpu(handle, "name")["name"])


def nvmlDeviceGetUUID(handle: int) -> str:
    return str(_gpu(handle, "uuid")["uuid"])


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    return SimpleNamespace(gpu=_gpu(handle, "utilization")["utilization"], memory=0)


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    gpu = _gpu(handle, "memory")
    used, total = gpu["memory_used"], gpu["memory_total"]
    return SimpleNamespace(used=used, total=total, free=total - used)


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    assert sensor == NVML_TEMPERATURE_GPU
    return int(_gpu(handle, "temperature")["temperature"])


def nvmlDeviceGetPowerUsage(handle: int) -> int:
    return int(_gpu(handle, "power")["power_mw"])


def nvmlDeviceGetEnforcedPowerLimit(handle: int) -> int:
    return int(_gpu(handle, "power_limit")["power_limit_mw"])
