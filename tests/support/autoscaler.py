"""The autoscaler's outputs for tests that need them before or without a real `qvl cluster autoscale`: its
`/metrics` (`start_exporter`: a process serving autoscale.metrics.AutoscalerMetrics, fed a small scripted
run) and its status document in Redis (`status_doc`, in the shape the autoscaler writes)."""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from autoscale.metrics import AutoscalerMetrics
from qvl.procs import Child, spawn
from support import ROOT

TESTS = Path(__file__).resolve().parents[1]


def start_exporter(workdir: Path, port: int, pools: Sequence[str], timeout_s: float = 20.0) -> Child:
    """`python -m support.autoscaler` on `port`: the autoscaler's metrics for `pools`, one decision per pool
    every 0.5 s; returns once its /metrics answers. Stop it with the Child's stop()."""
    argv = [sys.executable, "-m", "support.autoscaler", "--port", str(port), "--pools", ",".join(pools)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    child = spawn(
        "autoscaler exporter", argv, url=f"http://127.0.0.1:{port}", log=workdir / "autoscaler.log", env=env, cwd=ROOT
    )
    child.wait_ready(timeout_s, "/metrics", interval_s=0.05)
    return child


def record_tick(metrics: AutoscalerMetrics, pool: str, tick: int) -> None:
    """One interval of a scripted pool: it starts at 1 serving replica, is asked for 3 at the third tick
    (one more starting each tick until both serve), holds in its band, and a start fails once; every series
    of AutoscalerMetrics gets a value."""
    desired = 1 if tick < 2 else 3
    serving = min(desired, 1 + max(0, tick - 3))
    starting = desired - serving
    if tick == 2:
        metrics.record_decision(pool, "up", "demand_up", desired, 2.4)
        metrics.record_action(pool, "start", "ok")
        metrics.record_action(pool, "start", "ok")
        metrics.record_action(pool, "start", "failed")
    else:
        metrics.record_decision(pool, "hold", "in_band" if tick > 2 else "waiting", desired, 0.9 if tick < 2 else 2.4)
    metrics.record_fleet(pool, {"starting": starting, "serving": serving, "draining": 0})
    prefill = 5100.0 if tick >= 2 else 2100.0
    metrics.record_load(pool, prefill, prefill / 6, 300.0, (3000.0, 500.0), 120.0)


class _Handler(BaseHTTPRequestHandler):
    metrics: AutoscalerMetrics
    lock: threading.Lock

    def do_GET(self) -> None:
        if self.path != "/metrics":
            self.send_error(404)
            return
        with self.lock:
            body = self.metrics.render()
        self.send_response(200)
        self.send_header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a line per scrape would only fill the log."""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m support.autoscaler", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="port of /metrics on 127.0.0.1")
    parser.add_argument("--pools", required=True, help="pool names, comma-separated")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between two scripted decisions")
    args = parser.parse_args(argv)
    metrics = AutoscalerMetrics()
    metrics.set_dry_run(False)
    lock = threading.Lock()
    pools = args.pools.split(",")
    with lock:
        for pool in pools:
            record_tick(metrics, pool, 0)
    handler = type("Handler", (_Handler,), {"metrics": metrics, "lock": lock})
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    tick = 1
    while True:
        time.sleep(args.interval)
        with lock:
            for pool in pools:
                record_tick(metrics, pool, tick)
        tick += 1


def status_doc(
    now: float,
    pools: Sequence[str] = ("default",),
    *,
    interval_s: float = 10.0,
    dry_run: bool = False,
    history: int = 12,
    source: str = "profile",
) -> dict[str, Any]:
    """The autoscaler's status document as it writes it to Redis: each pool 1..8 replicas, grown from 2 to 3
    by a demand_up decision 10 s before `now` (applied unless `dry_run`), with `history` samples (the first
    without a `needed`, as the autoscaler writes it before it has data)."""
    entries = []
    for pool in pools:
        samples = [
            {
                "at": now - (history - i) * interval_s,
                "desired": 2 if i < history - 1 else 3,
                "actual": 2 if i < history - 1 else 3,
                "serving": 2,
                "needed": None if i == 0 else 1.2 + 0.1 * i,  # no data yet at the first one
                "prefill_tokens_s": 2500.0 + 240.0 * i,
                "decode_tokens_s": 400.0 + 38.0 * i,
            }
            for i in range(history)
        ]
        entries.append(
            {
                "pool": pool,
                "min": 1,
                "max": 8,
                "desired": 3,
                "starting": 1,
                "serving": 2,
                "draining": 0,
                "needed": 2.4,
                "prefill_tokens_s": 5100.0,
                "decode_tokens_s": 820.0,
                "batch_tokens_s": 0.0,
                "in_flight": 6.0,
                "capacity": {"prefill_tokens_s": 3000.0, "decode_tokens_s": 500.0, "source": source},
                "startup_s": 120.0,
                "last": {
                    "at": now - interval_s,
                    "direction": "up",
                    "reason": "demand_up",
                    "from": 2,
                    "to": 3,
                    "applied": not dry_run,
                },
                "history": samples,
            }
        )
    return {
        "updated_at": now,
        "interval_s": interval_s,
        "dry_run": dry_run,
        "policy": "demand",
        "pools": entries,
    }


if __name__ == "__main__":
    main()
