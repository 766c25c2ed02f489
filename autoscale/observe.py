"""What the autoscaler sees of a pool: token rates and queues from its engines' /metrics, the batch share
from the routers' /metrics, turned into a policy's `Load`.

Engines (vLLM, or `qvl sim`, which exports the same series) count `vllm:prompt_tokens` (image tokens
included) and `vllm:generation_tokens`; the rate of each is the change between two scrapes of the same
replica over the time between them (a replica seen for the first time, or one whose counters went back
after a restart, contributes from its next scrape). Queued requests are demand no counter shows yet: each
waiting request adds the pool's mean prompt and answer per request, spread over one start-up time (the
soonest new replicas could serve it; spread over one interval, a moment's queue asked for far more
replicas than the traffic needed).

Batch lines are not interactive demand: the routers' `qvl_admission_decisions_total{decision="admitted"}`
by class gives the share of requests that were batch lines over the same interval, across the cluster
(routers do not count classes per pool), and that share of the tokens is reported apart, as batch load.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from autoscale.policy import Load
from loadtests.scrape import parse_page
from qvl.engine_metrics import engine_series

log = logging.getLogger("qvl.autoscale.observe")

_PROMPT = "vllm:prompt_tokens"
_OUTPUT = "vllm:generation_tokens"
_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_TTFT_SUM = "vllm:time_to_first_token_seconds_sum"
_TTFT_COUNT = "vllm:time_to_first_token_seconds_count"
_DONE = "vllm:request_success"
ENGINE_SERIES = (_PROMPT, _OUTPUT, _RUNNING, _WAITING, _TTFT_SUM, _TTFT_COUNT, _DONE)


@dataclass(frozen=True, slots=True)
class EngineSample:
    at: float
    prompt_tokens: float
    output_tokens: float
    running: float
    waiting: float
    ttft_sum: float
    ttft_count: float
    finished: float

    @classmethod
    def parse(cls, at: float, text: str) -> EngineSample:
        v = engine_series(text, ENGINE_SERIES)
        return cls(
            at,
            v.get(_PROMPT, 0.0),
            v.get(_OUTPUT, 0.0),
            v.get(_RUNNING, 0.0),
            v.get(_WAITING, 0.0),
            v.get(_TTFT_SUM, 0.0),
            v.get(_TTFT_COUNT, 0.0),
            v.get(_DONE, 0.0),
        )


@dataclass(frozen=True, slots=True)
class ReplicaRates:
    """One serving replica over the last interval."""

    prefill_tokens_s: float
    decode_tokens_s: float
    running: float
    waiting: float
    mean_ttft_s: float | None
    """Mean time to first token of the requests that got one in the interval (None: none did)."""
    finished: float
    seconds: float
    """The interval's length."""


def rates(before: EngineSample, after: EngineSample) -> ReplicaRates | None:
    """The replica's rates between two scrapes; None when a counter went back (the engine restarted)."""
    dt = after.at - before.at
    deltas = (
        after.prompt_tokens - before.prompt_tokens,
        after.output_tokens - before.output_tokens,
        after.ttft_count - before.ttft_count,
        after.finished - before.finished,
    )
    if dt <= 0 or min(deltas) < 0:
        return None
    ttft_n = deltas[2]
    ttft = (after.ttft_sum - before.ttft_sum) / ttft_n if ttft_n else None
    return ReplicaRates(deltas[0] / dt, deltas[1] / dt, after.running, after.waiting, ttft, deltas[3], dt)


