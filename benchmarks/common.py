"""What the benchmarks share: the chat payload, starting `qvl` processes, the load loop, CPU readings."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from PIL import Image

from qvl.procs import Child, StartError, spawn

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "qwen3-vl-sim"


def chat_body(stream: bool, max_tokens: int | None = None) -> bytes:
    """A chat request with one short question and a small (64x48) PNG."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [
        {"type": "text", "text": "Describe this product in one line."},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    doc: dict[str, object] = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    return json.dumps(doc).encode()


def start_qvl(args: list[str], port: int, ready_path: str, cpu: int | None = None) -> Child:
    """Start `qvl ARGS --port PORT` (pinned to `cpu` if given) and wait until READY_PATH answers 200;
    its output goes to a log file in the temp dir, whose tail ends the error when it does not start."""
    command = [sys.executable, "-m", "qvl", *args, "--port", str(port), "--log-level", "warning"]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    log = Path(tempfile.gettempdir()) / f"qvl-bench-{args[0]}-{port}.log"
    child = spawn(f"qvl {args[0]}", command, url=f"http://127.0.0.1:{port}", log=log)
    try:
        child.wait_ready(60, ready_path, interval_s=0.1)
    except StartError as exc:
        child.stop(10)
        raise SystemExit(str(exc)) from exc
    return child


async def drive(url: str, payload: bytes, requests: int, concurrency: int) -> tuple[list[float], int]:
    """Send `requests` POSTs from `concurrency` keep-alive workers; (latencies in seconds, failures)."""
    latencies: list[float] = []
    failed = 0
    todo = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal failed
            for _ in todo:
                started = time.perf_counter()
                try:
                    async with session.post(url, data=payload, headers=headers) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                failed += not ok

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, failed


def percentiles_ms(latencies: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1000, ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000


def cpu_seconds(proc: psutil.Process) -> float:
    """User plus system CPU time of a process, all threads."""
    times = proc.cpu_times()
    return float(times.user + times.system)
