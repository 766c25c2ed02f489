"""Shop traffic for a running router: a workload's planned requests (by default
loadtests/workloads/shop.yaml) sent by async clients, for `make dashboards-preview` (tools/preview.py)
and the live Prometheus test, so that every panel has something to show.

The schedule is sent in order: each client takes the next planned request once its previous one is
answered (after the closed loop's think time; in an open loop it also waits for the send time). On top,
what a workload file cannot say, drawn from the seed's own stream: after a planned request, now and then,
a client that gives up after the first streamed chunk, or a broken request (unknown model, malformed
JSON, bad base64) such as real clients send; by default each is 5% of all requests sent. An extra is
made from the planned request it follows (tenant, prompt, images).

A tenant's key comes from the workload (`key`, or `key_env` when that variable is set); without one the
request carries no key, which only a router run with `--no-auth` answers, as the preview and the live
test run it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx

from loadtests.schedule import ImageStore, PlannedRequest, api_key, build_body, build_schedule, substream
from loadtests.workload import ClosedLoop, Tenant, Workload, load_workload, parse_workload

WORKLOAD = Path(__file__).parent / "workloads" / "shop.yaml"
ABANDONED = "abandoned"
BROKEN = ("unknown-model", "malformed-json", "bad-base64")
ABANDON_SHARE = 0.05
"""Share of all requests sent that are streams given up after the first chunk."""
BROKEN_SHARE = 0.05
"""Share of all requests sent that are broken, the three kinds of BROKEN equally often."""
CHAT_PATH = "/v1/chat/completions"
MALFORMED_JSON = b'{"model": "x", "messages": ['
BAD_IMAGE_URL = "data:image/png;base64,!!not-base64!!"
EXTRAS_STREAM = "traffic-extras"
"""The random stream (schedule.substream) the extras are drawn from: the schedule's own streams stay untouched."""


@dataclass(frozen=True)
class Step:
    """One request to send: a planned request (`kind` is its task) or an extra made from it (`kind` is
    ABANDONED or one of BROKEN)."""

    plan: PlannedRequest
    kind: str


def steps(
    plans: Iterable[PlannedRequest],
    rng: random.Random,
    abandon_share: float = ABANDON_SHARE,
    broken_share: float = BROKEN_SHARE,
) -> Iterator[Step]:
    """The planned requests in order, each followed now and then by one extra.

    The shares are of all requests sent, extras included, so each planned request is followed by an
    extra with probability share / (1 - both shares). Raises ValueError unless both are at least 0 and
    together at most 0.5 (at most one extra per planned request)."""
    if abandon_share < 0 or broken_share < 0 or abandon_share + broken_share > 0.5:
        raise ValueError(f"extra shares must be >= 0 and together <= 0.5, got {abandon_share}, {broken_share}")
    planned = 1 - abandon_share - broken_share
    abandon, broken = abandon_share / planned, broken_share / planned
    for plan in plans:
        yield Step(plan, plan.task)
        # Two draws per planned request whatever the outcome, so that one extra does not shift the next.
        roll, which = rng.random(), rng.randrange(len(BROKEN))
        if roll < abandon:
            yield Step(plan, ABANDONED)
        elif roll < abandon + broken:
            yield Step(plan, BROKEN[which])


def shop_workload(
    workload: Workload | None = None, *, seed: int | None = None, products: int | None = None
) -> Workload:
    """`workload` (default: shop.yaml) with another seed and catalogue size, validated as a file would be;
    raises WorkloadError naming the field (products=0, say)."""
    base = load_workload(WORKLOAD) if workload is None else workload
    data = base.model_dump()
    if seed is not None:
        data["seed"] = seed
    if products is not None:
        data["popularity"]["catalogue"] = products
    return parse_workload(data, base.name)


@dataclass
class TrafficReport:
    """What the clients saw: HTTP statuses by request kind, transport errors, abandoned streams."""

    statuses: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    transport_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    abandoned: int = 0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + sum(self.transport_errors.values()) + self.abandoned


