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
from loadtests.popularity import RoutingPolicy, engine_hit_ratio_by_policy, zipf_weights
from loadtests.records import percentile
from loadtests.schedule import ImageRef, PlannedRequest, build_body, build_schedule, render_image
from loadtests.sse import EventSplitter
from loadtests.workload import Workload, load_workload, parse_workload
from qvl.procs import Child, StartError, free_port, spawn
from qvl.settings import ReplicaSettings
from router.hashring import HashRing, digest_point
from serving.tiny_model import SERVED_NAME, ensure_tiny_model
from serving.vllm_replica import launch, plan_replica, plan_replicas

CATALOGUE = Path(__file__).resolve().parents[1] / "loadtests" / "workloads" / "catalogue.yaml"
POLICIES: tuple[RoutingPolicy, ...] = ("round-robin", "least-loaded", "image-affinity")
TARGET_RATIO = 2.0
TARGET_LOAD = 1.25
VIRTUAL_NODES = 160  # router.virtual_nodes' default: the ring rebuilt here to know each photo's owner
COUNTERS = (
    "mm_cache_queries",
    "mm_cache_hits",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "prompt_tokens",
    "generation_tokens",
)

# vLLM sizes its processor cache in bytes. Measured with vLLM 0.32.0 and the tiny model, 256x256 photos:
# 0.01 GiB held 30 (of 60 photos asked for again in reverse order, 30 were hits) and 0.002787 GiB held 7
# (its hits matched an exact LRU of 7 replayed over the requests each replica got): one photo fewer than
# the bytes hold, at 332-346 KB a photo. So C photos take (C + 1.5) x 346 KB.
VLLM_PHOTO = (256, 256)
VLLM_PHOTO_BYTES = 346_000
VLLM_PHOTO_SLACK = 1.5
# KV cache: blocks of 32 tokens (vLLM's CPU default of 128 is longer than a prompt here: nothing would be
# cached); the tiny model keeps 2 layers x (K, V) x 2 heads x 32 x 2 bytes = 512 bytes a token.
VLLM_BLOCK = 32
VLLM_TOKEN_BYTES = 512
VLLM_PROMPT_BLOCKS = 6  # a catalogue prompt with a 256x256 photo is 165 tokens (measured), its answer 16 more
VLLM_MAX_MODEL_LEN = 1024

PUZZLE_REQUESTS = 300
PUZZLE_CATALOGUE = 60
PUZZLE_CONCURRENCY = 8
LOAD_SAMPLE_S = 0.25


