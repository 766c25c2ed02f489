"""What the router costs: the same load sent straight to one simulated replica and through the router.

Load: N chat requests, each with a small PNG, at a fixed concurrency (default 2,000 at 64), against a
`qvl sim --zero-delay` replica, so nearly all time is HTTP and proxy work. Reported per path: requests
per second, p50/p99 latency, and CPU milliseconds per request of the router and of the replica
(read from /proc via psutil around each phase). Target: at most 0.25 ms of router CPU per request.

    python -m benchmarks.router_overhead [--requests 2000] [--concurrency 64] [--stream]

Writes benchmarks/results/router_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import psutil

from benchmarks.common import MODEL, RESULTS, chat_body, cpu_seconds, drive, percentiles_ms, start_qvl
from qvl.procs import free_port

TARGET_MS = 0.25


@dataclass
class Phase:
    path: str
    stream: bool
    requests: int
    concurrency: int
    failed: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    router_cpu_ms_per_request: float | None
    replica_cpu_ms_per_request: float
    client_cpu_ms_per_request: float
    rounds: int = 1
    router_cpu_ms_per_request_range: tuple[float, float] | None = None


def median_phase(rounds: list[Phase]) -> Phase:
    """Each figure's median over the rounds (this machine's noise is large), with the router CPU range."""

    def med(name: str) -> float:
        return float(statistics.median(getattr(r, name) for r in rounds))

    first = rounds[0]
    cpu = [r.router_cpu_ms_per_request for r in rounds if r.router_cpu_ms_per_request is not None]
    return Phase(
        path=first.path,
        stream=first.stream,
        requests=first.requests,
        concurrency=first.concurrency,
        failed=sum(r.failed for r in rounds),
        seconds=med("seconds"),
        rps=med("rps"),
        p50_ms=med("p50_ms"),
        p99_ms=med("p99_ms"),
        router_cpu_ms_per_request=round(statistics.median(cpu), 4) if cpu else None,
        replica_cpu_ms_per_request=med("replica_cpu_ms_per_request"),
        client_cpu_ms_per_request=med("client_cpu_ms_per_request"),
        rounds=len(rounds),
        router_cpu_ms_per_request_range=(min(cpu), max(cpu)) if cpu else None,
    )


def run_phase(
    name: str,
    url: str,
    router: psutil.Process | None,
    replica: psutil.Process,
    requests: int,
    concurrency: int,
    stream: bool,
) -> Phase:
    payload = chat_body(stream, max_tokens=8)
    asyncio.run(drive(url, payload, min(200, requests), concurrency))  # warm connections and caches
    me = psutil.Process()
    before = (cpu_seconds(router) if router else 0.0, cpu_seconds(replica), cpu_seconds(me))
    started = time.perf_counter()
    latencies, failed = asyncio.run(drive(url, payload, requests, concurrency))
    seconds = time.perf_counter() - started
    after = (cpu_seconds(router) if router else 0.0, cpu_seconds(replica), cpu_seconds(me))
    p50_ms, p99_ms = percentiles_ms(latencies)
    per_request = [(a - b) * 1000 / requests for a, b in zip(after, before, strict=True)]
    return Phase(
        path=name,
        stream=stream,
        requests=requests,
        concurrency=concurrency,
        failed=failed,
        seconds=round(seconds, 3),
        rps=round(requests / seconds, 1),
        p50_ms=round(p50_ms, 3),
        p99_ms=round(p99_ms, 3),
        router_cpu_ms_per_request=round(per_request[0], 4) if router else None,
        replica_cpu_ms_per_request=round(per_request[1], 4),
        client_cpu_ms_per_request=round(per_request[2], 4),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--stream", action="store_true", help="also measure streamed requests")
    parser.add_argument("--rounds", type=int, default=3, help="repeat each phase; the median is reported")
    args = parser.parse_args()

    sim_port, router_port = free_port(), free_port()
    sim = start_qvl(["sim", "--zero-delay", "--model", MODEL], sim_port, "/health")
    router = start_qvl(
        ["router", "--replica", f"http://127.0.0.1:{sim_port}", "--policy", "least-loaded", "--no-auth"],
        router_port,
        "/ready",
    )
    try:
        sim_ps, router_ps = psutil.Process(sim.pid), psutil.Process(router.pid)
        phases = []
        for stream in [False, True] if args.stream else [False]:
            rounds: dict[str, list[Phase]] = {"direct": [], "router": []}
            for i in range(args.rounds):
                print(f"round {i + 1}/{args.rounds}, stream={stream}: direct, then through the router", flush=True)
                rounds["direct"].append(
                    run_phase(
                        "direct",
                        f"http://127.0.0.1:{sim_port}/v1/chat/completions",
                        None,
                        sim_ps,
                        args.requests,
                        args.concurrency,
                        stream,
                    )
                )
                rounds["router"].append(
                    run_phase(
                        "router",
                        f"http://127.0.0.1:{router_port}/v1/chat/completions",
                        router_ps,
                        sim_ps,
                        args.requests,
                        args.concurrency,
                        stream,
                    )
                )
            phases += [median_phase(rounds["direct"]), median_phase(rounds["router"])]
    finally:
        for proc in (router, sim):
            proc.stop(10)
    report(phases)
    return 0 if all(p.failed == 0 for p in phases) else 1


def report(phases: list[Phase]) -> None:
    RESULTS.mkdir(exist_ok=True)
    by = {(p.path, p.stream): p for p in phases}
    added = {}
    for stream in sorted({p.stream for p in phases}):
        d, r = by[("direct", stream)], by[("router", stream)]
        added["stream" if stream else "json"] = {
            "added_p50_ms": round(r.p50_ms - d.p50_ms, 3),
            "added_p99_ms": round(r.p99_ms - d.p99_ms, 3),
            "router_cpu_ms_per_request": r.router_cpu_ms_per_request,
        }
    doc = {
        "benchmark": "router_overhead",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "target_router_cpu_ms_per_request": TARGET_MS,
        "phases": [asdict(p) for p in phases],
        "router_added": added,
    }
    (RESULTS / "router_overhead.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Router overhead",
        "",
        f"{phases[0].requests} chat requests with a 64x48 PNG, concurrency {phases[0].concurrency}, "
        f"one `qvl sim --zero-delay` replica; {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"{doc['when']}.",
        "",
        f"Each figure is the median of {phases[0].rounds} rounds; the router CPU range is min-max over rounds.",
        "",
        "| path | stream | req/s | p50 ms | p99 ms | router CPU ms/req (range) | replica CPU ms/req | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in phases:
        cpu = "-"
        if p.router_cpu_ms_per_request is not None and p.router_cpu_ms_per_request_range is not None:
            low, high = p.router_cpu_ms_per_request_range
            cpu = f"{p.router_cpu_ms_per_request:.3f} ({low:.3f}-{high:.3f})"
        lines.append(
            f"| {p.path} | {p.stream} | {p.rps:.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | {cpu} | "
            f"{p.replica_cpu_ms_per_request:.3f} | {p.failed} |"
        )
    lines += ["", f"Target: router CPU at most {TARGET_MS} ms per proxied request.", ""]
    for kind, a in added.items():
        lines.append(
            f"- {kind}: router adds p50 {a['added_p50_ms']:.2f} ms, p99 {a['added_p99_ms']:.2f} ms, "
            f"and spends {a['router_cpu_ms_per_request']:.3f} ms CPU per request."
        )
    (RESULTS / "router_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
