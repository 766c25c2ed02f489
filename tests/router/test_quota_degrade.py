"""Quotas degrade, they do not refuse: while the shared quota store (Redis) is down each router enforces its
share of every key's rate in buckets of its own (or admits everything, or refuses, by
router.quota.on_store_failure), and goes back to the shared buckets when Redis answers again.

The arithmetic against a store that fails on demand; the rest with real routers and a real redis-server."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from redis import Redis
from support.chat import image_chat, png_data_url
from support.metrics import metric_sum
from support.polling import wait_for, wait_for_async
from support.servers import Cluster, Proc

from qvl.settings import QuotaSettings
from router.auth import ApiKey
from router.errors import QuotaUnavailable, RateLimited
from router.quota import MemoryBuckets, Quotas, RedisBuckets, Take, local_share

MODEL = "qwen3-vl-sim"
KEY = "sk-storefront-0123456789abcdef"
HEADERS = {"authorization": f"Bearer {KEY}"}
PER_MINUTE = 120
BURST_S = 2.0


class FlakyStore:
    """Buckets of this process that fail like a dead Redis while `up` is false; `calls` counts every take."""

    def __init__(self) -> None:
        self.up = True
        self.calls = 0
        self._buckets = MemoryBuckets()

    async def take(self, takes: list[Take]) -> float:
        self.calls += 1
        if not self.up:
            raise QuotaUnavailable("down", code="quota_unavailable", retry_after_s=1)
        return await self._buckets.take(takes)

    async def close(self) -> None:
        pass


def test_a_routers_share_splits_rate_and_burst_but_always_fits_one_take() -> None:
    requests, images = Take("k:requests", 2.0, 4.0, 1), Take("k:image_tokens", 100.0, 1000.0, 600)
    assert local_share([requests, images], 2) == [
        Take("k:requests", 1.0, 2.0, 1),
        Take("k:image_tokens", 50.0, 600.0, 600),  # 500 would never hold the request's 600
    ]
    assert local_share([requests], 8) == [Take("k:requests", 0.25, 1.0, 1)]
    assert local_share([requests], 0) == [requests]  # no count known: the whole rate


def test_local_mode_enforces_the_share_without_asking_the_dead_store_each_time() -> None:
    now = [0.0]
    store = FlakyStore()
    settings = QuotaSettings(requests_per_minute=60, burst_s=4, probe_interval_s=60)
    quotas = Quotas(settings, store, routers=lambda: 2, clock=lambda: now[0])
    key = ApiKey("k", None)

    async def run() -> None:
        await quotas.charge(key, 0)  # the shared bucket
        assert quotas.degradation() == (False, 0.0)
        store.up = False
        await quotas.charge(key, 0)  # the store fails: the local bucket (2 requests, 0.5/s) takes it
        await quotas.charge(key, 0)
        with pytest.raises(RateLimited) as caught:
            await quotas.charge(key, 0)
        assert caught.value.retry_after_s == pytest.approx(2.0)
        assert store.calls == 2  # one failed take degraded the quotas; no request asked again
        now[0] = 2.0  # one token back at 0.5/s
        await quotas.charge(key, 0)
        assert quotas.degradation() == (True, 2.0)
        await quotas.close()

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_open_admits_everything_and_closed_refuses(mode: str) -> None:
    store = FlakyStore()
    settings = QuotaSettings(requests_per_minute=60, burst_s=1, on_store_failure=mode, probe_interval_s=60)  # type: ignore[arg-type]
    quotas = Quotas(settings, store)

    async def run() -> None:
        store.up = False
        for _ in range(5):
            if mode == "open":
                await quotas.charge(ApiKey("k", None), 0)
            else:
                with pytest.raises(QuotaUnavailable):
                    await quotas.charge(ApiKey("k", None), 0)
        assert quotas.degradation() is not None and quotas.degradation()[0]  # type: ignore[index]
        # closed asks the store with every request, as before there was a choice; open only once.
        assert store.calls == (1 if mode == "open" else 5)
        await quotas.close()

    asyncio.run(run())


def test_a_probe_in_the_background_finds_the_store_again() -> None:
    store = FlakyStore()
    quotas = Quotas(QuotaSettings(requests_per_minute=60, burst_s=1, probe_interval_s=0.02), store)

    async def run() -> None:
        store.up = False
        await quotas.charge(ApiKey("k", None), 0)
        with pytest.raises(RateLimited):  # a bucket of one request, taken locally
            await quotas.charge(ApiKey("k", None), 0)
        calls = store.calls
        store.up = True
        await wait_for_async(lambda: not quotas.degradation()[0], timeout_s=5)  # type: ignore[index]
        assert store.calls > calls
        await quotas.charge(ApiKey("k", None), 0)  # the shared bucket again: still full
        await quotas.close()

    asyncio.run(run())


def test_a_write_on_a_connection_redis_just_closed_is_a_store_failure() -> None:
    async def closed(**_: object) -> None:
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    async def run() -> None:
        buckets = RedisBuckets("redis://127.0.0.1:1/0", timeout_s=0.5)
        buckets._script = closed  # type: ignore[assignment]  # what uvloop raises mid-failover
        with pytest.raises(QuotaUnavailable):
            await buckets.take([Take("k:requests", 1.0, 1.0, 1)])
        await buckets.close()

    asyncio.run(run())


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - id: storefront\n    key: {KEY}\n    requests_per_minute: {PER_MINUTE}\n")
    return path


def quota_router(cluster: Cluster, tmp_path: Path, redis_url: str, sim: Proc, extra: str = "") -> Proc:
    config = tmp_path / f"qvl-{len(cluster.procs)}.yaml"
    config.write_text(
        f"router:\n  quota: {{backend: '{redis_url}', burst_s: {BURST_S}, redis_timeout_s: 0.2, "
        f"probe_interval_s: 0.25{extra}}}\n"
        f"registry: {{url: '{redis_url}', poll_interval_s: 0.25, ttl_s: 3, timeout_s: 0.3}}\n"
    )
    flags = ("--keys-file", str(keys_file(tmp_path)), "--config", str(config))
    return cluster.router(sim, flags=flags, auth=True)


def chat(router: Proc) -> httpx.Response:
    return httpx.post(router.url + "/v1/chat/completions", json=image_chat(MODEL, png_data_url()), headers=HEADERS)


def fire(routers: list[Proc], seconds: float, gap_s: float) -> tuple[int, int, float]:
    """Requests at every router, one at a time each, every gap_s for `seconds`: (admitted, limited, the
    seconds from the first request sent to the last)."""

    async def one_router(client: httpx.AsyncClient, router: Proc, until: float) -> list[tuple[float, int]]:
        sent = []
        while time.monotonic() < until:
            at = time.monotonic()
            response = await client.post(
                router.url + "/v1/chat/completions", json=image_chat(MODEL, png_data_url()), headers=HEADERS
            )
            sent.append((at, response.status_code))
            await asyncio.sleep(gap_s)
        return sent

    async def run() -> list[tuple[float, int]]:
        until = time.monotonic() + seconds
        async with httpx.AsyncClient(timeout=10) as client:
            parts = await asyncio.gather(*(one_router(client, r, until) for r in routers))
        return [row for part in parts for row in part]

    rows = asyncio.run(run())
    statuses = [status for _, status in rows]
    assert set(statuses) <= {200, 429}, f"unexpected statuses {sorted(set(statuses))}"
    times = [at for at, _ in rows]
    return statuses.count(200), statuses.count(429), max(times) - min(times)


def test_with_redis_down_two_routers_still_hold_a_key_to_its_rate_then_share_again(
    cluster: Cluster, redis_server, tmp_path: Path
) -> None:
    sim = cluster.sim("--zero-delay")
    routers = [quota_router(cluster, tmp_path, redis_server.url, sim) for _ in range(2)]
    for router in routers:
        wait_for(lambda r=router: metric_sum(r.url, "qvl_registry_routers") == 2, timeout=10)
        assert metric_sum(router.url, "qvl_quota_degraded") == 0
    shared = Redis.from_url(redis_server.url)
    assert chat(routers[0]).status_code == 200 and shared.exists("qvl:quota:storefront:requests")
    shared.close()

    redis_server.kill()
    admitted, limited, seconds = fire(routers, seconds=10, gap_s=0.05)
    rate = PER_MINUTE / 60
    expected = rate * seconds + rate * BURST_S  # both routers together: the rate, plus one full burst
    error = admitted / expected - 1
    print(
        f"\nRedis down, 2 routers, key at {PER_MINUTE}/min (burst {BURST_S} s): admitted {admitted} and limited "
        f"{limited} in {seconds:.1f} s; the limit allows {expected:.1f}; error {error:+.1%}"
    )
    assert abs(error) <= 0.3
    for router in routers:
        assert metric_sum(router.url, "qvl_quota_degraded") == 1
        assert metric_sum(router.url, "qvl_quota_degraded_seconds_total") > 5
        assert metric_sum(router.url, "qvl_registry_routers") == 2  # the last count, kept while Redis is down

    redis_server.start()  # the same port, empty: nothing is persisted
    for router in routers:
        wait_for(lambda r=router: metric_sum(r.url, "qvl_quota_degraded") == 0, timeout=10)
    shared = Redis.from_url(redis_server.url)
    assert not shared.exists("qvl:quota:storefront:requests")
    assert chat(routers[1]).status_code == 200
    assert shared.hget("qvl:quota:storefront:requests", "tokens") is not None  # the shared bucket again
    shared.close()


def test_closed_refuses_with_503_while_redis_is_down(cluster: Cluster, redis_server, tmp_path: Path) -> None:
    sim = cluster.sim("--zero-delay")
    router = quota_router(cluster, tmp_path, redis_server.url, sim, extra=", on_store_failure: closed")
    assert chat(router).status_code == 200
    redis_server.kill()
    refused = chat(router)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "quota_unavailable"
    assert refused.headers["retry-after"] == "1"
    assert metric_sum(router.url, "qvl_quota_degraded") == 1
    assert metric_sum(router.url, "qvl_rejections_total", reason="quota_unavailable") == 1
    redis_server.start()
    wait_for(lambda: metric_sum(router.url, "qvl_quota_degraded") == 0, timeout=10)
    assert chat(router).status_code == 200
