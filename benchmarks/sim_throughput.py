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
import json
import os
import platform
import sys
import time

import psutil

from benchmarks.common import MODEL, RESULTS, chat_body, cpu_seconds, drive, percentiles_ms, start_qvl
from qvl.procs import free_port

TARGET_RPS = 2000


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
    sim = start_qvl(["sim", "--zero-delay", "--model", MODEL], port, "/health", sim_cpu)
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
        sim.stop(10)

    p50_ms, p99_ms = percentiles_ms(latencies)
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
        "p50_ms": round(p50_ms, 2),
        "p99_ms": round(p99_ms, 2),
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
