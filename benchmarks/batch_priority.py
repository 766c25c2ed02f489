"""Batch jobs on spare capacity: does a running batch leave interactive traffic alone, fill the engines, and
give its slots back when interactive load jumps?

One run: R `qvl sim` replicas (a fixed latency model: the terms in SIM_TERMS, `--max-running` M, every
answer `--max-tokens` N tokens, priority scheduling) and one `qvl router` in front of them (answer cache
off, no auth, its batch and class settings from a config file: `in_flight_per_replica` K and the scrape
interval as given, the rest the router's defaults). Every request has the same shape: a 200-character
(50-token) text question and N output tokens; interactive and flex requests are streamed, batch lines not.

1. Capacity: a closed loop of 2 x M x R streaming clients (every engine full, a queue behind it) for
   `--capacity-s` seconds; the capacity C is the rate of answers after the first quarter.
2. Steady: open-loop Poisson interactive traffic at 60 % of C for `--steady-s` seconds without a batch,
   then a 20,000-line batch is submitted with the openai client and, once its lines run, the very same
   arrival schedule again. Per phase, after `--warm-s`: interactive TTFT P50/P99 at the client, the
   share of samples in which each engine runs anything (its own vllm:num_requests_running, every
   `--sample-s`), and in the batch phase the batch's rate (the router's qvl_batch_lines_total) as a share
   of the left-over capacity C minus the interactive rate (same request shape, so in requests/s).
3. Jump: after the batch phase's schedule, the steady traffic goes on until every replica has at least
   `--jump-when` batch lines in flight (at most `--bridge-s`; the back-off must have something to do), then
   interactive traffic at 100 % of C plus flex requests at `--flex-share` of C for `--jump-s` seconds, the
   batch still running. The time from the jump until the router's qvl_batch_in_flight (sampled every
   `--sample-s`) is at most 1 on every replica, and every answer's status by class.
4. Control: the batch cancelled and drained, the no-batch schedule once more, to show how far the cluster's
   own latency drifted over the run (the machine is shared), beside the rise the batch caused.

Targets: P99 TTFT rise with the batch < 10 % (against the no-batch phases pooled; a phase whose P99 send
lag is over 10 ms is INVALID, as in `qvl loadtest`, and left out); each engine busy > 90 % of the batch
phase; batch rate >= 80 % of the left-over capacity; back-off <= 2 s; every interactive request of the jump
answered 200, and only flex and batch ever refused with 429/503 or taken back. Each figure comes from the
raw records and samples kept in the JSON.

    python -m benchmarks.batch_priority [--replicas 2] [--max-running 16] [--max-tokens 32]
        [--in-flight-per-replica 8] [--scrape-s 1.0] [--steady-s 120] [--jump-s 30] [--lines 20000]
    python -m benchmarks.batch_priority --report-only    # re-derive the .md from the JSON
    python -m benchmarks.batch_priority --batch-setting start_interval_s=0.02 --sim-term prefill_base_ms=1 \
        --out /tmp/experiment                              # experiments: other settings, another report path

Writes benchmarks/results/batch_priority.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import yaml

from benchmarks.batch_report import derive, write_report
from benchmarks.batch_traffic import (
    ROW_FIELDS,
    Arrival,
    Record,
    batch_file,
    closed_loop,
    open_loop,
    poisson,
    sampler,
    scrape,
)
from benchmarks.common import MODEL, RESULTS, cpu_seconds, start_qvl
from loadtests.records import percentile
from qvl.procs import Child, free_port

# The simulator's latency model, fixed here (today's defaults of `qvl sim`, written out so that a change of
# the defaults does not silently change this benchmark).
SIM_TERMS = {
    "step_base_ms": 12.0,
    "per_decode_ms": 0.15,
    "per_kv_ktoken_ms": 0.04,
    "prefill_base_ms": 13.0,
    "per_text_token_ms": 0.02,
    "per_image_token_ms": 0.1,
}
STEADY_SHARE = 0.6
JUMP_SHARE = 1.0


def sim_terms(args: argparse.Namespace) -> dict[str, float]:
    """SIM_TERMS with the `--sim-term NAME=VALUE` overrides (an experiment on the latency model)."""
    terms = dict(SIM_TERMS)
    for item in args.sim_term:
        name, _, value = item.partition("=")
        if name not in terms:
            raise SystemExit(f"--sim-term: {name!r} is none of {', '.join(terms)}")
        terms[name] = float(value)
    return terms


def start_cluster(args: argparse.Namespace, tmp: Path) -> tuple[list[Child], Child, dict[str, Any]]:
    """R simulators and a router with the benchmark's batch settings; (sims, router, settings used)."""
    sim_flags = ["--model", MODEL, "--max-running", str(args.max_running), "--output-tokens", str(args.max_tokens)]
    sim_flags += ["--scheduling-policy", "priority"]
    terms = sim_terms(args)
    for name, value in terms.items():
        sim_flags += [f"--{name.replace('_', '-')}", str(value)]
    sims = []
    for _ in range(args.replicas):
        sims.append(start_qvl(["sim", *sim_flags], free_port(), "/health"))
    batch: dict[str, object] = {"in_flight_per_replica": args.in_flight_per_replica}
    for item in args.batch_setting:
        name, _, value = item.partition("=")
        batch[name] = yaml.safe_load(value)
    router_settings = {
        "load_scrape_interval_s": args.scrape_s,
        "batch": {"files_dir": str(tmp / "files"), **batch},
    }
    config = tmp / "router.yaml"
    config.write_text(json.dumps({"router": router_settings}))  # JSON is YAML
    flags = ["router", "--no-auth", "--cache", "off", "--config", str(config)]
    for sim in sims:
        flags += ["--replica", sim.url]
    router = start_qvl(flags, free_port(), "/ready")
    settings = {
        "replicas": args.replicas,
        "sim": {"max_running": args.max_running, "output_tokens": args.max_tokens, **terms},
        "request": {"prompt_tokens": 50, "max_tokens": args.max_tokens, "interactive_stream": True},
        "router": {**router_settings, "batch": batch},
    }
    return sims, router, settings


