"""`make dashboards-preview`: PNG plots of the dashboards' time-series panels, drawn with matplotlib from a
live Prometheus that scraped `qvl up --engine sim` under shop traffic (loadtests/workloads/shop.yaml with 200
products, sent by loadtests/traffic.py).

Nothing is faked: the plots run each panel's own PromQL (deploy/grafana/dashboards) through Prometheus'
range API, with Grafana's `$__rate_interval` read as `--window`. Two thirds into the run one replica is
SIGKILLed, so the error, retry and health panels show a failover. The GPU dashboard is not drawn: this
command runs on machines without GPUs, where the exporter has nothing to report.

    python -m tools.preview --out docs/dashboards [--seconds 90] [--concurrency 12]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from loadtests.traffic import ShopTraffic
from qvl.procs import Child, StartError, free_port, spawn
from tools.promstack import DASHBOARDS_DIR, PanelQuery, PrometheusServer, dashboard_queries, live_form, write_config

MODEL = "Qwen/Qwen3-VL-8B-Instruct"
DRAWN = ("overview", "replicas", "cache")
SETTINGS = f"""\
up: {{engine: sim, replicas: 3, model: "{MODEL}"}}
cache: {{backend: memory}}
router: {{policy: image-affinity}}
sim: {{prefill_base_ms: 45, step_base_ms: 15, output_tokens: 32, max_running: 8}}
"""
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboards"), help="folder for the PNG files")
    parser.add_argument("--seconds", type=float, default=90.0, help="how long to send traffic")
    parser.add_argument("--concurrency", type=int, default=12, help="closed-loop clients")
    parser.add_argument("--window", default="15s", help="rate window standing in for $__rate_interval")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qvl-preview-") as tmp:
        work = Path(tmp)
        up, url = _start_cluster(work)
        prometheus = PrometheusServer(work, free_port())
        try:
            replicas = [r["url"].removeprefix("http://") for r in httpx.get(url + "/v1/cluster").json()["replicas"]]
            targets = {"qvl-router": [url.removeprefix("http://")], "qvl-vllm": replicas}
            prometheus.start(write_config(work, targets, interval_s=1))
            prometheus.wait_for('count(up{job="qvl-vllm"} == 1) == 3', timeout_s=30)
            began = time.time()
            traffic = ShopTraffic(url, MODEL, seed=1, products=200)
            shop = traffic.workload
            _say(
                f"sending {shop.name} traffic ({shop.popularity.catalogue} products) to {url} "
                f"for {args.seconds:.0f}s ({args.concurrency} clients)"
            )
            victim = replicas[-1]
            kill_at = args.seconds * 2 / 3

            def progress(elapsed: float) -> None:
                nonlocal victim
                if victim and elapsed >= kill_at:
                    _kill_replica(up, int(victim.rsplit(":", 1)[1]))
                    _say(f"  {elapsed:.0f}s: killed replica {victim}")
                    victim = ""
                if int(elapsed) % 10 == 0:
                    _say(f"  {elapsed:.0f}s: {traffic.report.sent} requests")

            asyncio.run(traffic.run(args.seconds, args.concurrency, tick=progress))
            time.sleep(3)  # the last scrapes and rule evaluations
            end = time.time()
            for name in DRAWN:
                path = args.out / f"{name}.png"
                drawn = _draw(prometheus, DASHBOARDS_DIR / f"{name}.json", began, end, args.window, path)
                _say(f"wrote {path} ({drawn} panels)")
        finally:
            prometheus.stop()
            _stop(up)
    return 0


def _draw(prometheus: PrometheusServer, dashboard: Path, start: float, end: float, window: str, out: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, list[PanelQuery]] = defaultdict(list)
    for query in dashboard_queries(dashboard):
        if query.kind == "timeseries":
            panels[query.panel].append(query)
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    title = next(iter(panels.values()))[0].dashboard
    figure.suptitle(f"{title}  (qvl up --engine sim, 3 replicas, shop traffic; live Prometheus)", fontsize=13)
    for ax, (panel, queries) in zip(axes.flat, panels.items(), strict=False):
        for query in queries:
            for series in prometheus.query_range(live_form(query.expr, window), start, end, step_s=2):
                times = [float(t) - start for t, _ in series["values"]]
                values = [_scaled(float(v), query.unit) for _, v in series["values"]]
                ax.plot(times, values, label=_legend(query.legend, series["metric"]), linewidth=1.4)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.set_ylabel(_unit_label(queries[0].unit), fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return len(panels)


def _legend(template: str, labels: dict[str, Any]) -> str:
    text = _PLACEHOLDER.sub(lambda m: str(labels.get(m.group(1), "")), template).strip() or str(labels)
    # matplotlib leaves out legend labels that start with "_" (such as the model label `_unknown`).
    return ("\u200b" + text if text.startswith("_") else text)[:40]


def _scaled(value: float, unit: str) -> float:
    """Seconds are drawn in ms and ratios in percent, as Grafana shows them."""
    if unit == "s":
        return value * 1000
    if unit == "percentunit":
        return value * 100
    return value


def _unit_label(unit: str) -> str:
    return {"s": "ms", "percentunit": "%", "reqps": "req/s", "bytes": "bytes"}.get(unit, unit)


def _start_cluster(work: Path) -> tuple[Child, str]:
    config = work / "qvl.yaml"
    config.write_text(SETTINGS)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "qvl", "up", "--config", str(config), "--port", str(port), "--no-auth"]
    up = spawn("qvl up", command, url=url, log=work / "qvl-up.log")
    _say(f"starting {' '.join(command[1:])}")
    try:
        up.wait_ready(60, "/ready", interval_s=0.2)
    except StartError as exc:
        _stop(up)
        raise SystemExit(str(exc)) from exc
    return up, url


def _kill_replica(up: Child, port: int) -> None:
    """SIGKILL the simulated replica `qvl up` started on `port`."""
    for child in psutil.Process(up.pid).children(recursive=True):
        if str(port) in child.cmdline():
            child.kill()
            return
    raise LookupError(f"no replica of qvl up listens on port {port}")


def _stop(up: Child) -> None:
    up.stop(grace_s=15)


def _say(message: str) -> None:
    print(f"qvl preview: {message}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
