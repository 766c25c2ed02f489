"""A real Prometheus server run with this repository's deploy/prometheus config, for the live checks of
the rules and dashboards (tests/deploy) and for `make dashboards-preview`.

The config is deploy/prometheus/prometheus.yml as shipped, with three changes: faster intervals (so a
run of a minute has data), rule files by absolute path, and the targets of this run. Each job keeps
its own shape: jobs with static targets get the first target of their kind there and the others
through file-based discovery, so both paths are exercised.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from qvl.procs import Child, StartError, spawn

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARDS_DIR = ROOT / "deploy" / "grafana" / "dashboards"
JOBS = ("qvl-router", "qvl-vllm", "qvl-gpu")
GRAFANA_MACROS = ("$__rate_interval", "$__interval")
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


class PrometheusError(Exception):
    """Prometheus could not start, or answered a query with an error."""


@dataclass(frozen=True, slots=True)
class PanelQuery:
    dashboard: str
    panel: str
    expr: str
    legend: str = ""
    """Grafana's legendFormat: `{{label}}` placeholders."""
    kind: str = "timeseries"
    unit: str = ""


def iter_panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries(path: Path) -> list[PanelQuery]:
    """Every target expression of every panel of one Grafana dashboard JSON file."""
    dashboard = json.loads(path.read_text())
    return [
        PanelQuery(
            dashboard["title"],
            panel["title"],
            target["expr"],
            target.get("legendFormat", ""),
            panel.get("type", "timeseries"),
            panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
        )
        for panel in iter_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def live_form(expr: str, window: str = "1m") -> str:
    """A dashboard expression as Prometheus can run it: Grafana's macros become `window`, every template
    variable (always used in a regex matcher) matches anything."""
    for macro in GRAFANA_MACROS:
        expr = expr.replace(macro, window)
    return VARIABLE.sub(".*", expr)


def recording_rules() -> list[tuple[str, str]]:
    """(record name, expression) of every recording rule shipped in deploy/prometheus/rules."""
    config = yaml.safe_load((PROMETHEUS_DIR / "rules" / "recording.yml").read_text())
    return [(rule["record"], rule["expr"]) for group in config["groups"] for rule in group["rules"] if "record" in rule]


def write_config(workdir: Path, targets: Mapping[str, Sequence[str]], interval_s: float) -> Path:
    """deploy/prometheus/prometheus.yml adapted to this run (see the module docstring); returns its path."""
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    interval = f"{interval_s:g}s"
    config["global"] = {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval}
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    if missing := set(JOBS) - set(jobs):
        raise PrometheusError(f"deploy/prometheus/prometheus.yml has no job {sorted(missing)}")
    for name, job in jobs.items():
        remaining = list(targets.get(name, ()))
        if "static_configs" in job:
            job["static_configs"] = [{"targets": remaining[:1]}]
            remaining = remaining[1:]
        for sd in job.get("file_sd_configs", []):
            sd["refresh_interval"] = interval
            for pattern in sd["files"]:
                folder = workdir / Path(pattern).parent
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "run.json").write_text(json.dumps([{"targets": remaining}]))
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class PrometheusServer:
    """`prometheus` (Debian's package) on a given port with its data in `workdir`; stop() kills it."""

    def __init__(self, workdir: Path, port: int, binary: str = "prometheus") -> None:
        found = shutil.which(binary)
        if found is None:
            raise PrometheusError(f"{binary} not found: `make install` installs Debian's prometheus package")
        self.binary = found
        self.workdir = workdir
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log = workdir / "prometheus.log"
        self._child: Child | None = None
        self._http = httpx.Client(base_url=self.url, timeout=10)

    def start(self, config: Path, timeout_s: float = 30.0) -> None:
        """Start and wait until Prometheus says it is ready."""
        argv = [
            self.binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self._child = spawn("prometheus", argv, url=self.url, log=self.log)
        try:
            self._child.wait_ready(timeout_s, "/-/ready", interval_s=0.1)
        except StartError as exc:
            raise PrometheusError(str(exc)) from exc

    def stop(self) -> None:
        self._http.close()
        if self._child is not None:
            self._child.stop(grace_s=10)

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health ("up", "down", "unknown")."""
        data = self._api("/api/v1/targets", {"state": "active"})
        return list(data["activeTargets"])

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now: the result vector (empty when the expression has no data)."""
        data = self._api("/api/v1/query", {"query": expr})
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} gave a {data['resultType']}, not a vector")
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        """A range query: one matrix row per series, values as [unix time, "value"] pairs."""
        data = self._api("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step_s})
        return list(data["result"])

    def wait_for(self, expr: str, timeout_s: float) -> list[dict[str, Any]]:
        """Poll `expr` until it has a finite value; raises PrometheusError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if finite(result):
                return result
            if time.monotonic() > deadline:
                raise PrometheusError(f"no data for {expr!r} after {timeout_s}s")
            time.sleep(0.5)

    def _api(self, path: str, params: Mapping[str, str | float]) -> dict[str, Any]:
        response = self._http.get(path, params=params)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {dict(params)}: {body.get('errorType')}: {body.get('error')}")
        data: dict[str, Any] = body["data"]
        return data


def finite(result: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The series of an instant-query result whose value is a number (not NaN or infinite)."""
    return [series for series in result if math.isfinite(float(series["value"][1]))]