async def wait_all_healthy(session: aiohttp.ClientSession, router: str, replicas: int) -> None:
    for _ in range(300):
        async with session.get(router + "/v1/cluster") as resp:
            doc = await resp.json()
        if sum(1 for r in doc["replicas"] if r["healthy"]) == replicas:
            return
        await asyncio.sleep(0.1)
    raise SystemExit("not every replica became healthy within 30 s")


ROUTER_COUNTERS = ("qvl_admission_decisions_total", "qvl_batch_lines_total")
SIM_COUNTERS = (
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:inter_token_latency_seconds_bucket",
)


async def counters(session: aiohttp.ClientSession, router: str, sims: dict[str, str]) -> dict[str, Any]:
    """The router's admission and batch-line counters, and each engine's token, finished-request and
    inter-token-gap counters, now."""
    pages = await asyncio.gather(
        scrape(session, router, ROUTER_COUNTERS), *(scrape(session, url, SIM_COUNTERS) for url in sims.values())
    )
    return {"router": pages[0], "sims": dict(zip(sims, pages[1:], strict=True))}


async def progress(label: str, records: list[Record], samples: list[list[Any]], every_s: float = 10.0) -> None:
    """A line every `every_s`: answers so far, errors, the last interval's TTFT, batch lines completed."""
    seen = 0
    while True:
        await asyncio.sleep(every_s)
        recent = records[seen:]
        seen = len(records)
        ttfts = [r.ttft_s * 1000 for r in recent if r.ttft_s is not None]
        errors = sum(1 for r in records if r.status != 200 or r.code)
        p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
        ttft = f"TTFT p50 {p50:.0f} ms p99 {p99:.0f} ms" if p50 is not None and p99 is not None else "no TTFT"
        lines = samples[-1][2] if samples else 0
        print(
            f"  {label}: {len(records)} answered, {errors} refused/failed, last {every_s:.0f} s {ttft}; "
            f"batch lines completed {lines:.0f}",
            flush=True,
        )


