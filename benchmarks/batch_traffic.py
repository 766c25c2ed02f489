"""The batch-priority benchmark's traffic and sampling: request bodies of one fixed shape, Poisson arrival
schedules, an open-loop driver that records every request, a closed loop that saturates the cluster, and a
sampler that reads the replicas' and the router's /metrics at a fixed interval.

Every function returns raw records (one per request, one per sample); benchmarks/batch_priority.py derives
every figure from them.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from benchmarks.common import MODEL
from loadtests.sse import EventSplitter

PROMPT_CHARS = 200  # 50 prompt tokens at the simulator's 4 characters a token
_FILLER = "Describe the product in the photo: its colour, material, size and the occasion it suits best. " * 4


def prompt(i: int) -> str:
    """A question of exactly PROMPT_CHARS characters, unique per `i`."""
    head = f"Q{i:07d}. "
    return (head + _FILLER)[:PROMPT_CHARS]


def chat_doc(i: int, max_tokens: int, stream: bool, tier: str | None = None) -> dict[str, object]:
    doc: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt(i)}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if tier is not None:
        doc["service_tier"] = tier
    return doc


def batch_file(lines: int, max_tokens: int) -> bytes:
    """A batch input file of `lines` chat requests of the same shape as the interactive ones (not streamed)."""
    out = []
    for i in range(lines):
        body = chat_doc(10_000_000 + i, max_tokens, stream=False)
        del body["stream"]
        out.append(
            json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    return ("\n".join(out) + "\n").encode()


@dataclass(frozen=True)
class Arrival:
    at: float
    """Seconds after the schedule's start."""
    klass: str
    """interactive or flex (service_tier flex)."""
    phase: str


def poisson(rate: float, start: float, end: float, rng: random.Random, klass: str, phase: str) -> list[Arrival]:
    """Poisson arrivals at `rate` per second between `start` and `end` seconds."""
    out = []
    t = start + rng.expovariate(rate)
    while t < end:
        out.append(Arrival(t, klass, phase))
        t += rng.expovariate(rate)
    return out


@dataclass
class Record:
    """One request as the client saw it: the raw data every latency and error figure comes from."""

    phase: str
    klass: str
    at: float
    lag_s: float
    status: int
    code: str | None
    ttft_s: float | None
    e2e_s: float
    replica: str | None = None
    """x-qvl-replica: the replica that answered."""

    def row(self) -> list[object]:
        ttft = None if self.ttft_s is None else round(self.ttft_s * 1000, 2)
        return [
            self.phase,
            self.klass,
            round(self.at, 4),
            round(self.lag_s * 1000, 2),
            self.status,
            self.code,
            ttft,
            round(self.e2e_s * 1000, 1),
            self.replica,
        ]


ROW_FIELDS = ("phase", "class", "at_s", "send_lag_ms", "status", "error_code", "ttft_ms", "e2e_ms", "replica")


def _first_token(payloads: Sequence[str]) -> tuple[bool, str | None]:
    """(a payload carries content, the error code of an error event among them)."""
    for payload in payloads:
        if payload == "[DONE]":
            continue
        try:
            doc = json.loads(payload)
        except json.JSONDecodeError:
            continue
        if isinstance(doc.get("error"), dict):
            return False, str(doc["error"].get("code") or doc["error"].get("type"))
        choices = doc.get("choices") or [{}]
        if choices[0].get("delta", {}).get("content"):
            return True, None
    return False, None


async def ask(session: aiohttp.ClientSession, url: str, body: bytes, arrival: Arrival, t0: float) -> Record:
    """Send one streamed request; its TTFT is the time to the first event with content."""
    sent = time.perf_counter()
    ttft = None
    code = None
    status = 0
    replica = None
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            status = resp.status
            replica = resp.headers.get("x-qvl-replica")
            if status != 200:
                try:
                    code = str((await resp.json(content_type=None))["error"]["code"])
                except (ValueError, KeyError, TypeError):
                    code = "unreadable"
            else:
                events = EventSplitter()
                async for chunk in resp.content.iter_any():
                    if ttft is None:
                        got, error = _first_token(events.feed(chunk))
                        if got:
                            ttft = time.perf_counter() - sent
                        code = code or error
                    elif b'"error"' in chunk:
                        code = code or "stream_error"
    except (TimeoutError, aiohttp.ClientError) as exc:
        code = type(exc).__name__
    return Record(
        arrival.phase,
        arrival.klass,
        arrival.at,
        sent - (t0 + arrival.at),
        status,
        code,
        ttft,
        time.perf_counter() - sent,
        replica,
    )


