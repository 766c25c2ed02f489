"""How many requests per second one core of `qvl sim --zero-delay` answers.

The simulator runs pinned to one CPU and the load generator to another, so the figure is the
simulator's, not the client's: N non-streamed chat requests (default 3,000 after 300 of warm-up),
each with a small PNG, at a fixed concurrency (default 64) over keep-alive connections. Reported:
requests per second, p50/p99 latency, and CPU milliseconds per request of the simulator and of the
client (from /proc via psutil); a simulator near 100 % CPU means the figure is its ceiling.

    python -m benchmarks.sim_throughput [--requests 3000] [--concurrency 64] [--stream]
                                        [--sim-cpu 0] [--client-cpu 1]

Writes benchmarks/results/sim_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
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
TARGET_RPS = 2000


def chat_body(stream: bool) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 120, 200)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [
        {"type": "text", "text": "Describe this product in one line."},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    doc = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": content}]}
    return json.dumps(doc).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sim(port: int, cpu: int | None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "qvl", "sim", "--zero-delay", "--model", MODEL, "--port", str(port)]
    command += ["--log-level", "warning"]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"qvl sim on port {port} did not become ready")


async def drive(url: str, payload: bytes, requests: int, concurrency: int) -> tuple[list[float], int]:
    """Send `requests` POSTs from `concurrency` workers; (latencies in seconds, failures)."""
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


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="streamed requests (SSE) instead of JSON")
    parser.add_argument("--sim-cpu", type=int, default=0, help="CPU the simulator is pinned to (-1: none)")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU the load generator is pinned to (-1: none)")
    args = parser.parse_args(argv)

    sim_cpu = None if args.sim_cpu < 0 else args.sim_cpu
    if args.client_cpu >= 0:
        os.sched_setaffinity(0, {args.client_cpu})
    port = free_port()
    sim = start_sim(port, sim_cpu)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        payload = chat_body(args.stream)
        asyncio.run(drive(url, payload, args.warmup, args.concurrency))
        sim_proc, me = psutil.Process(sim.pid), psutil.Process()
        sim_before, me_before = cpu_seconds(sim_proc), cpu_seconds(me)
        started = time.perf_counter()
        latencies, failed = asyncio.run(drive(url, payload, args.requests, args.concurrency))
        seconds = time.perf_counter() - started
        sim_cpu_s, client_cpu_s = cpu_seconds(sim_proc) - sim_before, cpu_seconds(me) - me_before
    finally:
        sim.terminate()
        sim.wait(10)

    latencies.sort()
    rps = args.requests / seconds
    result = {
        "benchmark": "sim_throughput",
        "stream": args.stream,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "failed": failed,
        "seconds": round(seconds, 3),
        "rps": round(rps, 1),
        "target_rps": TARGET_RPS,
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
        "sim_cpu_ms_per_request": round(sim_cpu_s * 1000 / args.requests, 3),
        "sim_cpu_utilisation": round(sim_cpu_s / seconds, 3),
        "client_cpu_ms_per_request": round(client_cpu_s * 1000 / args.requests, 3),
        "sim_cpu": sim_cpu,
        "client_cpu": None if args.client_cpu < 0 else args.client_cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sim_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"qvl sim --zero-delay{' (stream)' if args.stream else ''}: {rps:,.0f} requests/s "
        f"({args.requests} requests, concurrency "
        f"{args.concurrency}, {failed} failed); p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms; "
        f"sim {result['sim_cpu_ms_per_request']} ms CPU/request at {result['sim_cpu_utilisation']:.0%} "
        f"of a core; client {result['client_cpu_ms_per_request']} ms CPU/request"
    )
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
