"""Routing policies compared on the same workload: round-robin, least-loaded and image-affinity in front of the
same replicas, on the catalogue workload (Zipf, alpha 1.0), answer cache off so every request reaches an engine.

For each engine (`sim`: 4 `qvl sim` replicas; `vllm`: 2 vLLM CPU replicas of the tiny model, each on its own
core) and each policy, `qvl up` starts the replicas and a router, and two regimes run one after the other:
a catalogue that fits in each replica's engine image cache (K = C) and one four times larger (K = 4C). Each
regime has its own seed, so none of its photos is cached by the regime before it; every policy sends the
same requests in the same order, from a closed loop of `--concurrency` clients. Per (regime, policy): the
engines' image-cache (`vllm:mm_cache_*`) and prefix-cache (`vllm:prefix_cache_*`) hit ratios from the
deltas of their own counters, P50/P99 TTFT at the client, throughput, requests per replica (from
`x-qvl-replica`) and the most-loaded replica's share (its requests over the mean), beside the image-cache
hit ratio loadtests/popularity.py predicts for R replicas behind that policy (image-affinity: from the
ring's owner of each photo, computed here as the router computes it). Target: in the large regime
image-affinity reaches twice round-robin's image-cache hit ratio, no replica above 1.25 times the mean.

The workload is loadtests/workloads/catalogue.yaml with, in memory: the regime's catalogue size and seed, a
closed loop of `--requests` requests, every task streamed (for TTFT) with `--max-tokens` tokens; on vLLM
every photo is 256x256 (64 image tokens: the tiny model on a CPU), answers run to their length
(`ignore_eos`), and the engine's caches are sized in bytes: the processor cache for about C photos, the KV
cache for the running batch plus about C prompts.

`--puzzle` reproduces a new user's run instead: 300 requests over 60 photos of the shipped catalogue (its
photo sizes, tasks and answer lengths, run to their length) on 2 vLLM replicas with `qvl up`'s defaults,
each policy in turn (a router of its own in front of the same replicas, photos of its own so that every
policy starts cold), once with each replica bound to its own core as `qvl up` binds them and once unbound
(vLLM's own binding), sampling the router's view of each replica every 0.25 s and each replica's CPU time.

    python -m benchmarks.routing_policies [--engine sim|vllm|both] [--requests N] [--concurrency N]
                                          [--cache-items C] [--max-tokens N] [--policy NAME ...]
    python -m benchmarks.routing_policies --puzzle [bound|unbound|both]

Writes benchmarks/results/routing_policies.json (every request's replica, TTFT and end-to-end time, every
replica's counter deltas, the core binding) and .md (derived from the JSON, with the puzzle's table when
routing_policies_puzzle.json, which `--puzzle` writes, is there).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.common import RESULTS
from benchmarks.routing_report import NOTES, write_report
from benchmarks.routing_setup import (
    CATALOGUE,
    COUNTERS,
    LOAD_SAMPLE_S,
    POLICIES,
    PUZZLE_CATALOGUE,
    PUZZLE_CONCURRENCY,
    PUZZLE_REQUESTS,
    VIRTUAL_NODES,
    VLLM_PHOTO,
    Engine,
    Regime,
    ratio,
    regimes,
)
from loadtests.popularity import RoutingPolicy, engine_hit_ratio_by_policy
from loadtests.records import percentile
from loadtests.schedule import ImageStore, PlannedRequest, build_body, build_schedule
from loadtests.sse import EventSplitter
from loadtests.workload import Workload, load_workload, parse_workload
from qvl.procs import Child, StartError, free_port, spawn
from qvl.settings import ReplicaSettings
from router.hashring import HashRing, digest_point
from serving.tiny_model import SERVED_NAME, ensure_tiny_model
from serving.vllm_replica import launch, plan_replica, plan_replicas


def derive_workload(base: Workload, engine: Engine, regime: Regime) -> Workload:
    """The catalogue workload of one regime: its catalogue size and seed, a closed loop, streamed tasks."""
    doc = base.model_dump()
    doc["seed"] = regime.seed
    doc["popularity"].update(catalogue=regime.catalogue, engine_cache_items=engine.cache_items)
    doc["arrivals"] = {"process": "closed", "users": engine.concurrency, "requests": engine.requests}
    for task in doc["tasks"]:
        task.update(stream=True, output={"kind": "fixed", "tokens": engine.max_tokens})
    if engine.photo is not None:
        width, height = engine.photo
        doc["images"]["buckets"] = [{"name": "photo", "width": width, "height": height, "share": 1.0}]
    doc["tenants"] = [{"id": "bench", "key": "unused", "share": 1.0}]
    return parse_workload(doc, f"{base.name} ({regime.name})")


def photos(workload: Workload, salt: int = 0) -> ImageStore:
    """The workload's photos, rendered once; another `salt` renders other pixels for the same schedule."""
    return ImageStore(workload, seed=workload.seed * 1000 + salt)


