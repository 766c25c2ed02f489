"""API keys, per-key quotas and backpressure: pure parts directly, the rest through real routers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from support.chat import image_chat, png_data_url
from support.metrics import metric_sum
from support.servers import Cluster

from qvl.settings import AdmissionSettings, AuthSettings, QuotaSettings, RouterSettings, Settings
from router.admission import Admission
from router.auth import ANONYMOUS, ApiKey, AuthConfigError, KeyRing
from router.errors import Overloaded, PermissionDenied, QuotaUnavailable, RateLimited, Unauthenticated
from router.quota import MemoryBuckets, Quotas, RedisBuckets, Take
from router.replicas import Replica

MODEL = "qwen3-vl-sim"
GOOD = "sk-storefront-0123456789abcdef"
OTHER = "sk-batch-job-fedcba9876543210"


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"""keys:
  - id: storefront
    key: {GOOD}
    models: [{MODEL}]
    requests_per_minute: 120
  - id: batch
    sha256: {hashlib.sha256(OTHER.encode()).hexdigest()}
    models: [another-model]
"""
    )
    return path


def settings(tmp_path: Path, **auth: object) -> Settings:
    return Settings(
        router=RouterSettings(auth=AuthSettings(keys_file=str(keys_file(tmp_path)), **auth))  # type: ignore[arg-type]
    )


def test_keys_are_kept_hashed_and_known_by_id(tmp_path: Path) -> None:
    ring = KeyRing.from_settings(settings(tmp_path))
    key = ring.authenticate(f"Bearer {GOOD}".encode())
    digest = hashlib.sha256(GOOD.encode()).hexdigest()
    assert key == ApiKey("storefront", frozenset({MODEL}), requests_per_minute=120, digest=digest)
    assert key.role == "viewer"  # the console's default
    assert ring.authenticate(f"bearer {OTHER}".encode()).id == "batch"
    assert GOOD not in repr(ring.__dict__) and GOOD not in repr(key)


@pytest.mark.parametrize(
    ("header", "code"),
    [(None, "missing_api_key"), (b"Basic abc", "invalid_api_key"), (b"Bearer sk-nope", "invalid_api_key")],
)
def test_no_key_or_a_wrong_key_is_401(tmp_path: Path, header: bytes | None, code: str) -> None:
    with pytest.raises(Unauthenticated) as caught:
        KeyRing.from_settings(settings(tmp_path)).authenticate(header)
    assert caught.value.status == 401 and caught.value.code == code


def test_a_key_not_allowed_the_model_is_403(tmp_path: Path) -> None:
    ring = KeyRing.from_settings(settings(tmp_path))
    with pytest.raises(PermissionDenied) as caught:
        ring.authorize(ring.authenticate(f"Bearer {OTHER}".encode()), MODEL)
    assert caught.value.status == 403


def test_env_keys_allow_every_model_and_auth_on_without_keys_refuses_to_start(tmp_path: Path) -> None:
    ring = KeyRing.from_settings(Settings(api_keys=SecretStr(f" {GOOD} ,{OTHER}")))
    key = ring.authenticate(f"Bearer {OTHER}".encode())
    assert key.models is None and key.id == "env-" + hashlib.sha256(OTHER.encode()).hexdigest()[:8]
    with pytest.raises(AuthConfigError, match="no API key is configured"):
        KeyRing.from_settings(Settings())
    assert (
        KeyRing.from_settings(Settings(router=RouterSettings(auth=AuthSettings(enabled=False)))).authenticate(None)
        is ANONYMOUS
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys: [{id: a, key: short}]", "at least 16 characters"),
        ("keys: [{id: a}]", "exactly one of key or sha256"),
        ("keys: [{id: 'a b', key: sk-0123456789abcdef}]", "id must be"),
        ("keys: [{id: a, sha256: xyz}]", "64 hex digits"),
        ("keys: [{id: a, key: sk-0123456789abcdef, models: x}]", "list of model names"),
        ("keys: [{id: a, key: sk-0123456789abcdef, requests_per_minute: -1}]", ">= 0"),
        ("keys: [{id: a, key: sk-0123456789abcdef, colour: red}]", "unknown fields"),
        ("keys: [{id: a, key: sk-0123456789abcdef}, {id: a, key: sk-0123456789abcdeg}]", "appears twice"),
        ("nope", "list under 'keys'"),
    ],
)
def test_a_bad_keys_file_names_the_problem_not_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(AuthConfigError, match=message) as caught:
        KeyRing.from_settings(Settings(router=RouterSettings(auth=AuthSettings(keys_file=str(path)))))
    assert "sk-0123456789abcdef" not in str(caught.value)


def test_memory_buckets_take_all_or_nothing_and_refill() -> None:
    now = [0.0]
    buckets = MemoryBuckets(clock=lambda: now[0])

    async def run() -> None:
        requests, images = Take("k:req", 1.0, 2.0, 1), Take("k:img", 10.0, 100.0, 60)
        assert await buckets.take([requests, images]) == 0
        assert await buckets.take([requests, images]) == pytest.approx(2.0)  # 40 image tokens left, 60 wanted
        now[0] = 2.0  # refilled: 60 image tokens, 2 requests
        assert await buckets.take([requests, images]) == 0
        assert await buckets.take([requests]) == 0
        assert await buckets.take([requests]) == pytest.approx(1.0)

    asyncio.run(run())


def test_redis_buckets_are_shared_and_a_dead_redis_raises(redis_server) -> None:
    # What a router then does is router.quota.on_store_failure (tests/router/test_quota_degrade.py).
    async def run() -> None:
        a, b = RedisBuckets(redis_server.url, 0.5), RedisBuckets(redis_server.url, 0.5)
        take = Take("shared:req", 0.1, 3.0, 1)
        assert [await a.take([take]), await b.take([take]), await a.take([take])] == [0, 0, 0]
        wait = await b.take([take])
        assert 5 < wait <= 10  # one token refills in 10 s
        redis_server.kill()
        with pytest.raises(QuotaUnavailable) as caught:
            await a.take([take])
        assert caught.value.status == 503 and caught.value.retry_after_s == 1
        await a.close()
        await b.close()

    asyncio.run(run())


def test_quotas_use_the_key_rate_or_the_default_and_refuse_oversized_requests() -> None:
    async def run() -> None:
        quotas = Quotas(QuotaSettings(requests_per_minute=60, image_tokens_per_minute=600, burst_s=2))
        own = ApiKey("own", None, requests_per_minute=0)  # unlimited requests, default image rate
        for _ in range(10):
            await quotas.charge(own, 0)
        default = ApiKey("default", None)
        await quotas.charge(default, 10)
        await quotas.charge(default, 10)
        with pytest.raises(RateLimited) as caught:
            await quotas.charge(default, 10)
        assert caught.value.status == 429 and 0 < (caught.value.retry_after_s or 0) <= 1
        with pytest.raises(Exception, match="exceed what this API key may send at once"):
            await quotas.charge(ApiKey("big", None), 21)  # the bucket holds 20 image tokens

    asyncio.run(run())


def test_admission_waits_in_line_and_refuses_when_full_or_late() -> None:
    async def run() -> None:
        admission = Admission(AdmissionSettings(max_in_flight_per_replica=1, queue_size=2, queue_timeout_s=0.3))
        replica = Replica(url="http://r:1", name="r:1", in_flight=1)
        waiter = asyncio.ensure_future(admission.admit(lambda: [replica]))
        second = asyncio.ensure_future(admission.admit(lambda: [replica]))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as full:
            await admission.admit(lambda: [replica])
        assert full.value.code == "queue_full" and full.value.status == 503
        replica.in_flight = 0
        admission.released()
        assert await waiter == [replica]
        with pytest.raises(Overloaded) as late:
            await second  # nobody released again: the other waiter times out
        assert late.value.code == "queue_timeout" and late.value.retry_after_s == 1

    asyncio.run(run())


def test_the_router_answers_401_403_and_serves_a_good_key(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim("--zero-delay")
    audit = tmp_path / "audit.log"
    router = cluster.router(sim, flags=("--keys-file", str(keys_file(tmp_path)), "--audit-log", str(audit)), auth=True)
    url = router.url + "/v1/chat/completions"
    doc = image_chat(MODEL, png_data_url())
    missing = httpx.post(url, json=doc)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert httpx.post(url, json=doc, headers={"authorization": "Bearer wrong"}).status_code == 401
    denied = httpx.post(url, json=doc, headers={"authorization": f"Bearer {OTHER}"})
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_denied"
    assert httpx.post(url, json=doc, headers={"authorization": f"Bearer {GOOD}"}).status_code == 200
    assert httpx.get(router.url + "/v1/models").status_code == 401
    assert httpx.get(router.url + "/v1/models", headers={"authorization": f"Bearer {GOOD}"}).status_code == 200
    assert httpx.get(router.url + "/health").status_code == 200 and httpx.get(router.url + "/metrics").is_success
    assert metric_sum(router.url, "qvl_rejections_total", reason="missing_api_key") == 1
    assert metric_sum(router.url, "qvl_key_requests_total", key_id="storefront", status="200") == 1
    assert metric_sum(router.url, "qvl_key_requests_total", key_id="batch", status="403") == 1
    deadline = time.monotonic() + 5
    while metric_sum(router.url, "qvl_audit_lines_total") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric_sum(router.url, "qvl_audit_lines_total") == 4 and metric_sum(router.url, "qvl_audit_pending") == 0
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(a["key_id"], a["status"]) for a in lines] == [("", 401), ("", 401), ("batch", 403), ("storefront", 200)]
    text = httpx.get(router.url + "/metrics").text + audit.read_text()
    assert GOOD not in text and OTHER not in text


def test_auth_off_needs_the_flag_and_warns(cluster: Cluster) -> None:
    sim = cluster.sim("--zero-delay")
    with pytest.raises(RuntimeError, match="no API key is configured"):
        cluster.router(sim, auth=True)
    router = cluster.router(sim)
    assert "authentication is OFF" in router.output()
    assert httpx.post(router.url + "/v1/chat/completions", json=image_chat(MODEL, png_data_url())).is_success


def test_a_key_over_its_rate_gets_429_with_retry_after(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim("--zero-delay")
    config = tmp_path / "qvl.yaml"
    config.write_text("router: {quota: {burst_s: 2}}\n")  # 120/min: a bucket of 4 requests
    router = cluster.router(sim, flags=("--keys-file", str(keys_file(tmp_path)), "--config", str(config)), auth=True)
    headers = {"authorization": f"Bearer {GOOD}"}
    statuses = []
    for _ in range(6):
        response = httpx.post(
            router.url + "/v1/chat/completions", json=image_chat(MODEL, png_data_url()), headers=headers
        )
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.json()["error"]["type"] == "rate_limit_exceeded"
            assert int(response.headers["retry-after"]) >= 1
    assert statuses[:4] == [200] * 4 and 429 in statuses[4:]
    time.sleep(1.0)  # two tokens back at 2 per second
    assert httpx.post(
        router.url + "/v1/chat/completions", json=image_chat(MODEL, png_data_url()), headers=headers
    ).is_success


def test_a_full_replica_queue_answers_503_with_retry_after(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim("--prefill-base-ms", "400", "--output-tokens", "2")
    config = tmp_path / "qvl.yaml"
    config.write_text("router: {admission: {max_in_flight_per_replica: 2, queue_size: 2, queue_timeout_s: 5}}\n")
    router = cluster.router(sim, flags=("--config", str(config)))

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            docs = [image_chat(MODEL, png_data_url((i, 1, 1))) for i in range(8)]
            return await asyncio.gather(*(client.post(router.url + "/v1/chat/completions", json=d) for d in docs))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 4 + [503] * 4  # 2 running + 2 waiting; the rest refused at once
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.json()["error"]["type"] == "overloaded" and r.headers["retry-after"] == "1" for r in refused)
    assert metric_sum(router.url, "qvl_rejections_total", reason="queue_full") == 4


def test_sigterm_drains_in_flight_requests_flushes_the_audit_log_then_exits(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim("--step-base-ms", "50", "--output-tokens", "30")  # ~1.5 s per answer
    audit = tmp_path / "audit" / "audit.log"
    router = cluster.router(sim, flags=("--audit-log", str(audit)))
    doc = image_chat(MODEL, png_data_url(), stream=True)
    with httpx.stream("POST", router.url + "/v1/chat/completions", json=doc, timeout=20) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        router.popen.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):
            httpx.get(router.url + "/health", timeout=2)  # no longer accepting
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and not any("error" in line for line in rest)
    # uvicorn ends by re-raising the SIGTERM it handled, so a drained router dies "of" SIGTERM.
    assert router.popen.wait(10) in (0, -signal.SIGTERM)
    (line,) = [json.loads(text) for text in audit.read_text().splitlines()]
    assert line["status"] == 200 and line["completion_tokens"] is None and line["replica"].endswith(str(sim.port))