class EngineWatch:
    """Scrapes engines and remembers each one's last sample, to give rates per replica."""

    def __init__(
        self, client: httpx.AsyncClient, timeout_s: float = 5.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._clock = clock
        self._last: dict[str, EngineSample] = {}

    async def scrape(self, urls: list[str]) -> dict[str, ReplicaRates]:
        """Rates of every URL that answered twice in a row; forgets URLs no longer asked for."""
        samples = await asyncio.gather(*(self._sample(u) for u in urls))
        out: dict[str, ReplicaRates] = {}
        for url, sample in zip(urls, samples, strict=True):
            if sample is None:
                continue
            before = self._last.get(url)
            self._last[url] = sample
            if before is not None and (r := rates(before, sample)) is not None:
                out[url] = r
        for gone in set(self._last) - set(urls):
            del self._last[gone]
        return out

    async def _sample(self, url: str) -> EngineSample | None:
        text = await metrics_page(self._client, url, self._timeout_s)
        return None if text is None else EngineSample.parse(self._clock(), text)


class ClassWatch:
    """The share of admitted requests that were batch lines, from every router's /metrics."""

    def __init__(self, client: httpx.AsyncClient, timeout_s: float = 5.0) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._last: dict[str, dict[str, float]] = {}

    async def batch_share(self, routers: list[str]) -> float:
        """Batch lines over all admitted requests since the last call (0 when no router reports any)."""
        counts = await asyncio.gather(*(self._admitted(u) for u in routers))
        batch = total = 0.0
        for url, now in zip(routers, counts, strict=True):
            if now is None:
                continue
            before = self._last.get(url, {})
            self._last[url] = now
            for klass, value in now.items():
                delta = value - before.get(klass, 0.0) if before else 0.0
                if delta < 0:  # the router restarted
                    delta = value
                total += delta
                if klass == "batch":
                    batch += delta
        return batch / total if total else 0.0

    async def _admitted(self, url: str) -> dict[str, float] | None:
        text = await metrics_page(self._client, url, self._timeout_s)
        if text is None:
            return None
        found: dict[str, float] = {}
        for name, labels, value in parse_page(text):
            if name == "qvl_admission_decisions_total" and labels.get("decision") == "admitted":
                found[labels["class"]] = found.get(labels["class"], 0.0) + value
        return found


async def metrics_page(client: httpx.AsyncClient, url: str, timeout_s: float) -> str | None:
    """The /metrics page of the server at `url`; None when it does not answer 200 (logged)."""
    try:
        answer = await client.get(url + "/metrics", timeout=timeout_s)
    except httpx.HTTPError as exc:
        log.info("cannot scrape %s/metrics: %s", url, exc)
        return None
    if answer.status_code != 200:
        log.info("cannot scrape %s/metrics: HTTP %d", url, answer.status_code)
        return None
    return answer.text


@dataclass(frozen=True, slots=True)
class PoolLoad:
    """A pool's load over the last interval: the policy's Load, plus the batch part kept out of it."""

    load: Load
    batch_tokens_s: float
    replicas: dict[str, ReplicaRates]


def pool_load(at: float, replicas: dict[str, ReplicaRates], batch_share: float, backlog_s: float) -> PoolLoad:
    """Sum a pool's replicas into a Load (see the module's docstring for queued requests and batch)."""
    prefill = sum(r.prefill_tokens_s for r in replicas.values())
    decode = sum(r.decode_tokens_s for r in replicas.values())
    waiting = sum(r.waiting for r in replicas.values())
    finished = sum(r.finished for r in replicas.values())
    seconds = max((r.seconds for r in replicas.values()), default=0.0)
    if waiting and finished and backlog_s > 0:
        # Tokens per request (the interval's tokens over the requests it finished) times the queue, to be
        # served within backlog_s: waiting * (rate * seconds / finished) / backlog_s more per second.
        extra = 1 + waiting * seconds / (finished * backlog_s)
        prefill, decode = prefill * extra, decode * extra
    in_flight = sum(r.running + r.waiting for r in replicas.values())
    share = min(max(batch_share, 0.0), 1.0)
    load = Load(
        at,
        prefill * (1 - share),
        decode * (1 - share),
        in_flight=in_flight * (1 - share),
        batch_prefill_tokens_s=prefill * share,
        batch_decode_tokens_s=decode * share,
    )
    return PoolLoad(load, (prefill + decode) * share, replicas)


def at_slo(r: ReplicaRates, slo_ttft_s: float) -> bool:
    """Whether the replica worked at or past the SLO in the interval: the mean TTFT of its requests
    reached it. (A request waiting at the moment of a scrape is not enough: Poisson arrivals queue for
    a moment at any load, and learning from such an interval takes a half-busy replica's rates for its
    capacity.)"""
    return r.mean_ttft_s is not None and not math.isnan(r.mean_ttft_s) and r.mean_ttft_s >= slo_ttft_s