def payloads(plans: Sequence[PlannedRequest], workload: Workload, model: str, photos: ImageStore) -> list[bytes]:
    """The request bodies, built before the clock starts; every answer runs to its max_tokens (`ignore_eos`,
    which vLLM honours and the simulator ignores), so that policies compare on the same work."""
    out = []
    for plan in plans:
        body = build_body(plan, workload, model, photos)
        body["ignore_eos"] = True
        out.append(json.dumps(body).encode())
    return out


@dataclass
class Sent:
    """One request as the client saw it: the raw record every figure is derived from."""

    index: int
    image: int | str
    status: int
    replica: str
    ttft_s: float | None
    e2e_s: float


def has_token(payload: str) -> bool:
    """An SSE event whose first choice carries text (loadtests/sse.py's definition of a token)."""
    try:
        choices = json.loads(payload).get("choices") or [{}]
    except (json.JSONDecodeError, AttributeError):
        return False
    return bool(choices[0].get("delta", {}).get("content"))


async def drive(
    router: str, bodies: Sequence[bytes], plans: Sequence[PlannedRequest], concurrency: int
) -> tuple[list[Sent], list[list[list[float]]]]:
    """Send every body in order from `concurrency` closed-loop clients. Returns one record per request, and
    the router's view of each replica ([in flight, engine waiting, engine running, healthy]) every 0.25 s."""
    records: list[Sent] = []
    load: list[list[list[float]]] = []
    todo = iter(range(len(bodies)))
    headers = {"content-type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:

        async def client() -> None:
            for i in todo:
                started = time.perf_counter()
                ttft = None
                async with session.post(router + "/v1/chat/completions", data=bodies[i], headers=headers) as resp:
                    events = EventSplitter()
                    async for chunk in resp.content.iter_any():
                        if ttft is None and any(has_token(p) for p in events.feed(chunk)):
                            ttft = time.perf_counter() - started
                    replica, status = resp.headers.get("x-qvl-replica", "none"), resp.status
                image = plans[i].images[0].id
                records.append(Sent(i, image, status, replica, ttft, time.perf_counter() - started))

        async def sample() -> None:
            # A session of its own: in the clients' pool it would wait for a free connection, and so see
            # only the moments when fewer requests are open.
            async with aiohttp.ClientSession() as own:
                while True:
                    async with own.get(router + "/v1/cluster") as resp:
                        doc = await resp.json()
                    load.append(
                        [
                            [r["in_flight"], r["engine_waiting"], r["engine_running"], r["healthy"]]
                            for r in doc["replicas"]
                        ]
                    )
                    await asyncio.sleep(LOAD_SAMPLE_S)

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(client() for _ in range(concurrency)))
        sampler.cancel()
    return records, load


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return await resp.json()


async def scrape(urls: Sequence[str]) -> dict[str, dict[str, float]]:
    """Each replica's vllm: counters named in COUNTERS (summed over label sets), by replica URL."""

    async def one(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
        async with session.get(url + "/metrics") as resp:
            text = await resp.text()
        values = dict.fromkeys(COUNTERS, 0.0)
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0].removeprefix("vllm:").removesuffix("_total")
            if name in values and line.split("{", 1)[0].split(" ", 1)[0].endswith("_total"):
                values[name] += float(line.rsplit(" ", 1)[1])
        return values

    async with aiohttp.ClientSession() as session:
        found = await asyncio.gather(*(one(session, u) for u in urls))
    return dict(zip(urls, found, strict=True))