async def open_loop(
    session: aiohttp.ClientSession,
    url: str,
    arrivals: Iterable[Arrival],
    max_tokens: int,
    first_id: int,
    out: list[Record],
) -> None:
    """Send each arrival at its time, never waiting for answers: an open loop. `arrivals` may be a generator
    that decides later arrivals as it goes (it is advanced right after each send). Each answered request's
    record is appended to `out` as it ends (a progress line may read it)."""
    tasks = []
    t0 = time.perf_counter()

    async def one(arrival: Arrival, body: bytes) -> None:
        out.append(await ask(session, url, body, arrival, t0))

    for i, arrival in enumerate(arrivals):
        body = json.dumps(chat_doc(first_id + i, max_tokens, True, "flex" if arrival.klass == "flex" else None))
        delay = t0 + arrival.at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(arrival, body.encode())))
    await asyncio.gather(*tasks)


async def closed_loop(
    session: aiohttp.ClientSession, url: str, clients: int, seconds: float, max_tokens: int
) -> list[tuple[float, float, int, float | None]]:
    """`clients` users each sending the next request when the last one ends, for `seconds`. Returns every
    request as (start, end, status, ttft) in seconds after the loop began."""
    done: list[tuple[float, float, int, float | None]] = []
    t0 = time.perf_counter()
    counter = iter(range(1_000_000))

    async def user() -> None:
        while time.perf_counter() - t0 < seconds:
            i = next(counter)
            body = json.dumps(chat_doc(20_000_000 + i, max_tokens, True)).encode()
            record = await ask(session, url, body, Arrival(time.perf_counter() - t0, "interactive", "capacity"), t0)
            start = record.at
            done.append((start, start + record.e2e_s, record.status, record.ttft_s))

    await asyncio.gather(*(user() for _ in range(clients)))
    return done


def parse_metrics(text: str, names: Sequence[str]) -> dict[str, float]:
    """The samples of the named metrics on a Prometheus text page, keyed by `name{labels}` as written."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] in names:
            out[series] = float(value)
    return out


SIM_SERIES = ("vllm:num_requests_running", "vllm:num_requests_waiting")
ROUTER_SERIES = (
    "qvl_batch_in_flight",
    "qvl_replica_engine_running",
    "qvl_replica_engine_waiting",
    "qvl_batch_lines_total",
)


async def scrape(session: aiohttp.ClientSession, url: str, names: Sequence[str]) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        return parse_metrics(await resp.text(), names)


def _sum(values: Mapping[str, float], prefix: str) -> float:
    return sum(v for k, v in values.items() if k.split("{", 1)[0] == prefix)


async def sampler(
    session: aiohttp.ClientSession,
    sims: Mapping[str, str],
    router: str,
    interval_s: float,
    out: list[list[Any]],
    clock0: float,
) -> None:
    """Every `interval_s` (on a fixed grid; a late tick is skipped, not squeezed in): each replica's own
    running and waiting gauges, and the router's batch lines in flight, engine gauges as last scraped and
    completed batch lines. One row per tick: [t, {replica: [running, waiting, router_batch_in_flight,
    router_running, router_waiting]}, batch_lines_completed]; t in seconds after `clock0`."""
    tick = 0
    while True:
        tick += 1
        due = clock0 + tick * interval_s
        now = time.perf_counter()
        if due < now:
            tick = int((now - clock0) / interval_s)
            continue
        await asyncio.sleep(due - now)
        t = time.perf_counter() - clock0
        try:
            pages = await asyncio.gather(
                *(scrape(session, url, SIM_SERIES) for url in sims.values()), scrape(session, router, ROUTER_SERIES)
            )
        except aiohttp.ClientError:
            continue
        routed = pages[-1]
        row: dict[str, list[float]] = {}
        for (name, _), page in zip(sims.items(), pages, strict=False):
            label = f'{{replica="{name}"}}'
            row[name] = [
                _sum(page, "vllm:num_requests_running"),
                _sum(page, "vllm:num_requests_waiting"),
                routed.get("qvl_batch_in_flight" + label, 0.0),
                routed.get("qvl_replica_engine_running" + label, 0.0),
                routed.get("qvl_replica_engine_waiting" + label, 0.0),
            ]
        completed = routed.get('qvl_batch_lines_total{result="completed"}', 0.0)
        out.append([round(t, 3), row, completed])
