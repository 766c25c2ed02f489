"""Sending a workload's planned requests: who takes which request, and one request sent and measured.

Locust users are closed loops, so open-loop traffic is driven from the schedule instead: each user takes
the next planned request from the process's `Dispatcher`, sleeps until its send time and sends it. When
every user is still busy at a send time, the request goes out late; the record keeps both times and the
run's verdict (loadtests/records.py) judges the lag. In a distributed run worker i of n takes requests
i, i+n, i+2n... of the schedule. No locust import: the locustfile wires this to locust's events.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from loadtests.records import Record, summarise_gaps
from loadtests.schedule import PlannedRequest
from loadtests.sse import StreamOutcome, error_type, read_stream

CHAT_PATH = "/v1/chat/completions"


class Dispatcher:
    """Hands out one process's share of the schedule, in order: worker `worker` of `workers` gets every
    `workers`-th request. Shared by the users of a process (gevent never switches inside `take`)."""

    def __init__(self, plans: Sequence[PlannedRequest], worker: int = 0, workers: int = 1) -> None:
        if not 0 <= worker < workers:
            raise ValueError(f"worker index {worker} is not in 0..{workers - 1}")
        self._plans = list(plans[worker::workers])
        self._next = 0

    def take(self) -> PlannedRequest | None:
        """The next request of this process's share; None once all are taken."""
        if self._next >= len(self._plans):
            return None
        plan = self._plans[self._next]
        self._next += 1
        return plan

    def __len__(self) -> int:
        return len(self._plans)


class RunClock:
    """Seconds since the run started, on a monotonic clock; `sleep_until` waits for a planned time. With
    `lead_s` the run starts that much after the clock is made (negative readings until then)."""

    def __init__(self, now: Callable[[], float] = time.perf_counter, lead_s: float = 0.0) -> None:
        self._now = now
        self._start = now() + lead_s
        self.start_unix = time.time() + lead_s
        """The wall-clock (Unix) time of the clock's zero: what scraped metrics are aligned to."""

    def __call__(self) -> float:
        return self._now() - self._start

    def sleep_until(self, at_s: float, sleep: Callable[[float], None] = time.sleep) -> None:
        delay = at_s - self()
        if delay > 0:
            sleep(delay)


@dataclass(frozen=True)
class Sent:
    """A request sent and read to its end: the record to write and the raw gaps locust is told about."""

    record: Record
    gaps_s: list[float]


def send(
    client: httpx.Client,
    plan: PlannedRequest,
    body: bytes,
    api_key: str,
    clock: Callable[[], float],
    image_tokens: int,
    worker: int = 0,
) -> Sent:
    """POST `body` to the chat endpoint now, read the answer (SSE when the plan streams) and measure it.
    Transport failures become a record with status None and the exception's class as the error type."""
    headers = {"content-type": "application/json", "authorization": f"Bearer {api_key}"}
    sent = clock()
    status: int | None = None
    kind: str | None = None
    outcome = StreamOutcome()
    replica = cache = None
    try:
        with client.stream("POST", CHAT_PATH, content=body, headers=headers) as response:
            status = response.status_code
            replica, cache = response.headers.get("x-qvl-replica"), response.headers.get("x-qvl-cache")
            is_sse = response.headers.get("content-type", "").startswith("text/event-stream")
            if status == 200 and is_sse:
                outcome = read_stream(response.iter_raw(), sent, clock)
                kind = outcome.error_type or (None if outcome.done else "incomplete_stream")
            else:
                outcome, kind = _read_json(response.read(), status)
    except httpx.HTTPError as exc:
        kind = type(exc).__name__
    ended = clock()
    usage = outcome.usage or {}
    intended = plan.send_at
    record = Record(
        index=plan.index,
        tenant=plan.tenant,
        task=plan.task,
        image_buckets=[ref.bucket for ref in plan.images],
        stream=plan.stream,
        intended_s=intended,
        sent_s=sent,
        send_lag_ms=None if intended is None else (sent - intended) * 1000,
        status=status,
        error_type=kind,
        ttft_ms=None if outcome.ttft_s is None else outcome.ttft_s * 1000,
        itl=summarise_gaps(outcome.gaps_s) if plan.stream else None,
        e2e_ms=(ended - sent) * 1000,
        prompt_tokens=usage.get("prompt_tokens"),
        image_tokens=image_tokens,
        output_tokens=usage.get("completion_tokens"),
        replica=replica,
        cache=cache,
        worker=worker,
    )
    return Sent(record, outcome.gaps_s)


def _read_json(raw: bytes, status: int) -> tuple[StreamOutcome, str | None]:
    """A whole JSON answer: its usage, or the error type of an OpenAI error body (`http_<status>` if none)."""
    outcome = StreamOutcome()
    try:
        data = json.loads(raw)
    except ValueError:
        return outcome, None if status == 200 else f"http_{status}"
    kind = error_type(data)
    if kind is None and status != 200:
        kind = f"http_{status}"
    usage = data.get("usage") if isinstance(data, dict) else None
    if isinstance(usage, dict):
        outcome.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
    return outcome, kind