async def measure(
    router: str, plans: Sequence[PlannedRequest], bodies: Sequence[bytes], concurrency: int, urls: Sequence[str]
) -> tuple[float, list[Sent], list[list[list[float]]], dict[str, dict[str, float]]]:
    """One run: counters before, the load, counters after; (wall seconds, records, load samples, deltas)."""
    before = await scrape(urls)
    started = time.perf_counter()
    records, load = await drive(router, bodies, plans, concurrency)
    wall = time.perf_counter() - started
    await asyncio.sleep(1.5)  # vLLM's API server updates its counters from the engine a moment later
    after = await scrape(urls)
    return wall, records, load, {u: {k: after[u][k] - before[u][k] for k in COUNTERS} for u in urls}


def ring_owners(plans: Sequence[PlannedRequest], photos: ImageStore, names: Sequence[str]) -> dict[int | str, str]:
    """The replica the router's ring gives each photo of the run: the first name clockwise from the point of
    its SHA-256, which image-affinity takes unless that replica is over its bounded load."""
    ring = HashRing(names, VIRTUAL_NODES)
    owners: dict[int | str, str] = {}
    for plan in plans:
        ref = plan.images[0]
        if ref.id not in owners:
            owners[ref.id] = next(ring.walk(digest_point(hashlib.sha256(photos.get(ref)).hexdigest())))
    return owners


def replay_lru(records: Sequence[Sent], capacity: int) -> float:
    """The image-cache hit ratio exact LRU caches of `capacity` photos, one per replica, would have had over
    the requests each replica actually got, in send order: the model's question with the routing known."""
    per: dict[str, list[int | str]] = {}
    for r in sorted(records, key=lambda r: r.index):
        per.setdefault(r.replica, []).append(r.image)
    hits = 0
    for images in per.values():
        lru: dict[int | str, None] = {}
        for image in images:
            if image in lru:
                hits += 1
                del lru[image]
            elif len(lru) == capacity:
                del lru[next(iter(lru))]
            lru[image] = None
    return hits / len(records) if records else 0.0


@dataclass
class Run:
    """One (engine, regime, policy): raw records, load samples, counter deltas, and what derives from them."""

    engine: str
    regime: str
    catalogue: int
    policy: str
    replicas: list[str]
    wall_s: float
    records: list[Sent]
    load: list[list[list[float]]]
    counters: dict[str, dict[str, float]]
    owners: dict[str, str]
    predicted_image_hit: float | None
    cache_items: int
    derived: dict[str, Any] = field(default_factory=dict)

    def derive(self) -> None:
        ok = [r for r in self.records if r.status == 200]
        per = Counter(r.replica for r in ok)
        counts = [per.get(name, 0) for name in self.replicas]
        mean = len(ok) / len(self.replicas)
        ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
        e2e = [r.e2e_s for r in ok]
        total = {k: sum(c[k] for c in self.counters.values()) for k in COUNTERS}
        image = ratio(total["mm_cache_hits"], total["mm_cache_queries"])
        spilled = [r for r in ok if str(r.image) in self.owners and self.owners[str(r.image)] != r.replica]
        samples = max(1, len(self.load))
        self.derived = {
            "ok": len(ok),
            "failed": len(self.records) - len(ok),
            "requests_per_replica": counts,
            "max_share": max(counts) / mean if mean else None,
            "ttft_p50_ms": percentile(ttfts, 50),
            "ttft_p99_ms": percentile(ttfts, 99),
            "e2e_p50_s": percentile(e2e, 50),
            "e2e_mean_s": sum(e2e) / len(e2e) if e2e else None,
            "throughput_rps": len(ok) / self.wall_s,
            "image_hit": image,
            "image_hit_per_replica": [ratio(c["mm_cache_hits"], c["mm_cache_queries"]) for c in self.counters.values()],
            "prefix_hit": ratio(total["prefix_cache_hits"], total["prefix_cache_queries"]),
            "generation_tokens": total["generation_tokens"],
            "replay_hit": replay_lru(ok, self.cache_items) if self.cache_items else None,
            "prediction_error": None
            if image is None or self.predicted_image_hit is None
            else image - self.predicted_image_hit,
            "spilled_share": len(spilled) / len(ok) if self.owners and ok else None,
            "mean_in_flight": [sum(s[i][0] for s in self.load) / samples for i in range(len(self.replicas))],
            "mean_engine_running": [sum(s[i][2] for s in self.load) / samples for i in range(len(self.replicas))],
            "healthy_share": [sum(bool(s[i][3]) for s in self.load) / samples for i in range(len(self.replicas))],
        }


