"""The GPUs on the operations page: each configured GPU exporter's `qvl_gpu_*` series, scraped by the console.

An exporter that does not answer keeps its GPUs' last readings, marked stale by the page once
`stale_after_s` have passed since its last answer; one that answers with `qvl_gpu_exporter_up 0` (no NVML)
is shown as up-but-blind, with no GPUs.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from router.replicas import replica_name
from router.upstream import ConnectFailed, ConnectionLost, Origin, UpstreamClient

_FIELDS = {
    "qvl_gpu_utilization_ratio": "utilization",
    "qvl_gpu_memory_used_bytes": "memory_used_bytes",
    "qvl_gpu_memory_total_bytes": "memory_total_bytes",
    "qvl_gpu_temperature_celsius": "temperature_c",
    "qvl_gpu_power_watts": "power_w",
    "qvl_gpu_power_limit_watts": "power_limit_w",
}


@dataclass(slots=True)
class GpuExporter:
    """One exporter as last read: its GPUs by (host, gpu index), each a mapping of the fields above."""

    url: str
    name: str
    nvml_up: bool | None = None
    """The exporter's own qvl_gpu_exporter_up (None until it answered)."""
    gpus: list[dict[str, str | float]] = field(default_factory=list)
    last_answer: float = 0.0
    last_error: str | None = None


def parse_gpus(text: str) -> tuple[bool, list[dict[str, str | float]]]:
    """(NVML up, one dict per GPU with its labels and readings) from an exporter's Prometheus text page."""
    up = False
    by_gpu: dict[tuple[str, str], dict[str, str | float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "qvl_gpu_exporter_up":
                up = up or s.value >= 1
                continue
            name = _FIELDS.get(s.name)
            if name is None:
                continue
            key = (s.labels.get("host", ""), s.labels.get("gpu", ""))
            gpu = by_gpu.setdefault(
                key,
                {"host": key[0], "gpu": key[1], "name": s.labels.get("name", ""), "uuid": s.labels.get("uuid", "")},
            )
            gpu[name] = s.value
    return up, [by_gpu[k] for k in sorted(by_gpu, key=lambda k: (k[0], int(k[1]) if k[1].isdigit() else 0, k[1]))]


class GpuExporters:
    """The configured exporters and what each said last; `scrape()` reads them all once."""

    def __init__(self, urls: list[str], client: UpstreamClient, timeout_s: float) -> None:
        self.exporters = [GpuExporter(url, replica_name(url)) for url in urls]
        self._origins = {e.url: Origin(e.url) for e in self.exporters}
        self._client = client
        self._timeout_s = timeout_s

    async def scrape(self) -> None:
        await asyncio.gather(*(self._scrape(e) for e in self.exporters))

    async def _scrape(self, exporter: GpuExporter) -> None:
        try:
            status, body = await self._client.get(self._origins[exporter.url], b"/metrics", deadline_s=self._timeout_s)
            if status != 200:
                raise ValueError(f"/metrics answered {status}")
            exporter.nvml_up, exporter.gpus = parse_gpus(body.decode("utf-8", "replace"))
        except (ConnectFailed, ConnectionLost, TimeoutError, ValueError) as exc:
            exporter.last_error = str(exc) or type(exc).__name__
            return
        exporter.last_answer = time.time()
        exporter.last_error = None
