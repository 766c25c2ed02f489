"""What the benchmarks share: the chat payload, starting `qvl` processes, the load loop, CPU readings."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import psutil
from PIL import Image

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_qvl(args: list[str], port: int, ready_path: str, cpu: int | None = None) -> subprocess.Popen[bytes]:
    """Start `qvl ARGS --port PORT` (pinned to `cpu` if given) and wait until READY_PATH answers 200."""
    command = [sys.executable, "-m", "qvl", *args, "--port", str(port), "--log-level", "warning"]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{ready_path}", timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"qvl {args[0]} on port {port} did not become ready")


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