def say(message: str) -> None:
    print(f"[routing_policies] {message}", flush=True)


def summary(run: Run) -> str:
    d = run.derived
    predicted = "" if run.predicted_image_hit is None else f" (predicted {run.predicted_image_hit:.3f})"
    return (
        f"{run.engine} {run.regime} {run.policy}: {d['ok']} ok, {d['failed']} failed in {run.wall_s:.1f}s, image hit "
        f"{d['image_hit'] or 0:.3f}{predicted}, per replica {d['requests_per_replica']}, "
        f"in flight {[round(x, 1) for x in d['mean_in_flight']]}, healthy {[round(x, 2) for x in d['healthy_share']]}"
    )


def thread_cores(pid: int) -> list[str]:
    """The distinct core lists the threads of a process may run on (Cpus_allowed_list in /proc)."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found = re.search(r"^Cpus_allowed_list:\s*(\S+)", (task / "status").read_text(), re.M)
        except OSError:
            continue
        if found:
            lists.add(found.group(1))
    return sorted(lists)


def process_cores(root: psutil.Process) -> dict[str, list[str]]:
    """Each process of a vLLM replica (API server, engine core, worker) with its threads' core lists."""
    procs = [root, *root.children(recursive=True)]
    return {
        ("api_server" if p.pid == root.pid else p.name().removeprefix("VLLM::")): thread_cores(p.pid) for p in procs
    }


def replica_roots(up: Child) -> dict[int, psutil.Process]:
    """The vLLM API servers `qvl up` started, by port."""
    roots = {}
    for proc in psutil.Process(up.pid).children(recursive=True):
        cmd = proc.cmdline()
        if "vllm.entrypoints.openai.api_server" in cmd and "--port" in cmd:
            roots[int(cmd[cmd.index("--port") + 1])] = proc
    return roots


def start_up(engine: Engine, policy: str, log: Path) -> Child:
    """`qvl up` with this policy, once it prints that it is ready."""
    port = free_port()
    argv = [sys.executable, "-m", "qvl", "up", *engine.qvl_up_args(), "--policy", policy, "--port", str(port)]
    child = spawn("qvl up", argv, url=f"http://127.0.0.1:{port}", log=log, env=engine.env())
    try:
        child.wait_ready(600, check=lambda: "qvl: ready at" in child.output())
    except StartError as exc:
        child.stop(60)
        raise SystemExit(str(exc)) from exc
    return child


def run_engine(engine: Engine, policies: Sequence[RoutingPolicy], base: Workload, logs: Path) -> dict[str, Any]:
    """Every policy on this engine, both regimes each; the runs and the core binding each `qvl up` used."""
    runs: list[Run] = []
    binding: dict[str, Any] = {}
    for policy in policies:
        say(f"{engine.name}: qvl up with {engine.replicas} replicas, policy {policy}")
        started = time.perf_counter()
        up = start_up(engine, policy, logs / f"routing-{engine.name}-{policy}.log")
        say(f"{engine.name}: ready after {time.perf_counter() - started:.0f}s")
        try:
            if engine.name == "vllm":
                printed = dict(re.findall(r"(replica-\d+): (vLLM on [^;]*?) serving", up.output()))
                threads = {f"replica-{port}": process_cores(root) for port, root in replica_roots(up).items()}
                binding[policy] = {"qvl_up": printed, "threads": threads}
            for regime in regimes(engine.cache_items):
                runs.append(asyncio.run(one_run(up.url, engine, regime, policy, base)))
                say(summary(runs[-1]))
        finally:
            up.stop(60)
    return {"engine": asdict(engine), "runs": [asdict(r) for r in runs], "binding": binding}


