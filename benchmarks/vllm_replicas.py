"""A real vLLM replica on this machine: start-up time, memory, and what continuous batching buys.

Starts one vLLM replica (the tiny Qwen3-VL, or `--model PATH`) with the router in front, then sends
16 image questions one after another and the same 16 at once, several rounds. Reported: seconds to
/health, resident memory of the replica's whole process tree (API server and engine core), and the
ratio of concurrent to sequential wall time (below 1: batching helps). No target; figures only.

    python -m benchmarks.vllm_replicas [--model PATH] [--requests 16] [--rounds 3] [--max-tokens 32]

Writes benchmarks/results/vllm_replicas.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import psutil
from PIL import Image

from benchmarks.common import RESULTS, start_qvl
from qvl.procs import free_port
from qvl.settings import ReplicaSettings
from serving.tiny_model import SERVED_NAME, ensure_tiny_model
from serving.vllm_replica import detect_gpus, launch, plan_replicas


def image_question(index: int, max_tokens: int, model: str) -> bytes:
    buf = io.BytesIO()
    # A distinct image per request, so no request is served from vLLM's prefix or multimodal cache.
    Image.new("RGB", (128, 96), (index % 256, (index // 256) * 53 % 256, 160)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    doc = {
        "model": model,
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,  # every answer has the same length, so rounds compare
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What product is this and what colour is it?"},
                    {"type": "image_url", "image_url": {"url": url}},
                ],
            }
        ],
    }
    return json.dumps(doc).encode()


async def send(session: aiohttp.ClientSession, url: str, body: bytes) -> None:
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
        await resp.read()
        if resp.status != 200:
            raise SystemExit(f"request failed with HTTP {resp.status}")


async def sequential_and_concurrent(url: str, first: list[bytes], second: list[bytes]) -> tuple[float, float]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        for body in first:
            await send(session, url, body)
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(send(session, url, body) for body in second))
        concurrent = time.perf_counter() - started
    return sequential, concurrent


def tree_rss_mib(pid: int) -> float:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the tiny test model)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    run_dir = Path(".qvl-run").resolve() / "bench"
    model = args.model or str(ensure_tiny_model(Path(".qvl-run").resolve() / "tiny-model"))
    name = SERVED_NAME if not args.model else Path(model).name
    spec = ReplicaSettings(model=model, served_model_name=name, max_num_seqs=max(16, args.requests))
    (plan,) = plan_replicas(spec, model, [free_port()], detect_gpus(), run_dir, os.environ)
    print(f"starting vLLM on the {plan.device} ({name}) ...", flush=True)
    replica = launch(plan, "127.0.0.1")
    router = None
    try:
        startup_s = replica.wait_ready(spec.startup_timeout_s)
        rss_idle = tree_rss_mib(replica.pid)
        print(f"healthy after {startup_s:.1f}s, {rss_idle:.0f} MiB", flush=True)
        router_port = free_port()
        router = start_qvl(["router", "--replica", replica.url, "--no-auth"], router_port, "/ready")
        url = f"http://127.0.0.1:{router_port}/v1/chat/completions"
        n = args.requests
        bodies = [image_question(i, args.max_tokens, name) for i in range((2 * args.rounds + 1) * n)]
        asyncio.run(sequential_and_concurrent(url, bodies[:2], bodies[2:4]))  # warm-up
        rounds = []
        for i in range(args.rounds):
            first = bodies[(2 * i + 1) * n : (2 * i + 2) * n]
            second = bodies[(2 * i + 2) * n : (2 * i + 3) * n]
            sequential, concurrent = asyncio.run(sequential_and_concurrent(url, first, second))
            rounds.append(
                {
                    "sequential_s": round(sequential, 3),
                    "concurrent_s": round(concurrent, 3),
                    "ratio": round(concurrent / sequential, 3),
                }
            )
            print(
                f"round {i + 1}: {args.requests} sequential {sequential:.2f}s, "
                f"concurrent {concurrent:.2f}s, ratio {concurrent / sequential:.2f}",
                flush=True,
            )
        rss_loaded = tree_rss_mib(replica.pid)
    finally:
        if router is not None:
            router.stop(10)
        replica.stop()
    report(plan.device, name, args, startup_s, rss_idle, rss_loaded, rounds)
    return 0


def report(
    device: str,
    model: str,
    args: argparse.Namespace,
    startup_s: float,
    rss_idle: float,
    rss_loaded: float,
    rounds: list[dict[str, float]],
) -> None:
    ratio = statistics.median(r["ratio"] for r in rounds)
    doc = {
        "benchmark": "vllm_replicas",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "device": device},
        "model": model,
        "startup_s": round(startup_s, 1),
        "rss_mib_idle": round(rss_idle),
        "rss_mib_after_load": round(rss_loaded),
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "rounds": rounds,
        "median_concurrent_over_sequential": ratio,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm_replicas.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# vLLM replica",
        "",
        f"One replica of `{model}` on the {device} ({os.cpu_count()} CPUs), behind the router; {doc['when']}.",
        "",
        f"- start-up to /health: {startup_s:.1f} s",
        f"- memory of the replica's process tree: {rss_idle:.0f} MiB idle, {rss_loaded:.0f} MiB after the load",
        f"- {args.requests} image questions ({args.max_tokens} tokens each), concurrent vs sequential wall time:",
        "",
        "| round | sequential s | concurrent s | concurrent / sequential |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {i + 1} | {r['sequential_s']:.2f} | {r['concurrent_s']:.2f} | {r['ratio']:.2f} |"
        for i, r in enumerate(rounds)
    ]
    lines += [
        "",
        f"Median ratio {ratio:.2f}: {args.requests} concurrent requests take {ratio:.0%} of the "
        "sequential time (continuous batching).",
        "",
    ]
    (RESULTS / "vllm_replicas.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