class ShopTraffic:
    """Clients sending a workload's planned requests in schedule order, with the extras on top.

    `seed` and `products` replace the workload's seed and catalogue size (see shop_workload);
    `environ` is where `key_env` is looked up (default: the process environment); `transport` replaces
    httpx's network transport (tests)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        seed: int | None = None,
        products: int | None = None,
        workload: Workload | None = None,
        abandon_share: float = ABANDON_SHARE,
        broken_share: float = BROKEN_SHARE,
        environ: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.workload = shop_workload(workload, seed=seed, products=products)
        self._url = url
        self._model = model
        self._transport = transport
        plans = build_schedule(self.workload)
        self._steps = steps(plans, substream(self.workload.seed, EXTRAS_STREAM), abandon_share, broken_share)
        self._images = ImageStore(self.workload)
        self._headers = {t.id: _auth_headers(t, environ) for t in self.workload.tenants}
        self.report = TrafficReport()

    async def run(
        self, seconds: float, concurrency: int | None = None, tick: Callable[[float], None] | None = None
    ) -> None:
        """Send traffic for `seconds`, or until the schedule runs out; `tick(elapsed)` is called about once
        a second meanwhile (progress, faults). `concurrency`: how many clients (default: a closed loop's
        users; an open loop needs it)."""
        arrivals = self.workload.arrivals
        closed = arrivals if isinstance(arrivals, ClosedLoop) else None
        if concurrency is None:
            if closed is None:
                raise ValueError(f"workload {self.workload.name}: an open loop needs the number of clients")
            concurrency = closed.users
        think_s = 0.0 if closed is None else closed.think_s
        limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
        began = time.monotonic()
        deadline = began + seconds
        async with httpx.AsyncClient(
            base_url=self._url, timeout=60, limits=limits, transport=self._transport
        ) as client:

            async def worker() -> None:
                while time.monotonic() < deadline:
                    step = next(self._steps, None)
                    if step is None:
                        return
                    send_at = step.plan.send_at
                    if send_at is not None and step.kind == step.plan.task:
                        if began + send_at >= deadline:
                            return
                        await asyncio.sleep(max(0.0, began + send_at - time.monotonic()))
                    await self._send(client, step)
                    if think_s:
                        await asyncio.sleep(think_s)

            async def ticker() -> None:
                while True:
                    await asyncio.sleep(1.0)
                    if tick is not None:
                        tick(time.monotonic() - began)

            ticking = asyncio.create_task(ticker())
            try:
                await asyncio.gather(*(worker() for _ in range(concurrency)))
            finally:
                ticking.cancel()

    async def _send(self, client: httpx.AsyncClient, step: Step) -> None:
        plan, kind = step.plan, step.kind
        headers = self._headers[plan.tenant]
        if kind == "malformed-json":
            await self._post(client, kind, headers, content=MALFORMED_JSON)
            return
        if kind == "unknown-model":
            await self._post(client, kind, headers, json=build_body(plan, self.workload, "no-such-model", self._images))
            return
        if kind == "bad-base64":
            body = build_body(dataclasses.replace(plan, images=()), self.workload, self._model, self._images)
            content = cast(list[dict[str, Any]], cast(list[dict[str, Any]], body["messages"])[0]["content"])
            content.append({"type": "image_url", "image_url": {"url": BAD_IMAGE_URL}})
            await self._post(client, kind, headers, json=body)
            return
        if kind == ABANDONED:
            body = build_body(dataclasses.replace(plan, stream=True), self.workload, self._model, self._images)
            # No temperature (sampled, as a client that leaves it out): the answer cache cannot replay the
            # whole answer before the client leaves, so the router sees it go away mid-stream.
            del body["temperature"]
            await self._stream(client, kind, headers, body, give_up=True)
            return
        body = build_body(plan, self.workload, self._model, self._images)
        if plan.stream:
            await self._stream(client, kind, headers, body)
        else:
            await self._post(client, kind, headers, json=body)

    async def _post(self, client: httpx.AsyncClient, kind: str, headers: dict[str, str], **request: Any) -> None:
        try:
            response = await client.post(CHAT_PATH, headers=headers, **request)
            self.report.statuses[kind, response.status_code] += 1
        except httpx.HTTPError as exc:
            self.report.transport_errors[type(exc).__name__] += 1

    async def _stream(
        self,
        client: httpx.AsyncClient,
        kind: str,
        headers: dict[str, str],
        body: dict[str, object],
        give_up: bool = False,
    ) -> None:
        try:
            async with client.stream("POST", CHAT_PATH, json=body, headers=headers) as response:
                async for _ in response.aiter_bytes():
                    if give_up:
                        # Leaving the block closes the connection: the router sees the client go away.
                        self.report.abandoned += 1
                        return
            self.report.statuses[kind, response.status_code] += 1
        except httpx.HTTPError as exc:
            self.report.transport_errors[type(exc).__name__] += 1


def _auth_headers(tenant: Tenant, environ: Mapping[str, str] | None) -> dict[str, str]:
    try:
        return {"authorization": f"Bearer {api_key(tenant, environ)}"}
    except KeyError:
        return {}