async def one_run(router: str, engine: Engine, regime: Regime, policy: RoutingPolicy, base: Workload) -> Run:
    workload = derive_workload(base, engine, regime)
    replicas = (await get_json(router + "/v1/cluster"))["replicas"]
    urls, names = [r["url"] for r in replicas], [r["name"] for r in replicas]
    model = (await get_json(router + "/v1/models"))["data"][0]["id"]
    plans = build_schedule(workload)
    store = photos(workload)
    bodies = payloads(plans, workload, model, store)
    wall, records, load, deltas = await measure(router, plans, bodies, engine.concurrency, urls)
    owners = ring_owners(plans, store, names) if policy == "image-affinity" else {}
    by_rank = [names.index(owners[rank]) if rank in owners else rank % len(names) for rank in range(regime.catalogue)]
    predicted = engine_hit_ratio_by_policy(workload, len(names), policy, engine.requests, by_rank if owners else None)
    owned = {str(k): v for k, v in owners.items()}
    run = Run(
        engine.name,
        regime.name,
        regime.catalogue,
        policy,
        names,
        wall,
        records,
        load,
        deltas,
        owned,
        predicted,
        engine.cache_items,
    )
    run.derive()
    return run


def puzzle(base: Workload, bound: bool, policies: Sequence[RoutingPolicy], logs: Path) -> dict[str, Any]:
    """The new user's run (see the module's docstring), bound or unbound."""
    doc = base.model_dump()
    doc["popularity"]["catalogue"] = PUZZLE_CATALOGUE
    doc["arrivals"] = {"process": "closed", "users": PUZZLE_CONCURRENCY, "requests": PUZZLE_REQUESTS}
    doc["tenants"] = [{"id": "bench", "key": "unused", "share": 1.0}]
    workload = parse_workload(doc, "catalogue (puzzle)")
    plans = build_schedule(workload)
    run_dir = Path(".qvl-run").resolve() / "bench"
    model = str(ensure_tiny_model(Path(".qvl-run").resolve() / "tiny-model"))
    spec = ReplicaSettings(model=model, served_model_name=SERVED_NAME)
    ports = [free_port(), free_port()]
    if bound:
        planned = plan_replicas(spec, model, ports, [], run_dir, os.environ)
    else:
        env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS")}
        planned = [plan_replica(spec, model, spec.host, p, (), run_dir / f"replica-{p}", env) for p in ports]
    say(f"puzzle: 2 vLLM replicas, {'bound to cores ' + str([p.cpus for p in planned]) if bound else 'unbound'}")
    replicas = [launch(p, "127.0.0.1") for p in planned]
    runs = []
    try:
        for child in replicas:
            child.wait_ready(600)
        urls, names = [c.url for c in replicas], [f"127.0.0.1:{c.port}" for c in replicas]
        cores = {f"replica-{c.port}": process_cores(psutil.Process(c.pid)) for c in replicas}
        for salt, policy in enumerate(policies, start=1):
            router = start_router(urls, policy, logs / f"puzzle-router-{policy}.log")
            try:
                bodies = payloads(plans, workload, SERVED_NAME, photos(workload, salt))
                cpu_before = tree_cpu(replicas)
                wall, records, load, deltas = asyncio.run(measure(router.url, plans, bodies, PUZZLE_CONCURRENCY, urls))
                cpu_after = tree_cpu(replicas)
            finally:
                router.stop(10)
            run = Run("vllm", "puzzle", PUZZLE_CATALOGUE, policy, names, wall, records, load, deltas, {}, None, 0)
            run.derive()
            run.derived["cpu_s"] = [
                {k: b[k] - a.get(k, 0.0) for k in b} for a, b in zip(cpu_before, cpu_after, strict=True)
            ]
            say(
                f"{'bound' if bound else 'unbound'}: {summary(run)}, "
                f"cpu {[round(sum(c.values())) for c in run.derived['cpu_s']]}"
            )
            runs.append(asdict(run))
    finally:
        for child in replicas:
            child.terminate()
        for child in replicas:
            child.stop()
    return {"bound": bound, "cores": cores, "runs": runs}


