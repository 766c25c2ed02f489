"""How fast a cache hit is answered, against the floor a Redis round trip sets.

One run: a redis-server on a free port, a `qvl sim --zero-delay` replica, and two routers (cache on
Redis, cache in memory). One deterministic image question is asked once to store it; then N hits are
timed one after another through each router over a keep-alive connection, and N bare Redis GETs of
the same entry (redis-py asyncio) are timed the same way. Target: a hit in at most 1 ms p50 at the
router.

    python -m benchmarks.cache_hits [--requests 2000]

Writes benchmarks/results/cache_hits.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from benchmarks.common import RESULTS, chat_body, percentiles_ms, start_qvl
from qvl.procs import free_port, port_free, spawn

TARGET_P50_MS = 1.0


def deterministic_question() -> bytes:
    doc = json.loads(chat_body(stream=False, max_tokens=16))
    doc["temperature"] = 0
    return json.dumps(doc).encode()


async def time_hits(url: str, body: bytes, n: int) -> list[float]:
    latencies = []
    async with aiohttp.ClientSession() as session:
        for i in range(n + 50):
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                await resp.read()
                if resp.headers.get("x-qvl-cache") != "hit" and i > 0:
                    raise SystemExit(f"expected a cache hit, got {resp.headers.get('x-qvl-cache')}")
            if i >= 50:  # the first 50 warm the connection and the caches
                latencies.append(time.perf_counter() - started)
    return latencies


async def time_redis_gets(url: str, n: int) -> tuple[list[float], int]:
    client = aioredis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match="qvl:a:*")]
        if len(keys) != 1:
            raise SystemExit(f"expected one stored answer in Redis, found {len(keys)}")
        size = len(await client.get(keys[0]) or b"")
        latencies = []
        for i in range(n + 50):
            started = time.perf_counter()
            await client.get(keys[0])
            if i >= 50:
                latencies.append(time.perf_counter() - started)
        return latencies, size
    finally:
        await client.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()

    redis_port, sim_port = free_port(), free_port()
    redis_proc = spawn(
        "redis-server",
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        log=Path(tempfile.gettempdir()) / f"qvl-bench-redis-{redis_port}.log",
    )
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    procs = [redis_proc]
    try:
        redis_proc.wait_ready(10, check=lambda: not port_free("127.0.0.1", redis_port), interval_s=0.05)
        procs.append(start_qvl(["sim", "--zero-delay", "--model", "qwen3-vl-sim"], sim_port, "/health"))
        replica = f"http://127.0.0.1:{sim_port}"
        rows = {}
        body = deterministic_question()
        for backend in (redis_url, "memory"):
            port = free_port()
            procs.append(start_qvl(["router", "--replica", replica, "--cache", backend, "--no-auth"], port, "/ready"))
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            latencies = asyncio.run(time_hits(url, body, args.requests))
            rows["router hit (redis)" if backend != "memory" else "router hit (memory)"] = percentiles_ms(latencies)
        gets, size = asyncio.run(time_redis_gets(redis_url, args.requests))
        rows["bare Redis GET"] = percentiles_ms(gets)
    finally:
        for proc in reversed(procs):
            proc.stop(10)
    report(rows, args.requests, size)
    return 0


def report(rows: dict[str, tuple[float, float]], n: int, size: int) -> None:
    doc = {
        "benchmark": "cache_hits",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "requests": n,
        "entry_bytes": size,
        "target_router_hit_p50_ms": TARGET_P50_MS,
        "latency_ms": {name: {"p50": round(p50, 3), "p99": round(p99, 3)} for name, (p50, p99) in rows.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cache_hits.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Cache hits",
        "",
        f"{n} sequential requests over one keep-alive connection each; a {size}-byte stored answer; "
        f"{os.cpu_count()} CPUs; {doc['when']}.",
        "",
        "| path | p50 ms | p99 ms |",
        "|---|---:|---:|",
        *[f"| {name} | {p50:.3f} | {p99:.3f} |" for name, (p50, p99) in rows.items()],
        "",
        f"Target: a hit answered in at most {TARGET_P50_MS} ms p50 at the router. The router's figure includes "
        "the client's HTTP round trip; the Redis figure is one GET from redis-py asyncio.",
        "",
    ]
    (RESULTS / "cache_hits.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