@dataclass(frozen=True)
class Engine:
    """One engine's cluster and load: R replicas, each caching C photos, driven by a closed loop."""

    name: str
    replicas: int
    cache_items: int
    concurrency: int
    requests: int
    max_tokens: int
    photo: tuple[int, int] | None  # every photo this size; None: the workload's own size buckets

    def qvl_up_args(self) -> list[str]:
        """`qvl up` flags beyond the policy and port: the engine, its replicas, no answer cache, cache sizes."""
        args = ["--engine", self.name, "--replicas", str(self.replicas), "--cache", "off", "--no-auth"]
        if self.name == "sim":
            return args
        blocks = max((self.concurrency + self.cache_items) * VLLM_PROMPT_BLOCKS, VLLM_MAX_MODEL_LEN // VLLM_BLOCK)
        return [
            *args,
            "--no-gpu-exporter",
            "--max-model-len",
            str(VLLM_MAX_MODEL_LEN),
            "--kv-cache-memory-bytes",
            str(blocks * VLLM_BLOCK * VLLM_TOKEN_BYTES),
            "--engine-arg",
            f"block_size={VLLM_BLOCK}",
            "--engine-arg",
            f"mm_processor_cache_gb={(self.cache_items + VLLM_PHOTO_SLACK) * VLLM_PHOTO_BYTES / 2**30:.6f}",
        ]

    def env(self) -> dict[str, str]:
        """The simulator's cache size and answer length come from its settings' environment variables."""
        env = dict(os.environ)
        if self.name == "sim":
            env["QVL_SIM__MM_CACHE_ITEMS"] = str(self.cache_items)
            env["QVL_SIM__OUTPUT_TOKENS"] = str(self.max_tokens)
        return env


@dataclass(frozen=True)
class Regime:
    name: str
    catalogue: int
    seed: int


def regimes(cache_items: int) -> list[Regime]:
    return [Regime("fits", cache_items, 101), Regime("4x cache", 4 * cache_items, 102)]


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


class Photos:
    """Encoded photos of a workload, rendered once; another `salt` renders other pixels for the same schedule."""

    def __init__(self, workload: Workload, salt: int = 0) -> None:
        self._sizes = {b.name: (b.width, b.height) for b in workload.images.buckets}
        self._seed = workload.seed * 1000 + salt
        self._bytes: dict[ImageRef, bytes] = {}

    def get(self, ref: ImageRef) -> bytes:
        data = self._bytes.get(ref)
        if data is None:
            data = self._bytes[ref] = render_image(ref, self._sizes[ref.bucket], self._seed)
        return data


def payloads(plans: Sequence[PlannedRequest], workload: Workload, model: str, photos: Photos) -> list[bytes]:
    """The request bodies, built before the clock starts; every answer runs to its max_tokens (`ignore_eos`,
    which vLLM honours and the simulator ignores), so that policies compare on the same work."""
    out = []
    for plan in plans:
        body = build_body(plan, workload, model, photos)  # type: ignore[arg-type]
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


def ring_owners(plans: Sequence[PlannedRequest], photos: Photos, names: Sequence[str]) -> dict[int | str, str]:
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


def ratio(hits: float, queries: float) -> float | None:
    return hits / queries if queries else None


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
    photos = Photos(workload)
    bodies = payloads(plans, workload, model, photos)
    wall, records, load, deltas = await measure(router, plans, bodies, engine.concurrency, urls)
    owners = ring_owners(plans, photos, names) if policy == "image-affinity" else {}
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
                bodies = payloads(plans, workload, SERVED_NAME, Photos(workload, salt))
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


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def num(x: float | None, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def ceiling(replicas: int, cache_items: int, base: Workload) -> tuple[float, float]:
    """The model's steady-state image-cache hit ratios (round-robin, image-affinity) for K = 4C."""
    doc = base.model_dump()
    doc["popularity"].update(catalogue=4 * cache_items, engine_cache_items=cache_items)
    w = parse_workload(doc)
    return engine_hit_ratio_by_policy(w, replicas, "round-robin"), engine_hit_ratio_by_policy(
        w, replicas, "image-affinity"
    )


def engine_section(result: dict[str, Any], base: Workload) -> list[str]:
    e = result["engine"]
    runs = result["runs"]
    lines = [f"## {e['name']}: {e['replicas']} replicas, image cache of C = {e['cache_items']} photos each", ""]
    if e["name"] == "sim":
        lines.append(
            f"`qvl up --engine sim` with `QVL_SIM__MM_CACHE_ITEMS={e['cache_items']}`; the catalogue's photo sizes "
            f"(800x800 and 2048x1536: 625 and 3,072 image tokens, each costing the simulator 0.1 ms to encode "
            f"when not cached); {e['requests']} requests per run, {e['concurrency']} closed-loop clients, "
            f"{e['max_tokens']} tokens per answer (12 ms apart)."
        )
    else:
        args = " ".join(Engine(**{**e, "photo": tuple(e["photo"])}).qvl_up_args())
        lines.append(
            f"`qvl up {args}`: every photo 256x256 (64 image tokens), {e['requests']} requests per run, "
            f"{e['concurrency']} closed-loop clients, {e['max_tokens']} tokens per answer."
        )
        for policy, found in result["binding"].items():
            printed = "; ".join(f"{k}: {v}" for k, v in sorted(found["qvl_up"].items()))
            threads = "; ".join(
                f"{r}: " + ", ".join(f"{p} on {'/'.join(c)}" for p, c in procs.items())
                for r, procs in sorted(found["threads"].items())
            )
            lines.append(f"Core binding ({policy}): {printed} (threads' cores: {threads}).")
            break  # every qvl up binds the same way; the JSON keeps each
    lines += [
        "",
        "| regime | K | policy | image hit | predicted | error | LRU replay | prefix hit | TTFT p50 ms | TTFT p99 ms "
        "| req/s | requests per replica | max/mean | spilled |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in runs:
        d = r["derived"]
        lines.append(
            f"| {r['regime']} | {r['catalogue']} | {r['policy']} | {pct(d['image_hit'])} "
            f"| {pct(r['predicted_image_hit'])} "
            f"| {num(d['prediction_error'], '+.3f')} | {pct(d.get('replay_hit'))} | {pct(d['prefix_hit'])} "
            f"| {num(d['ttft_p50_ms'])} "
            f"| {num(d['ttft_p99_ms'])} | {d['throughput_rps']:.1f} "
            f"| {' / '.join(map(str, d['requests_per_replica']))} | {num(d['max_share'], '.2f')} "
            f"| {num(d['spilled_share'], '.1%')} |"
        )
    big = {r["policy"]: r["derived"] for r in runs if r["regime"] == "4x cache"}
    if "round-robin" in big and "image-affinity" in big:
        rr, aff = big["round-robin"]["image_hit"] or 0.0, big["image-affinity"]["image_hit"] or 0.0
        share = big["image-affinity"]["max_share"] or 0.0
        hits_ok, load_ok = aff >= TARGET_RATIO * rr, share <= TARGET_LOAD
        verdict = "PASS" if hits_ok and load_ok else "FAIL"
        c = e["cache_items"]
        model_rr, model_aff = ceiling(e["replicas"], c, base)
        lines += [
            "",
            f"**Target (4x cache): {verdict}.** Image-affinity's image-cache hit ratio {aff:.3f} is "
            f"{aff / rr if rr else float('inf'):.2f} times round-robin's {rr:.3f} (target: at least {TARGET_RATIO:g}: "
            f"{'met' if hits_ok else 'not met'}); its most-loaded replica took {share:.2f} times the mean "
            f"(target: at most {TARGET_LOAD:g}: {'met' if load_ok else 'not met'}). In steady state the model gives "
            f"{model_rr:.3f} and {model_aff:.3f} for {e['replicas']} replicas, C = {c}, K = {4 * c}: a ratio of "
            f"{model_aff / model_rr:.2f}.",
        ]
    return [*lines, ""]


def ceiling_table(base: Workload) -> list[str]:
    lines = [
        "## How far the target can go",
        "",
        "The steady-state image-cache hit ratio the model (loadtests/popularity.py) gives for K = 4C, Zipf "
        "alpha 1.0, 2% uploads, against the cache size C (image-affinity without spill-over):",
        "",
        "| C | R = 2: round-robin | image-affinity | ratio | R = 4: round-robin | image-affinity | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in (2, 4, 8, 16, 64, 256):
        a, b = ceiling(2, c, base)
        x, y = ceiling(4, c, base)
        lines.append(f"| {c} | {a:.3f} | {b:.3f} | {b / a:.2f} | {x:.3f} | {y:.3f} | {y / x:.2f} |")
    return [*lines, ""]


def puzzle_section(found: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## The new user's run: 300 requests over 60 photos on 2 vLLM CPU replicas",
        "",
        f"The shipped catalogue workload (800x800 and 2048x1536 photos, resized by the tiny model's processor to "
        f"at most 448x448; answers of 96 or 32-64 tokens, run to their length), {PUZZLE_CATALOGUE} photos, "
        f"{PUZZLE_REQUESTS} requests from {PUZZLE_CONCURRENCY} closed-loop clients, `qvl up`'s vLLM defaults "
        "(4 GiB processor cache, 128 MiB KV cache), answer cache off. The same two replicas serve each policy "
        "in turn, each with photos of its own. Load: the router's /v1/cluster every 0.25 s.",
        "",
    ]
    for mode in found:
        cores = "; ".join(
            f"{r}: " + ", ".join(f"{p} on {'/'.join(c)}" for p, c in procs.items())
            for r, procs in mode["cores"].items()
        )
        lines.append(f"- {'bound (as qvl up binds)' if mode['bound'] else 'unbound (vLLM auto binding)'}: {cores}")
    lines += [
        "",
        "| binding | # | policy | wall s | requests per replica | mean end-to-end s per replica | mean in flight "
        "| healthy share | worker CPU s | engine core CPU s | API server CPU s | image hit |",
        "|---|---:|---|---:|---|---|---|---|---|---|---:|",
    ]
    for mode in found:
        for order, r in enumerate(mode["runs"], start=1):
            d = r["derived"]
            by: dict[str, list[float]] = {}
            for rec in r["records"]:
                by.setdefault(rec["replica"], []).append(rec["e2e_s"])
            e2e = " / ".join(num(sum(by[n]) / len(by[n]) if by.get(n) else None, ".1f") for n in r["replicas"])
            cpu = d["cpu_s"]
            lines.append(
                f"| {'bound' if mode['bound'] else 'unbound'} | {order} | {r['policy']} | {r['wall_s']:.0f} "
                f"| {' / '.join(map(str, d['requests_per_replica']))} | {e2e} "
                f"| {' / '.join(f'{x:.1f}' for x in d['mean_in_flight'])} "
                f"| {' / '.join(f'{x:.2f}' for x in d['healthy_share'])} "
                f"| {per(cpu, 'Worker')} | {per(cpu, 'EngineCore')} | {per(cpu, 'api_server')} "
                f"| {pct(d['image_hit'])} |"
            )
    return [*lines, ""]


def per(cpu: list[dict[str, float]], process: str) -> str:
    return " / ".join(f"{c.get(process, 0.0):.0f}" for c in cpu)


def find(doc: dict[str, Any], engine: str, regime: str, policy: str) -> dict[str, Any] | None:
    for result in doc["engines"]:
        for run in result["runs"]:
            if (run["engine"], run["regime"], run["policy"]) == (engine, regime, policy):
                return dict(run)
    return None


def owner_share(run: dict[str, Any]) -> float:
    """The largest share of a run's requests whose photo one replica owns on the ring."""
    owned = Counter(run["owners"].get(str(r["image"])) for r in run["records"])
    owned.pop(None, None)
    return max(owned.values()) / len(run["records"]) if owned else 0.0


def explain_engines(doc: dict[str, Any], base: Workload) -> list[str]:
    out = []
    for result in doc["engines"]:
        e, name = result["engine"], result["engine"]["name"]
        c, r, k = e["cache_items"], e["replicas"], 4 * e["cache_items"]
        rr, aff = find(doc, name, "4x cache", "round-robin"), find(doc, name, "4x cache", "image-affinity")
        fits_rr, fits_aff = find(doc, name, "fits", "round-robin"), find(doc, name, "fits", "image-affinity")
        if rr is None or aff is None or fits_rr is None or fits_aff is None:
            continue
        big, small = aff["derived"], fits_aff["derived"]
        model_rr, model_aff = ceiling(r, c, base)
        p1 = zipf_weights(k, base.popularity.alpha)[0] * (1 - base.popularity.upload_share)
        bound = -(-TARGET_LOAD * e["concurrency"] // r)
        slice_note = "" if k // r <= c else ": its own slice does not fit"
        out.append(
            f"- **{name}: why the 2x target is out of reach.** With Zipf alpha 1.0 a replica's C most popular "
            f"photos draw a large share of the requests even when the catalogue is 4C: round-robin's replicas, each "
            f"an LRU of C = {c} seeing the whole stream, keep hitting {model_rr:.0%} in steady state (model), so "
            f"twice that is {2 * model_rr:.0%}. Image-affinity's ceiling with {r} replicas is {model_aff:.0%} (each "
            f"replica's slice is {k // r} photos for {c} slots{slice_note}): a ratio of {model_aff / model_rr:.2f} "
            "at most, before any spill-over. The ratio reaches 2 only with 4 replicas and C of 5 or less (table "
            f"above). Measured: {big['image_hit']:.3f} against {rr['derived']['image_hit']:.3f}."
        )
        out.append(
            f"- **{name}: image-affinity below its prediction** ({big['prediction_error']:+.3f} with K = {k}, "
            f"{small['prediction_error']:+.3f} with K = {c}), while the LRU replay of the requests as routed matches "
            f"the measured ratio ({big['replay_hit']:.3f}, {small['replay_hit']:.3f}): the cache model holds, the "
            f"routing differs from the model's. {big['spilled_share']:.0%} and {small['spilled_share']:.0%} of the "
            "requests were answered by another replica than their photo's ring owner. The bound is on requests in "
            f"flight: with {e['concurrency']} clients and {r} replicas no replica takes more than "
            f"ceil({TARGET_LOAD:g} x {e['concurrency']} / {r}) = {bound:.0f} at once ({bound / e['concurrency']:.0%}), "
            f"while the replica owning the most photos on the ring was asked for {owner_share(aff):.0%} of the "
            f"requests (K = {k}; the most popular photo alone is {p1:.0%}) and {owner_share(fits_aff):.0%} (K = {c}): "
            "a handful of photos splits unevenly over a ring, and in-flight counts fluctuate around their mean. "
            "A spilled request lands where its photo is not cached and evicts one of that replica's own photos; "
            f"with K = C every replica soon holds the whole catalogue, so spill-over costs little there. The same "
            f"bound keeps image-affinity's most-loaded replica at {big['max_share']:.2f} times the mean."
        )
        out.append(
            f"- **{name}: round-robin and least-loaded miss even when the catalogue fits** "
            f"({fits_rr['derived']['image_hit']:.3f}, predicted {fits_rr['predicted_image_hit']:.3f}): each of the "
            f"{r} replicas misses every photo once and uploads (2%) never hit, so a run of {e['requests']} requests "
            f"pays up to {r} x {c} first misses instead of {c}; the prediction counts them (from empty caches). "
            "Least-loaded ignores the photo as round-robin does: the same hit ratios, within sampling noise."
        )
    return out


def explain_puzzle(found: list[dict[str, Any]]) -> list[str]:
    runs = [(mode["bound"], r) for mode in found for r in mode["runs"]]
    if not runs:
        return []

    def walls(bound: bool, policy: str) -> str:
        return " and ".join(f"{r['wall_s']:.0f}" for b, r in runs if b == bound and r["policy"] == policy)

    def cpu_per_request(bound: bool, policy: str | None, process: str) -> float:
        picked = [r for b, r in runs if b == bound and policy in (None, r["policy"])]
        cpu = sum(float(c.get(process, 0.0)) for r in picked for c in r["derived"]["cpu_s"])
        return cpu / max(1, sum(int(r["derived"]["ok"]) for r in picked))

    def worker(policy: str) -> str:
        unbound, bound = cpu_per_request(False, policy, "Worker"), cpu_per_request(True, policy, "Worker")
        return f"{unbound:.2f} unbound, {bound:.2f} bound"

    unbound_cores: dict[str, dict[str, list[str]]] = next((m["cores"] for m in found if not m["bound"]), {})
    workers = ", ".join(f"{k} on {'/'.join(v.get('Worker', []))}" for k, v in unbound_cores.items())
    skew = max((r for _, r in runs), key=lambda r: max(r["derived"]["requests_per_replica"]))
    healthy = min(min(r["derived"]["healthy_share"]) for _, r in runs)
    tokens = sorted({r["derived"]["generation_tokens"] for _, r in runs})
    return [
        "- **The new user's run: two engines on one core.** Left to itself vLLM binds each replica's model worker "
        "to one core and keeps another for its own processes; on this 2-core machine both replicas chose the same "
        f"core (the workers' threads: {workers}). Both engines' model computation then shares one core, the other "
        "core is left to the API servers and engine cores, and the engine cores spend more time waiting on their "
        f"workers (engine-core CPU {cpu_per_request(False, None, 'EngineCore'):.2f} s a request unbound, "
        f"{cpu_per_request(True, None, 'EngineCore'):.2f} bound). Wall times, in run order: round-robin "
        f"{walls(False, 'round-robin')} s unbound, {walls(True, 'round-robin')} s bound; least-loaded "
        f"{walls(False, 'least-loaded')} and {walls(True, 'least-loaded')}; image-affinity "
        f"{walls(False, 'image-affinity')} and {walls(True, 'image-affinity')}. Binding each worker to its own "
        "core (what `qvl up` now does) is the larger gain.",
        "- **Why round-robin is the slowest.** Every run generated the same tokens "
        f"({', '.join(f'{t:.0f}' for t in tokens)}: answers run to their length), yet round-robin's workers spent "
        f"{worker('round-robin')} CPU seconds a request, against {worker('least-loaded')} for least-loaded and "
        f"{worker('image-affinity')} for image-affinity. Unbound, the shared core is busy in every run (worker CPU "
        "about equals wall time), so the wall time follows that cost. It is not a first-run effect: with "
        "round-robin run second and fourth it was as slow. Round-robin gives each replica the same number of "
        "requests whatever its speed, so both engines stay busy side by side all run: on one core they preempt "
        "each other, and vLLM's worker and engine core wait for each other's messages by spinning (a sched_yield "
        "loop for up to 1 s after each message, vllm/distributed/device_communicators/shm_broadcast.py), which on a "
        "shared core takes time from the engine that has work (the mechanism is vLLM's code; the measurement is the "
        "CPU per request). Least-loaded and image-affinity (whose bound is on in-flight load) keep requests in "
        "flight level instead, so whichever replica is running well at the moment takes more of the work. "
        "Round-robin was 1.5 to 1.6 times slower here, not 4 times: the new user's 300 requests in 8 s point to "
        "much shorter answers than the catalogue's 32-96 tokens, which this run keeps.",
        "- **Why least-loaded skews the request counts.** It compares requests in flight plus the engine's waiting "
        "queue (always 0 here: requests wait in vLLM's API server, not its scheduler) and kept the in-flight counts "
        "level (mean in flight per replica in the table), so the split of requests is the split of speed: the most "
        f"skewed run answered {' / '.join(map(str, skew['derived']['requests_per_replica']))}. A replica whose "
        "requests are stuck keeps its in-flight count up and gets almost nothing more; a replica the router ejects "
        f"(its /health slower than the 1 s check deadline: healthy in as little as {healthy:.0%} of the samples "
        "unbound) gets nothing until a check passes again. Both can send nearly everything to one replica when "
        "one engine is starved for long; 296 of 300 was not reproduced here. Reading router/policies.py and "
        "router/replicas.py found no bug behind it: least-loaded compares the in-flight counts /v1/cluster shows, "
        "breaks ties at random (the pair comes from random.sample), and the proxy counts each attempt in and out "
        "once on every path.",
    ]


def write_report(doc: dict[str, Any], puzzle_doc: list[dict[str, Any]] | None, explanations: str) -> str:
    base = load_workload(CATALOGUE)
    lines = [
        "# Routing policies on the catalogue workload",
        "",
        f"{doc['when']}, {doc['machine']['cpus']} CPUs. Workload: `{doc['workload']}` (Zipf alpha 1.0, 2% "
        "uploads, two greedy tasks), with a closed loop, streamed answers of a fixed length and, per regime, "
        "its catalogue size and seed; answer cache off. Image hit: the engines' `vllm:mm_cache_hits / "
        "vllm:mm_cache_queries` deltas, all replicas together; prefix hit the same with `vllm:prefix_cache_*` "
        "(tokens). Predicted: loadtests/popularity.py for R replicas behind the policy, counted from empty "
        "caches over the run's requests (image-affinity: each photo on its ring owner). LRU replay: exact LRU "
        "caches of C photos fed the requests each replica actually got, in send order (the prediction with the "
        "routing known: it tells the cache model from the routing). Max/mean: the "
        "most-loaded replica's requests over the mean. Spilled: image-affinity's requests answered by another "
        "replica than their photo's ring owner (bounded load).",
        "",
    ]
    for result in doc["engines"]:
        lines += engine_section(result, base)
    lines += ceiling_table(base)
    if puzzle_doc:
        lines += puzzle_section(puzzle_doc)
    notes = [*explain_engines(doc, base), *explain_puzzle(puzzle_doc or []), explanations.strip()]
    lines += ["## Explanations", "", *[n for n in notes if n], ""]
    return "\n".join(lines)


# What the numbers alone do not say; the report puts it after the explanations derived from them.
NOTES = """\
- **TTFT.** The simulator charges a photo not in its cache 0.1 ms per image token: 62 ms for an 800x800
  listing photo, 307 ms for a 2048x1536 zoom. A hit answers in about 30 ms, so TTFT P50 sits near 30 ms
  while more than half the photos hit and jumps to about 90 ms (a listing miss) when fewer do; P99 (about
  340 ms) is a zoom photo's miss in every run. On vLLM a miss costs the tiny model little (its processor
  resizes a 256x256 photo in milliseconds): TTFT follows the two engines' share of the CPU more than the cache.
- **Prefix hits.** vLLM keys its prefix cache by blocks of 32 tokens and the text and images before them.
  The chat template and the task prompt come before the photo, the same in every request (about 100 of 165
  prompt tokens), so vLLM's prefix hit ratio stays near 0.8 whatever the photo does. The simulator counts only
  the image tokens of cached photos, so its prefix ratio follows its image ratio.
- **Throughput.** vLLM's round-robin runs answer the fewest requests a second, for the reason the new user's
  run shows (table above): the two replicas are not equally fast at every moment (the router, the clients and vLLM's
  API servers and engine cores share both cores with the bound workers), and round-robin keeps giving the
  slower one half the requests. Least-loaded's uneven split of requests is the same thing seen from the
  other side: it keeps requests in flight level, so the faster replica answers more.
"""


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