def start_router(urls: Sequence[str], policy: str, log: Path) -> Child:
    port = free_port()
    argv = [sys.executable, "-m", "qvl", "router", "--policy", policy, "--cache", "off", "--no-auth"]
    argv += [a for u in urls for a in ("--replica", u)] + ["--port", str(port), "--log-level", "info"]
    child = spawn("qvl router", argv, url=f"http://127.0.0.1:{port}", log=log)
    child.wait_ready(60, "/ready", interval_s=0.2)
    return child


def tree_cpu(children: Sequence[Child]) -> list[dict[str, float]]:
    """CPU seconds so far of each replica's processes, by process (API server, engine core, worker)."""
    out = []
    for child in children:
        root = psutil.Process(child.pid)
        seconds: dict[str, float] = {}
        for proc in [root, *root.children(recursive=True)]:
            name = "api_server" if proc.pid == child.pid else proc.name().removeprefix("VLLM::")
            times = proc.cpu_times()
            seconds[name] = seconds.get(name, 0.0) + times.user + times.system
        out.append(seconds)
    return out


def compact(value: Any) -> Any:
    """`value` with every float rounded to 4 decimals (0.1 ms in seconds): the JSON stays small."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["sim", "vllm", "both"], default="both")
    parser.add_argument("--requests", type=int, help="requests per run (default: sim 1000, vllm 240)")
    parser.add_argument("--concurrency", type=int, help="closed-loop clients (default: sim 16, vllm 8)")
    parser.add_argument("--cache-items", type=int, default=8, help="C, photos one replica's image cache holds")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--policy", action="append", choices=POLICIES, help="a policy to run (default: all three)")
    parser.add_argument("--puzzle", nargs="?", const="both", choices=["bound", "unbound", "both"])
    parser.add_argument("--report-only", action="store_true", help="re-make the .md from the JSON files")
    args = parser.parse_args()
    base = load_workload(CATALOGUE)
    logs = Path(".qvl-run").resolve() / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(exist_ok=True)
    policies: list[RoutingPolicy] = args.policy or list(POLICIES)
    puzzle_path, main_path = RESULTS / "routing_policies_puzzle.json", RESULTS / "routing_policies.json"
    if args.puzzle:
        found = [
            puzzle(base, bound, policies, logs)
            for bound in {"bound": [True], "unbound": [False]}.get(args.puzzle, [True, False])
        ]
        puzzle_path.write_text(json.dumps(compact(found)) + "\n")
    elif not args.report_only:
        engines = []
        if args.engine in ("sim", "both"):
            engines.append(
                Engine("sim", 4, args.cache_items, args.concurrency or 16, args.requests or 1000, args.max_tokens, None)
            )
        if args.engine in ("vllm", "both"):
            engines.append(
                Engine(
                    "vllm",
                    2,
                    args.cache_items,
                    args.concurrency or 8,
                    args.requests or 240,
                    args.max_tokens,
                    VLLM_PHOTO,
                )
            )
        doc = {
            "benchmark": "routing_policies",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "workload": str(CATALOGUE.relative_to(CATALOGUE.parents[2])),
            "engines": [run_engine(e, policies, base, logs) for e in engines],
        }
        main_path.write_text(json.dumps(compact(doc)) + "\n")
    if main_path.exists():
        puzzle_doc = json.loads(puzzle_path.read_text()) if puzzle_path.exists() else None
        report = write_report(json.loads(main_path.read_text()), puzzle_doc, NOTES)
        (RESULTS / "routing_policies.md").write_text(report)
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
