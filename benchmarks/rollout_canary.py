"""Versions and rollouts on simulated replicas behind the real router (issue 18): is a route's split weighted
and sticky, is an injected regression aborted quickly while the canary serves little traffic, and do
rollouts between two identical versions pass?

One run: `qvl sim` replicas, each serving MODEL and MODEL@VERSION (sim.aliases), one replica per version,
behind real `qvl router`s (answer cache off, no auth); rollout state in a redis-server started here, one key
prefix per router (router.rollout.key_prefix), every other rollout setting the router's default.

1. Split: a static route (router.routes, no rollout) of v1 95 / v2 5, then of v1 50 / v2 50, on zero-delay
   replicas: `--split-requests` requests, each its own session (x-session-id), from 32 concurrent clients;
   each version's share of the answers against its weight (target: within 2 points), and the answers whose
   version differs from the pure assignment function's (router.routes.assign) for the same key. Then
   `--sessions` sessions of `--turns` requests each, turn by turn: sessions that saw more than one version
   (target: 0).
2. Regression: open-loop streamed traffic at `--rate` requests/s (each request its own session) through a
   router with the rollout store, and a rollout of v2 with `--steps` (default 0.7,5,25,50,100: the first step
   bounds the share of the traffic a bad canary reaches; at 300 requests/s it still sends the canary about 2
   requests/s, enough to see 2 % errors within 90 s), min_requests 200 and min_duration_s 60. Case `errors`:
   v2 answers 2 % of requests with a 500 (sim.fault_error_ratio 0.02). Case `slow`: v2's first token comes
   later by half of v1's P95 TTFT (sim.fault_added_ttft_ms), that P95 measured first in this run on v1 alone
   (`--baseline-s`). Per case: seconds from the start to the abort (target <= 90 s), the share of all requests
   sent during the rollout that v2 answered (target <= 1 %) and that failed, and v2's answers once the abort
   reached the router.
3. A/A: `--aa` rollouts between two identical healthy versions (steps 10,50,100, min_requests 100,
   min_duration_s 2) under the same traffic, back and forth (v1 -> v2, then v2 -> v1, ...): false aborts
   (target 0) and seconds to promotion.

Latency model (SIM_TERMS): a fixed 20 ms step, almost no cost per running request and 4 output tokens, so
that latency barely depends on load, plus a fixed `--frontend-ms` (60 ms) before the engine sees a
request. That offset makes TTFT about 80-100 ms: +50 % of its P95 is then more than the analysis' absolute
floor (router.rollout.min_latency_increase_ms, 25 ms by default). With TTFTs of 20-40 ms a +50 % regression
is under that floor and the rollout is, by those settings, rightly promoted.

    python -m benchmarks.rollout_canary [--rate 300] [--aa 20] [--split-requests 10000] [--sessions 2000]
    python -m benchmarks.rollout_canary --quick         # fewer requests and 4 A/A rollouts (about 2.5 minutes)
    python -m benchmarks.rollout_canary --report-only   # re-derive the .md and .png from the JSON

Writes benchmarks/results/rollout_canary.json, .md and .png. Every figure is derived from the raw records
kept in the JSON (one row per request of parts 2 and 3, one per session of part 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from benchmarks.batch_priority import code_version
from benchmarks.common import MODEL, RESULTS, start_qvl
from benchmarks.rollout_report import ENDED, dump, write_report
from loadtests.records import percentile
from qvl.procs import Child, free_port, spawn

SIM_TERMS: dict[str, float] = {
    "step_base_ms": 20.0,
    "per_decode_ms": 0.1,
    "per_kv_ktoken_ms": 0.0,
    "prefill_base_ms": 0.0,
    "per_text_token_ms": 0.0,
    "per_image_token_ms": 0.0,
}
OUTPUT_TOKENS = 4
SPLITS = ({"v1": 95.0, "v2": 5.0}, {"v1": 50.0, "v2": 50.0})
REGRESSION: dict[str, Any] = {"steps": [0.7, 5.0, 25.0, 50.0, 100.0], "min_requests": 200, "min_duration_s": 60.0}
AA: dict[str, Any] = {"steps": [10.0, 50.0, 100.0], "min_requests": 100, "min_duration_s": 2.0}
ERROR_RATIO = 0.02
ROW_FIELDS = ("phase", "at_unix", "send_lag_ms", "status", "version", "ttft_ms", "e2e_ms", "failed")


@dataclass
class Fleet:
    """Every process of the run: a redis-server, simulated replicas, routers; stopped together at the end."""

    tmp: Path
    redis_url: str = ""
    procs: list[Child] = field(default_factory=list)
    started: int = 0

    def redis(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH (`make install` installs it)")
        port = free_port()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        child = spawn("redis-server", [*argv, "--dir", str(self.tmp)], log=self.tmp / "redis.log")
        self.procs.append(child)
        child.wait_ready(10, check=lambda: _pong(port), interval_s=0.05)
        self.redis_url = f"redis://127.0.0.1:{port}/0"

    def sim(self, version: str, frontend_ms: float, zero: bool = False, **faults: float) -> Child:
        """One replica of `version`; `zero`: every latency term at zero (the split needs no latency)."""
        sim = {"model": MODEL, "aliases": [f"{MODEL}@{version}"], "output_tokens": OUTPUT_TOKENS, **SIM_TERMS}
        sim.update(frontend_base_ms=frontend_ms, **faults)
        self.started += 1
        config = self.tmp / f"sim-{self.started}.yaml"
        config.write_text(json.dumps({"sim": sim}))  # JSON is YAML
        child = start_qvl(["sim", "--config", str(config), *(["--zero-delay"] if zero else [])], free_port(), "/health")
        self.procs.append(child)
        return child

    def router(self, replicas: list[Child], weights: dict[str, float], rollout: dict[str, Any] | None) -> Child:
        settings: dict[str, Any] = {"routes": {MODEL: {"versions": weights}}, "batch": {"enabled": False}}
        if rollout is not None:
            settings["rollout"] = {"store": self.redis_url, **rollout}
        self.started += 1
        config = self.tmp / f"router-{self.started}.yaml"
        config.write_text(json.dumps({"router": settings}))
        flags = ["router", "--no-auth", "--cache", "off", "--config", str(config)]
        for replica in replicas:
            flags += ["--replica", replica.url]
        child = start_qvl(flags, free_port(), "/ready")
        self.procs.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop(10)
        self.procs.remove(child)

    def stop_all(self) -> None:
        for child in self.procs:
            child.terminate()
        for child in self.procs:
            child.stop(10)


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _body(stream: bool) -> bytes:
    doc = {"model": MODEL, "messages": [{"role": "user", "content": "tag this"}], "stream": stream}
    return json.dumps(doc).encode()


# 1. The split and stickiness -------------------------------------------------------------------------------
async def versions_of(http: aiohttp.ClientSession, url: str, sessions: list[str], clients: int) -> list[str]:
    """One non-streamed request per session (in order, `clients` at a time); the version of each answer
    (`!STATUS` for a failure)."""
    out = [""] * len(sessions)
    todo = iter(range(len(sessions)))
    body = _body(False)

    async def worker() -> None:
        for i in todo:
            headers = {"content-type": "application/json", "x-session-id": sessions[i]}
            try:
                async with http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
                    out[i] = resp.headers.get("x-qvl-model-version", "?") if ok else f"!{resp.status}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                out[i] = f"!{type(exc).__name__}"

    await asyncio.gather(*(worker() for _ in range(clients)))
    return out


async def split(args: argparse.Namespace, fleet: Fleet, http: aiohttp.ClientSession) -> list[dict[str, Any]]:
    sims = [await asyncio.to_thread(fleet.sim, v, 0.0, True) for v in ("v1", "v2")]
    runs = []
    for weights in SPLITS:
        name = "/".join(f"{v} {w:g}" for v, w in weights.items())
        router = await asyncio.to_thread(fleet.router, sims, weights, None)
        chat = router.url + "/v1/chat/completions"
        print(f"rollout_canary: split {name}: {args.split_requests} one-request sessions", flush=True)
        singles = [f"split-{i}" for i in range(args.split_requests)]
        answers = await versions_of(http, chat, singles, 32)
        print(f"rollout_canary: split {name}: {args.sessions} sessions x {args.turns} turns", flush=True)
        sessions = [f"sticky-{i}" for i in range(args.sessions)]
        turns = [await versions_of(http, chat, sessions, 32) for _ in range(args.turns)]
        runs.append(
            {
                "weights": weights,
                "answers": [[s, v] for s, v in zip(singles, answers, strict=True)],
                "sessions": [[s, " ".join(t[i] for t in turns)] for i, s in enumerate(sessions)],
            }
        )
        await asyncio.to_thread(fleet.stop, router)
    for sim in sims:
        await asyncio.to_thread(fleet.stop, sim)
    return runs


# 2 and 3. Rollouts under steady traffic --------------------------------------------------------------------
async def ask(
    http: aiohttp.ClientSession, url: str, phase: str, session: str, lag: float, out: list[list[Any]]
) -> None:
    """One streamed request; its row (ROW_FIELDS) is appended to `out` when it ends. TTFT: the first chunk
    with a delta; failed: not a 200, or an error event in the stream, or no answer at all."""
    at = time.time()
    sent = time.perf_counter()
    status, version, ttft, failed = 0, "", None, True
    try:
        headers = {"content-type": "application/json", "x-session-id": session}
        async with http.post(url, data=_body(True), headers=headers) as resp:
            status, version = resp.status, resp.headers.get("x-qvl-model-version", "")
            failed = status != 200
            async for chunk in resp.content.iter_any():
                if ttft is None and b'"delta"' in chunk:
                    ttft = time.perf_counter() - sent
                failed = failed or b'"error"' in chunk
    except (TimeoutError, aiohttp.ClientError):
        failed = True
    e2e = time.perf_counter() - sent
    ttft_ms = None if ttft is None else round(ttft * 1000, 1)
    out.append([phase, round(at, 3), round(lag * 1000, 1), status, version, ttft_ms, round(e2e * 1000, 1), int(failed)])


async def steady(
    http: aiohttp.ClientSession, url: str, rate: float, phase: str, stop: asyncio.Event, out: list[list[Any]]
) -> None:
    """An open loop: a request every 1/rate seconds, each its own session, until `stop` is set; then waits
    for the answers still on their way."""
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter()
    i = 0
    while not stop.is_set():
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(ask(http, url, phase, f"{phase}-{i}", time.perf_counter() - due, out))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.wait(tasks)


async def rollout(
    ctl: aiohttp.ClientSession, router: str, to: str, plan: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """Start a rollout to `to` and wait until it ends; after `timeout_s` the benchmark aborts it itself
    (then its last event is `by: operator`). Returns the final state with its events."""
    body = {"model": MODEL, "to": to, "shadow": 0, **plan}
    async with ctl.post(router + "/v1/rollouts/start", json=body) as resp:
        if resp.status != 200:
            raise SystemExit(f"the rollout did not start: {resp.status} {await resp.text()}")
    deadline = time.monotonic() + timeout_s
    while True:
        await asyncio.sleep(0.2)
        async with ctl.get(f"{router}/v1/rollouts/{MODEL}") as resp:
            state: dict[str, Any] = await resp.json()
        if state["status"] in ENDED:
            return state
        if time.monotonic() > deadline:
            async with ctl.post(router + "/v1/rollouts/abort", json={"model": MODEL}) as resp:
                await resp.read()


async def progress(label: str, rows: list[list[Any]], stop: asyncio.Event, every_s: float = 10.0) -> None:
    seen = len(rows)  # the list may hold an earlier phase's rows
    while not stop.is_set():
        await asyncio.sleep(every_s)
        recent = rows[seen:]
        seen = len(rows)
        v2 = sum(1 for r in recent if r[4] == "v2")
        failed = sum(1 for r in recent if r[7])
        print(f"  {label}: {len(rows)} answered; last {every_s:.0f} s: {v2} by v2, {failed} failed", flush=True)


async def under_load(
    args: argparse.Namespace, http: aiohttp.ClientSession, router: Child, phase: str, rows: list[list[Any]]
) -> tuple[asyncio.Event, asyncio.Task[None], asyncio.Task[None]]:
    stop = asyncio.Event()
    load = asyncio.create_task(steady(http, router.url + "/v1/chat/completions", args.rate, phase, stop, rows))
    shown = asyncio.create_task(progress(phase, rows, stop))
    return stop, load, shown


async def finish(stop: asyncio.Event, load: asyncio.Task[None], shown: asyncio.Task[None]) -> None:
    """Stop sending, and wait for the answers still on their way."""
    stop.set()
    shown.cancel()
    await load


async def regressions(
    args: argparse.Namespace, fleet: Fleet, http: aiohttp.ClientSession, ctl: aiohttp.ClientSession, v1: Child
) -> tuple[dict[str, Any], list[list[Any]]]:
    rows: list[list[Any]] = []
    cases: dict[str, Any] = {}
    failing = await asyncio.to_thread(
        fleet.sim, "v2", args.frontend_ms, False, fault_error_ratio=ERROR_RATIO, fault_seed=args.seed
    )
    router = await asyncio.to_thread(
        fleet.router, [v1, failing], {"v1": 100.0}, {**args.rollout, "key_prefix": "bench:errors:"}
    )
    stop, load, shown = await under_load(args, http, router, "baseline", rows)
    print(f"rollout_canary: baseline: {args.rate:g} requests/s on v1 alone for {args.baseline_s:g} s", flush=True)
    await asyncio.sleep(args.baseline_s)
    await finish(stop, load, shown)
    ttfts = [r[5] for r in rows[len(rows) // 5 :] if r[5] is not None and not r[7]]
    baseline_p95 = percentile(ttfts, 95) or 0.0
    added_ms = round(baseline_p95 / 2, 1)
    print(f"  v1's P95 TTFT {baseline_p95:.1f} ms: the slow canary adds {added_ms:g} ms", flush=True)
    slow = await asyncio.to_thread(fleet.sim, "v2", args.frontend_ms, False, fault_added_ttft_ms=added_ms)
    for case, canary in (("errors", failing), ("slow", slow)):
        if case == "slow":
            await asyncio.to_thread(fleet.stop, router)
            router = await asyncio.to_thread(
                fleet.router, [v1, canary], {"v1": 100.0}, {**args.rollout, "key_prefix": f"bench:{case}:"}
            )
        print(f"rollout_canary: case {case}: a rollout of v2 at {args.rate:g} requests/s", flush=True)
        stop, load, shown = await under_load(args, http, router, case, rows)
        await asyncio.sleep(args.warm_s)
        state = await rollout(ctl, router.url, "v2", {**REGRESSION, "steps": args.steps}, args.case_timeout_s)
        print(f"  {state['status']}: {state['reason']}", flush=True)
        await asyncio.sleep(args.after_s)  # traffic after the end: does it all go back to v1?
        await finish(stop, load, shown)
        cases[case] = {"state": state, "canary_sim": canary.url}
    await asyncio.to_thread(fleet.stop, router)
    for sim in (failing, slow):
        await asyncio.to_thread(fleet.stop, sim)
    cases["slow"].update(baseline_p95_ttft_ms=round(baseline_p95, 2), added_ttft_ms=added_ms)
    cases["errors"]["fault_error_ratio"] = ERROR_RATIO
    return cases, rows


async def aa(
    args: argparse.Namespace, fleet: Fleet, http: aiohttp.ClientSession, ctl: aiohttp.ClientSession, v1: Child
) -> tuple[list[dict[str, Any]], list[list[Any]]]:
    rows: list[list[Any]] = []
    twin = await asyncio.to_thread(fleet.sim, "v2", args.frontend_ms)
    router = await asyncio.to_thread(
        fleet.router, [v1, twin], {"v1": 100.0}, {**args.rollout, "key_prefix": "bench:aa:"}
    )
    print(f"rollout_canary: A/A: {args.aa} rollouts between identical versions at {args.rate:g} requests/s", flush=True)
    stop, load, shown = await under_load(args, http, router, "aa", rows)
    await asyncio.sleep(args.warm_s)
    states = []
    for i in range(args.aa):
        to = ("v2", "v1")[i % 2]
        state = await rollout(ctl, router.url, to, AA, args.case_timeout_s)
        print(f"  {i + 1}/{args.aa} to {to}: {state['status']} ({state['reason']})", flush=True)
        states.append(state)
    await finish(stop, load, shown)
    await asyncio.to_thread(fleet.stop, router)
    await asyncio.to_thread(fleet.stop, twin)
    return states, rows


async def run(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http,
        aiohttp.ClientSession(timeout=timeout) as ctl,
    ):
        splits = await split(args, fleet, http)
        await asyncio.to_thread(fleet.redis)
        v1 = await asyncio.to_thread(fleet.sim, "v1", args.frontend_ms)
        cases, rows = await regressions(args, fleet, http, ctl, v1)
        states, aa_rows = await aa(args, fleet, http, ctl, v1)
    return {
        "split": splits,
        "cases": cases,
        "aa": states,
        "records_fields": list(ROW_FIELDS),
        "records": rows + aa_rows,
    }


# The report ------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a fast check: 2,000 split requests, 400 sessions, 4 A/A rollouts, 5 s baseline",
    )
    parser.add_argument("--split-requests", type=int, default=10_000, help="one-request sessions per split route")
    parser.add_argument("--sessions", type=int, default=2_000, help="sessions per split route for stickiness")
    parser.add_argument("--turns", type=int, default=5, help="requests per session")
    parser.add_argument("--rate", type=float, default=300.0, help="open-loop requests/s during rollouts")
    parser.add_argument("--frontend-ms", type=float, default=60.0, help="the replicas' sim.frontend_base_ms")
    parser.add_argument("--baseline-s", type=float, default=15.0, help="seconds of v1 alone to measure its P95 TTFT")
    parser.add_argument("--warm-s", type=float, default=3.0, help="traffic before each rollout's start")
    parser.add_argument("--after-s", type=float, default=3.0, help="traffic after each regression's end")
    parser.add_argument("--case-timeout-s", type=float, default=300.0, help="abort a rollout still going after this")
    parser.add_argument("--aa", type=int, default=20, help="A/A rollouts")
    parser.add_argument(
        "--steps",
        type=lambda text: [float(x) for x in text.split(",")],
        default=REGRESSION["steps"],
        help="the regression rollouts' steps, comma-separated percentages (default 0.7,5,25,50,100: the "
        "first step bounds the share of traffic a bad canary reaches)",
    )
    parser.add_argument("--seed", type=int, default=1, help="sim.fault_seed of the failing canary")
    parser.add_argument(
        "--rollout-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another router.rollout setting (repeat)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "rollout_canary", help="the report's path without suffix")
    parser.add_argument("--report-only", action="store_true", help="re-derive the .md and .png from the JSON")
    args = parser.parse_args()
    path = args.out.with_suffix(".json")
    if args.report_only:
        write_report(json.loads(path.read_text()), path)
        return 0
    if args.quick:
        args.split_requests, args.sessions, args.aa, args.baseline_s = 2_000, 400, 4, 5.0
    args.rollout = {}
    for item in args.rollout_setting:
        name, _, value = item.partition("=")
        args.rollout[name] = yaml.safe_load(value)
    began = time.monotonic()
    code = code_version()  # now: the router and simulators about to start run this code
    with tempfile.TemporaryDirectory(prefix="qvl-rollout-bench-") as tmp:
        fleet = Fleet(Path(tmp))
        try:
            raw = asyncio.run(run(args, fleet))
        finally:
            fleet.stop_all()
    doc = {
        "benchmark": "rollout_canary",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "run_seconds": round(time.monotonic() - began, 1),
        "code": code,
        "settings": {
            "quick": args.quick,
            "rate": args.rate,
            "sim": {**SIM_TERMS, "output_tokens": OUTPUT_TOKENS, "frontend_base_ms": args.frontend_ms},
            "rollout": args.rollout,
            "regression": {**REGRESSION, "steps": args.steps},
            "aa": AA,
            "split_requests": args.split_requests,
            "sessions": args.sessions,
            "turns": args.turns,
            "warm_s": args.warm_s,
            "after_s": args.after_s,
            "baseline_s": args.baseline_s,
            "seed": args.seed,
        },
        **raw,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump(doc))
    write_report(doc, path)
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