async def run(args: argparse.Namespace, sims: list[Child], router: Child) -> dict[str, Any]:
    names = {f"127.0.0.1:{s.port}": s.url for s in sims}
    timeout = aiohttp.ClientTimeout(total=300)
    connector = aiohttp.TCPConnector(limit=0)
    doc: dict[str, Any] = {"phases": {}, "counters": {}}
    samples: list[list[Any]] = []
    records: list[Record] = []
    chat = router.url + "/v1/chat/completions"
    async with (
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
        aiohttp.ClientSession(timeout=timeout) as own,
    ):
        await wait_all_healthy(own, router.url, len(sims))
        clock0 = time.perf_counter()
        doc["sample_s"] = args.sample_s
        sampling = asyncio.create_task(sampler(own, names, router.url, args.sample_s, samples, clock0))

        def now() -> float:
            return round(time.perf_counter() - clock0, 3)

        procs = {"router": psutil.Process(router.pid), "bench": psutil.Process()}
        procs.update({name: psutil.Process(s.pid) for name, s in zip(names, sims, strict=True)})

        async def snap(point: str) -> None:
            machine = psutil.cpu_times()
            cpu = {name: cpu_seconds(p) for name, p in procs.items()}
            cpu["machine_busy"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
            doc["counters"][point] = {"t": now(), "cpu": cpu, **await counters(own, router.url, names)}

        # 1. Capacity.
        clients = 2 * args.max_running * len(sims)
        print(f"batch_priority: capacity: {clients} closed-loop clients for {args.capacity_s:g} s", flush=True)
        start = now()
        loop = await closed_loop(session, chat, clients, args.capacity_s, args.max_tokens)
        doc["capacity"] = {"start": start, "clients": clients, "seconds": args.capacity_s, "requests": loop}
        capacity = derive(doc, partial=True)["capacity"]["rps"]
        print(f"  capacity C = {capacity:.1f} requests/s", flush=True)

        # 2a. Steady interactive traffic, no batch.
        rng = random.Random(args.seed)
        steady = poisson(STEADY_SHARE * capacity, 0.0, args.steady_s, rng, "interactive", "no_batch")
        print(
            f"batch_priority: no batch: {STEADY_SHARE * capacity:.1f} interactive/s for {args.steady_s:g} s "
            f"({len(steady)} requests)",
            flush=True,
        )
        await snap("no_batch_start")
        doc["phases"]["no_batch"] = {"start": now(), "seconds": args.steady_s}
        shown = asyncio.create_task(progress("no batch", records, samples))
        await open_loop(session, chat, steady, args.max_tokens, 0, records)
        shown.cancel()
        await snap("no_batch_end")

        # 2b. The batch.
        client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        data = batch_file(args.lines, args.max_tokens)
        print(f"batch_priority: uploading a {args.lines}-line batch ({len(data) / 1e6:.1f} MB)", flush=True)
        upload = await client.files.create(file=("lines.jsonl", data), purpose="batch")
        batch = await client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        doc["batch"] = {"id": batch.id, "lines": args.lines, "created": now()}
        for _ in range(3000):  # validating 20,000 lines takes seconds; lines run once the job is in progress
            batch = await client.batches.retrieve(batch.id)
            if batch.status != "validating" and samples and sum(v[2] for v in samples[-1][1].values()) > 0:
                break
            await asyncio.sleep(0.1)
        else:
            raise SystemExit(f"the batch sent no line within 300 s (status {batch.status})")
        doc["batch"]["running_from"] = now()
        print(
            f"  batch {batch.id} {batch.status}; lines running after {now() - doc['batch']['created']:.1f} s; "
            f"settling {args.warm_s:g} s",
            flush=True,
        )
        await asyncio.sleep(args.warm_s)

        # 2b + 3. The same steady schedule with the batch, then the jump, in one open loop. Between the two, a
        # bridge of the steady traffic lasts until every replica has at least `--jump-when` batch lines in
        # flight (at most `--bridge-s`), so that the jump always finds something to back off.
        rng = random.Random(args.seed)
        again = poisson(STEADY_SHARE * capacity, 0.0, args.steady_s, rng, "interactive", "with_batch")
        jump = poisson(JUMP_SHARE * capacity, 0.0, args.jump_s, rng, "interactive", "jump")
        jump += poisson(args.flex_share * capacity, 0.0, args.jump_s, rng, "flex", "jump")
        jump.sort(key=lambda a: a.at)
        jumped = asyncio.Event()
        jump_at: list[float] = []

        def batch_everywhere() -> bool:
            return bool(samples) and all(v[2] >= args.jump_when for v in samples[-1][1].values())

        def schedule() -> Iterator[Arrival]:
            yield from again
            bridge = random.Random(args.seed + 1)
            t = args.steady_s
            while t < args.steady_s + args.bridge_s and not batch_everywhere():
                t += bridge.expovariate(STEADY_SHARE * capacity)
                yield Arrival(t, "interactive", "bridge")
            jump_at.append(t)
            jumped.set()
            for a in jump:
                yield Arrival(t + a.at, a.klass, a.phase)

        print(
            f"batch_priority: with the batch: the same {len(again)} requests, then (once every replica has "
            f"{args.jump_when} batch lines in flight) {JUMP_SHARE * capacity:.1f} interactive/s + "
            f"{args.flex_share * capacity:.1f} flex/s for {args.jump_s:g} s",
            flush=True,
        )
        await snap("with_batch_start")
        started = now()
        doc["phases"]["with_batch"] = {"start": started, "seconds": args.steady_s}

        async def at_jump() -> None:
            await jumped.wait()
            bridge_s = round(jump_at[0] - args.steady_s, 3)
            doc["phases"]["jump"] = {"start": round(started + jump_at[0], 3), "seconds": args.jump_s}
            doc["phases"]["jump"]["bridge_s"] = bridge_s
            await snap("jump_start")
            print(f"  the jump (after a bridge of {bridge_s:.1f} s): interactive load to 100 % of C", flush=True)

        on_jump = asyncio.create_task(at_jump())
        shown = asyncio.create_task(progress("with batch", records, samples))
        await open_loop(session, chat, schedule(), args.max_tokens, len(steady), records)
        shown.cancel()
        await on_jump
        await snap("jump_end")
        final = await client.batches.retrieve(batch.id)
        counts = final.request_counts
        doc["batch"]["request_counts_at_end"] = counts.model_dump() if counts is not None else None
        await client.batches.cancel(batch.id)
        await client.close()

        # 4. Control: the cluster's drift over the run (CPU shared with other work) shows as the difference
        # between this copy of the no-batch phase and the first one.
        if args.control:
            for _ in range(600):
                if samples and sum(v[2] for v in samples[-1][1].values()) == 0:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(2.0)
            rng = random.Random(args.seed)
            control = poisson(STEADY_SHARE * capacity, 0.0, args.steady_s, rng, "interactive", "control")
            sent = len(records)
            print("batch_priority: control: the no-batch schedule again, the batch cancelled", flush=True)
            await snap("control_start")
            doc["phases"]["control"] = {"start": now(), "seconds": args.steady_s}
            shown = asyncio.create_task(progress("control", records, samples))
            await open_loop(session, chat, control, args.max_tokens, 1_000_000 + sent, records)
            shown.cancel()
            await snap("control_end")
        sampling.cancel()
    doc["records_fields"] = list(ROW_FIELDS)
    doc["records"] = [r.row() for r in records]
    doc["samples"] = samples
    return doc


def dump(doc: dict[str, Any]) -> str:
    """Pretty JSON, with each raw record and sample on one line of its own (a diff stays readable)."""
    raw = {k: doc[k] for k in ("records", "samples")}
    head = {k: v for k, v in doc.items() if k not in raw}
    head["capacity"] = {k: v for k, v in doc["capacity"].items() if k != "requests"}
    text = json.dumps(head, indent=2)[:-2]
    for key, rows in (("capacity_requests", doc["capacity"]["requests"]), *raw.items()):
        body = ",\n".join("    " + json.dumps(row, separators=(",", ":")) for row in rows)
        text += f',\n  "{key}": [\n{body}\n  ]'
    return text + "\n}\n"


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    doc["capacity"]["requests"] = doc.pop("capacity_requests")
    return doc


def code_version() -> dict[str, object]:
    """The commit measured, and whether the router's or the simulator's code differed from it."""
    root = Path(__file__).resolve().parents[1]

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "uncommitted": git("status", "--porcelain", "router", "serving", "qvl")}


def engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulated fleet's shape and latency model (also batch_frontier's, which runs the same engine)."""
    parser.add_argument("--replicas", type=int, default=2, help="simulated replicas (R)")
    parser.add_argument("--max-running", type=int, default=16, help="requests each engine runs at once (M)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens of every request (N)")
    parser.add_argument(
        "--sim-term", action="append", default=[], metavar="NAME=VALUE", help="change one latency term (repeat)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    engine_arguments(parser)
    parser.add_argument("--in-flight-per-replica", type=int, default=8, help="router.batch.in_flight_per_replica")
    parser.add_argument("--scrape-s", type=float, default=1.0, help="router.load_scrape_interval_s")
    parser.add_argument("--capacity-s", type=float, default=24.0, help="length of the closed-loop saturation")
    parser.add_argument("--steady-s", type=float, default=120.0, help="length of each 60 %% phase")
    parser.add_argument("--warm-s", type=float, default=5.0, help="start of each phase left out of its figures")
    parser.add_argument("--jump-s", type=float, default=30.0, help="length of the 100 %% phase")
    parser.add_argument(
        "--jump-when", type=int, default=3, help="batch lines in flight on every replica that start the jump"
    )
    parser.add_argument("--bridge-s", type=float, default=30.0, help="longest wait for --jump-when at 60 %%")
    parser.add_argument("--flex-share", type=float, default=0.1, help="flex rate in the jump, as a share of C")
    parser.add_argument("--lines", type=int, default=20_000, help="lines of the batch")
    parser.add_argument("--sample-s", type=float, default=0.1, help="interval of the /metrics samples")
    parser.add_argument("--seed", type=int, default=7, help="seed of the arrival schedules")
    parser.add_argument(
        "--no-control", dest="control", action="store_false", help="skip the no-batch phase run again at the end"
    )
    parser.add_argument(
        "--batch-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another router.batch setting, e.g. start_interval_s=0.05 (repeat)",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "batch_priority", help="the report's path without .json/.md"
    )
    parser.add_argument("--report-only", action="store_true", help="re-derive the report from the JSON")
    args = parser.parse_args()
    path = args.out.with_suffix(".json")
    if args.report_only:
        write_report(load(path), path.with_suffix(".md"))
        return 0

    began = time.monotonic()
    code = code_version()  # now: the router and simulators about to start run this code
    with tempfile.TemporaryDirectory(prefix="qvl-batch-bench-") as tmp:
        sims, router, settings = start_cluster(args, Path(tmp))
        try:
            doc = asyncio.run(run(args, sims, router))
        finally:
            router.stop(10)
            for sim in sims:
                sim.stop(10)
    doc = {
        "benchmark": "batch_priority",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "run_seconds": round(time.monotonic() - began, 1),
        "code": code,
        "settings": settings,
        "phase_settings": {
            "steady_share": STEADY_SHARE,
            "jump_share": JUMP_SHARE,
            "flex_share": args.flex_share,
            "warm_s": args.warm_s,
            "jump_when": args.jump_when,
            "seed": args.seed,
        },
        **doc,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump(doc))
    write_report(doc, path.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
