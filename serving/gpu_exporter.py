"""GPU telemetry: `qvl gpu-exporter` reads NVML (the `pynvml` module of nvidia-ml-py) at each scrape and serves
`qvl_gpu_*` gauges as Prometheus text on `GET /metrics`.

Series: `qvl_gpu_exporter_up{host}` (1 when NVML was read at this scrape, else 0), and per GPU, labelled
`gpu` (NVML index), `uuid`, `host` and `name`: utilization ratio (0..1), memory used and total bytes,
temperature in Celsius, power draw and enforced power limit in watts.

Without NVML (no driver, no nvidia-ml-py, no GPU) the exporter keeps serving `up 0`: it logs the reason once
and tries `nvmlInit` again at most every `INIT_RETRY_S`, so a driver that appears later is picked up. A field
one GPU does not support (power on some boards) is left out for that GPU and logged once; an error that loses
NVML as a whole (GPU lost, driver gone) turns the scrape into `up 0` and shuts NVML down until the next try.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from qvl.settings import GpuExporterSettings

log = logging.getLogger("qvl.gpu_exporter")
INIT_RETRY_S = 60.0
LABELS = ["gpu", "uuid", "host", "name"]
# nvml.h return codes (a stable ABI) after which nothing more can be read until NVML is initialised again:
# uninitialized, driver not loaded, library not found, GPU is lost, NVML/driver version mismatch.
_FATAL_CODES = frozenset({1, 9, 12, 15, 18})
_TEMPERATURE_GPU = 0  # NVML_TEMPERATURE_GPU
_DOCS = {
    "qvl_gpu_utilization_ratio": "Share of the last sample period in which a kernel ran on the GPU (0..1)",
    "qvl_gpu_memory_used_bytes": "GPU memory in use",
    "qvl_gpu_memory_total_bytes": "GPU memory installed",
    "qvl_gpu_temperature_celsius": "GPU die temperature",
    "qvl_gpu_power_watts": "Power the board draws",
    "qvl_gpu_power_limit_watts": "Power limit the driver enforces",
}


class Nvml(Protocol):
    """The part of pynvml the exporter uses (tests substitute a module with just these)."""

    NVMLError: type[Exception]

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> object: ...
    def nvmlDeviceGetName(self, handle: object) -> str | bytes: ...
    def nvmlDeviceGetUUID(self, handle: object) -> str | bytes: ...
    def nvmlDeviceGetUtilizationRates(self, handle: object) -> Any: ...
    def nvmlDeviceGetMemoryInfo(self, handle: object) -> Any: ...
    def nvmlDeviceGetTemperature(self, handle: object, sensor: int) -> int: ...
    def nvmlDeviceGetPowerUsage(self, handle: object) -> int: ...
    def nvmlDeviceGetEnforcedPowerLimit(self, handle: object) -> int: ...


def load_pynvml() -> Nvml:
    """Import pynvml (raises ImportError without nvidia-ml-py); imported late, so a missing one is retried."""
    return cast(Nvml, importlib.import_module("pynvml"))


# One NVML read per field; a field that fails skips only its own series.
_FIELDS: dict[str, Callable[[Nvml, object], dict[str, float]]] = {
    "utilization": lambda nvml, h: {"qvl_gpu_utilization_ratio": nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100},
    "memory": lambda nvml, h: _memory(nvml.nvmlDeviceGetMemoryInfo(h)),
    "temperature": lambda nvml, h: {"qvl_gpu_temperature_celsius": nvml.nvmlDeviceGetTemperature(h, _TEMPERATURE_GPU)},
    "power": lambda nvml, h: {"qvl_gpu_power_watts": nvml.nvmlDeviceGetPowerUsage(h) / 1000},
    "power_limit": lambda nvml, h: {"qvl_gpu_power_limit_watts": nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000},
}


class GpuCollector:
    """A prometheus_client collector reading NVML at each scrape; safe when scrapes overlap (one lock)."""

    def __init__(
        self,
        host: str,
        load: Callable[[], Nvml] = load_pynvml,
        retry_s: float = INIT_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self._load, self._retry_s, self._clock = load, retry_s, clock
        self._lock = threading.Lock()
        self._nvml: Nvml | None = None
        self._gpus: list[tuple[list[str], object]] = []  # label values and handle, per GPU
        self._next_init = float("-inf")
        self._logged: set[str] = set()  # reasons NVML is unavailable, each logged once per process
        self._skipped: set[tuple[str, str]] = set()  # (gpu, field) read errors, each logged once

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            rows = self._scrape()
        up = GaugeMetricFamily("qvl_gpu_exporter_up", "1 if NVML was read at this scrape", labels=["host"])
        up.add_metric([self.host], 0.0 if rows is None else 1.0)
        yield up
        for name, samples in (rows or {}).items():
            family = GaugeMetricFamily(name, _DOCS[name], labels=LABELS)
            for labels, value in samples:
                family.add_metric(labels, value)
            yield family

    def warm(self) -> bool:
        """Try NVML now (at start-up, so a missing driver is logged at once); True if it was read."""
        with self._lock:
            return self._scrape() is not None

    def close(self) -> None:
        """nvmlShutdown, if NVML is initialised."""
        with self._lock:
            if self._nvml is not None:
                self._shutdown(self._nvml)

    def _scrape(self) -> dict[str, list[tuple[list[str], float]]] | None:
        nvml = self._nvml if self._nvml is not None else self._init()
        if nvml is None:
            return None
        rows: dict[str, list[tuple[list[str], float]]] = {name: [] for name in _DOCS}
        try:
            for labels, handle in self._gpus:
                for field, read in _FIELDS.items():
                    try:
                        values = read(nvml, handle)
                    except nvml.NVMLError as exc:
                        if _fatal(exc):
                            raise
                        self._skip(labels[0], field, exc)
                        continue
                    for name, value in values.items():
                        rows[name].append((labels, float(value)))
        except nvml.NVMLError as exc:
            self._unavailable(f"NVML lost ({_describe(exc)})")
            self._shutdown(nvml)
            return None
        return {name: samples for name, samples in rows.items() if samples}

    def _init(self) -> Nvml | None:
        now = self._clock()
        if now < self._next_init:
            return None
        self._next_init = now + self._retry_s
        try:
            nvml = self._load()
        except ImportError as exc:
            self._unavailable(f"pynvml cannot be imported (install nvidia-ml-py): {exc}")
            return None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self._unavailable(f"nvmlInit failed ({_describe(exc)})")
            return None
        try:
            self._gpus = self._discover(nvml)
        except nvml.NVMLError as exc:
            self._unavailable(f"NVML lost ({_describe(exc)})")
            self._shutdown(nvml)
            return None
        self._nvml = nvml
        log.info("NVML initialised: %d GPU(s) on %s", len(self._gpus), self.host)
        return nvml

    def _discover(self, nvml: Nvml) -> list[tuple[list[str], object]]:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid, name = nvml.nvmlDeviceGetUUID(handle), nvml.nvmlDeviceGetName(handle)
            except nvml.NVMLError as exc:
                if _fatal(exc):
                    raise
                self._skip(str(index), "identity", exc)  # e.g. no permission: leave the GPU out
                continue
            gpus.append(([str(index), _text(uuid), self.host, _text(name)], handle))
        return gpus

    def _shutdown(self, nvml: Nvml) -> None:
        self._nvml, self._gpus = None, []
        with contextlib.suppress(nvml.NVMLError):  # a lost driver may refuse even this; nothing to undo then
            nvml.nvmlShutdown()

    def _unavailable(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("%s: exporting qvl_gpu_exporter_up 0; retrying at most every %.0fs", reason, self._retry_s)

    def _skip(self, gpu: str, field: str, exc: Exception) -> None:
        if (gpu, field) not in self._skipped:
            self._skipped.add((gpu, field))
            log.warning("GPU %s: cannot read %s (%s); leaving it out", gpu, field, _describe(exc))


def _memory(info: Any) -> dict[str, float]:
    return {"qvl_gpu_memory_used_bytes": info.used, "qvl_gpu_memory_total_bytes": info.total}


def _fatal(exc: Exception) -> bool:
    return getattr(exc, "value", None) in _FATAL_CODES


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def exporter_command(settings: GpuExporterSettings, log_level: str) -> list[str]:
    """The argv of a `qvl gpu-exporter` child with these settings (what `qvl up` and `qvl replica` start)."""
    argv = [sys.executable, "-m", "qvl", "gpu-exporter", "--host", settings.host, "--port", str(settings.port)]
    if settings.node_name:
        argv += ["--node-name", settings.node_name]
    return [*argv, "--log-level", log_level]


def run_gpu_exporter(settings: GpuExporterSettings) -> int:
    """`qvl gpu-exporter`: serve /metrics until SIGINT or SIGTERM; returns the exit status."""
    collector = GpuCollector(settings.node_name or socket.gethostname())
    registry = CollectorRegistry()
    registry.register(collector)
    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: stop.append(s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        nvml = "up" if collector.warm() else "unavailable (exporting up 0)"
        try:
            server, _ = start_http_server(settings.port, settings.host, registry=registry)
        except OSError as exc:
            print(f"qvl: gpu exporter cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
            return 1
        url = f"http://{settings.host}:{settings.port}/metrics"
        print(f"qvl: gpu exporter serving {url} (host label {collector.host}; NVML {nvml})", flush=True)
        while not stop:
            time.sleep(0.2)
        server.shutdown()
        server.server_close()
        return 0
    finally:
        collector.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
