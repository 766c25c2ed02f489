"""A 60-second soak of `qvl up --engine sim --replicas 3` with the answer cache in a real redis-server,
API keys on and the audit log written, while one replica is SIGKILLed (at 20 s) and Redis is killed
(at 35 s) and started again, empty (at 38 s).

Closed-loop async clients send shop-shaped image questions: catalogue questions about a few product
photos at temperature 0 (so the Redis cache hits and identical concurrent requests are coalesced),
plain and streamed, and fresh uploads at temperature 0.7 (never cached), plain and streamed. Every
request is counted and every outcome checked:

- every non-streamed request gets 200 with an answer (a transport error is a failure too): the replica's
  death and Redis's absence never reach a client;
- every stream gets 200 and ends with `data: [DONE]`; only a stream the replica's death cut may end with
  a `stream_interrupted` error event before it. A stream that breaks any other way is a failure;
- after a graceful stop (SIGTERM), the audit log holds exactly one line per request sent, each with the
  request id, key id, status and error type, cache result, replica and image digest the client saw,
  and no image bytes.

The figures (throughput, outcomes by kind, cut streams, cache results, Redis errors, audit lines) are
printed (`pytest -s`) and, only when QVL_SOAK_REPORT is set, written to benchmarks/results/soak.json.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import io
import json
import os
import platform
import random
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image, ImageDraw
from support import ROOT
from support.chat import image_chat
from support.metrics import metric_sum
from support.servers import Cluster, Proc, RedisServer

MODEL = "Qwen/Qwen3-VL-4B-Instruct"
API_KEY = "sk-qvl-soak-0123456789abcdef"
KEY_ID = "env-" + hashlib.sha256(API_KEY.encode()).hexdigest()[:8]
OUTPUT_TOKENS = 16
SETTINGS = f"""\
up: {{engine: sim, replicas: 3, model: "{MODEL}"}}
sim: {{prefill_base_ms: 25, step_base_ms: 5, output_tokens: {OUTPUT_TOKENS}}}
"""
SECONDS = 60.0
WORKERS = 16
KILL_REPLICA_AT = 20.0
KILL_REDIS_AT = 35.0
START_REDIS_AT = 38.0
# Listing-size product photos and the questions asked about them (the shop traffic generator's, before it
# became loadtests/workloads/shop.yaml; kept here so that the soak's traffic and figures stay as they were).
SIZES = ((640, 640), (800, 600), (512, 768))
QUESTIONS = (
    "What product is shown? Answer with a short title.",
    "What colour is the product?",
    "Is there any visible damage on this item?",
    "Write a one-sentence listing description.",
)
# Share of each kind of request; the catalogue kinds are greedy (cached), the uploads sampled.
MIX = {"catalogue": 0.35, "catalogue-stream": 0.25, "upload": 0.20, "upload-stream": 0.20}
STREAMING = {"catalogue-stream", "upload-stream"}
# Uploads are streamed with a longer answer (~0.3 s), so that the replica's death certainly cuts one.
LONG_STREAM_TOKENS = 48
DONE = b"data: [DONE]"
# A run of base64 much longer than a hex digest (64): image bytes leaking into a line would show as one.
BASE64_RUN = re.compile(rb"[A-Za-z0-9+/=]{100,}")


Fault = Callable[[], Awaitable[None]]


@dataclass
class Outcome:
    """One request as its client saw it. `ending`: json (a plain answer), done (a stream that ended
    with [DONE]), interrupted (a stream cut by a stream_interrupted event), or the way it failed."""

    kind: str
    request_id: str
    status: int | None
    ending: str
    cache: str
    replica: str
    image_digest: str
    at_s: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        if self.status != 200:
            return False
        if self.kind in STREAMING:
            return self.ending in ("done", "interrupted")
        return self.ending == "json"


@dataclass
class Soak:
    """Closed-loop clients against one router; `sent` counts every request before it goes out."""

    url: str
    api_key: str
    seed: int = 11
    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: list[Outcome] = field(default_factory=list)
    faults: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self._rng = rng
        # A few popular products asked two questions each: 16 cache keys, hit over and over.
        self._catalogue = [product_photo(rng) for _ in range(8)]
        # Customer uploads: made up front, so that PNG encoding does not eat the clients' CPU.
        self._uploads = [product_photo(rng) for _ in range(64)]
        self._digests = {url: _digest(url) for url in [*self._catalogue, *self._uploads]}
        self._count = 0
        self._watched: dict[str, asyncio.Event] = {}

    def next_stream_from(self, replica: str) -> asyncio.Event:
        """An event set when the next stream from `replica` begins (its headers, so its first chunk, came)."""
        self._watched[replica] = event = asyncio.Event()
        return event

    async def run(self, seconds: float, workers: int, faults: dict[float, tuple[str, Fault]]) -> None:
        """Traffic for `seconds`; each fault runs once at its time (seconds from the start)."""
        limits = httpx.Limits(max_connections=workers * 2, max_keepalive_connections=workers)
        headers = {"authorization": f"Bearer {self.api_key}"}
        began = time.monotonic()
        deadline = began + seconds
        async with httpx.AsyncClient(base_url=self.url, headers=headers, timeout=60, limits=limits) as client:

            async def worker() -> None:
                while time.monotonic() < deadline:
                    await self._one(client, time.monotonic() - began)

            async def fault(at: float, name: str, action: Callable[[], Awaitable[None]]) -> None:
                await asyncio.sleep(max(0.0, began + at - time.monotonic()))
                await action()
                self.faults[name] = round(time.monotonic() - began, 3)

            await asyncio.gather(
                *(worker() for _ in range(workers)), *(fault(at, n, a) for at, (n, a) in faults.items())
            )
        self.duration_s = time.monotonic() - began

    async def _one(self, client: httpx.AsyncClient, at_s: float) -> None:
        rng = self._rng
        kind = rng.choices(list(MIX), list(MIX.values()))[0]
        if kind.startswith("catalogue"):
            image = rng.choice(self._catalogue)
            doc = image_chat(MODEL, image, rng.choice(QUESTIONS[:2]), temperature=0)
        else:
            image = rng.choice(self._uploads)
            doc = image_chat(MODEL, image, rng.choice(QUESTIONS), temperature=0.7)
        if kind == "catalogue-stream":
            # With usage a streamed miss is stored, and a later plain request can be answered from it.
            doc.update(stream=True, stream_options={"include_usage": True})
        elif kind == "upload-stream":
            doc.update(stream=True, max_tokens=LONG_STREAM_TOKENS)
        self._count += 1
        number = self._count
        # Half the clients name their requests; for the others the router makes the id up.
        own_id = f"soak-{number}" if number % 2 == 0 else ""
        headers = {"x-request-id": own_id} if own_id else {}
        self.sent[kind] += 1
        outcome = Outcome(kind, own_id, None, "transport", "", "", self._digests[image], round(at_s, 3))
        try:
            if kind in STREAMING:
                async with client.stream("POST", "/v1/chat/completions", json=doc, headers=headers) as response:
                    if (begun := self._watched.pop(response.headers.get("x-qvl-replica", ""), None)) is not None:
                        begun.set()
                    body = await response.aread()
            else:
                response = await client.post("/v1/chat/completions", json=doc, headers=headers)
                body = response.content
        except httpx.HTTPError as exc:
            outcome.detail = f"{type(exc).__name__}: {exc}"
            self.outcomes.append(outcome)
            return
        outcome.status = response.status_code
        outcome.request_id = response.headers.get("x-request-id", "")
        outcome.cache = response.headers.get("x-qvl-cache", "")
        outcome.replica = response.headers.get("x-qvl-replica", "")
        if own_id and outcome.request_id != own_id:
            outcome.ending, outcome.detail = "wrong-request-id", f"sent {own_id}, got {outcome.request_id!r}"
        elif response.status_code != 200:
            outcome.ending, outcome.detail = "http-error", body[:500].decode(errors="replace")
        elif kind in STREAMING:
            outcome.ending, outcome.detail = _stream_ending(body)
        else:
            outcome.ending, outcome.detail = _json_ending(body)
        self.outcomes.append(outcome)


def product_photo(rng: random.Random) -> str:
    """A PNG data URL: a coloured product shape on a white background, in a typical listing size."""
    width, height = rng.choice(SIZES)
    image = Image.new("RGB", (width, height), (255, 255, 255))
    colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    box = (width // 5, height // 5, width * 4 // 5, height * 4 // 5)
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        draw.rectangle(box, fill=colour)
    else:
        draw.ellipse(box, fill=colour)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _digest(data_url: str) -> str:
    return hashlib.sha256(base64.b64decode(data_url.split(",", 1)[1])).hexdigest()


def _json_ending(body: bytes) -> tuple[str, str]:
    try:
        doc = json.loads(body)
        content = doc["choices"][0]["message"]["content"]
        tokens = doc["usage"]["completion_tokens"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "bad-json", body[:500].decode(errors="replace")
    if not content or tokens != OUTPUT_TOKENS:
        return "bad-json", body[:500].decode(errors="replace")
    return "json", ""


def _stream_ending(body: bytes) -> tuple[str, str]:
    """done, interrupted, or `broken` with the reason: every event must be `data: ` and JSON, the last
    one [DONE]; an error event is allowed only as stream_interrupted, right before it."""
    events = [event for event in body.split(b"\n\n") if event.strip()]
    if not events or events[-1] != DONE:
        return "broken", f"does not end with [DONE]: ...{body[-300:]!r}"
    errors: list[str] = []
    chunks = 0
    for event in events[:-1]:
        if not event.startswith(b"data: "):
            return "broken", f"not a data event: {event[:200]!r}"
        try:
            doc = json.loads(event[6:])
        except ValueError:
            return "broken", f"event is not JSON: {event[:200]!r}"
        if "error" in doc:
            errors.append(str(doc["error"].get("type")))
        elif errors:
            return "broken", f"a chunk after an error event: {event[:200]!r}"
        else:
            chunks += 1
    if not errors:
        return ("done", "") if chunks else ("broken", "no chunk before [DONE]")
    if errors == ["stream_interrupted"]:
        return "interrupted", ""
    return "broken", f"error events {errors}: ...{body[-300:]!r}"


def _sim_child(up: Proc, port: int) -> psutil.Process:
    """The `qvl sim` process that `qvl up` started on `port`."""
    for child in psutil.Process(up.popen.pid).children():
        cmdline = child.cmdline()
        if "sim" in cmdline and str(port) in cmdline:
            return child
    raise LookupError(f"no qvl sim child of qvl up on port {port}")


def _audit_lines(directory: Path) -> tuple[list[bytes], list[str]]:
    """Every line of audit.log and its rotated files, oldest first, and the files' names."""
    files = sorted(directory.glob("audit.log*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    return [line for path in files for line in path.read_bytes().splitlines()], [p.name for p in files]


def test_soak_with_a_replica_killed_and_redis_restarted(
    cluster: Cluster, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QVL_API_KEYS", API_KEY)
    config = tmp_path / "qvl.yaml"
    config.write_text(SETTINGS)
    audit_dir = tmp_path / "audit"
    up = cluster.start(
        "up",
        "--config",
        str(config),
        "--cache",
        redis_server.url,
        "--audit-log",
        str(audit_dir / "audit.log"),
        ready_path="/ready",
        auth=True,
    )
    auth = {"authorization": f"Bearer {API_KEY}"}
    replicas = [r["url"] for r in httpx.get(up.url + "/v1/cluster", headers=auth, timeout=5).json()["replicas"]]
    assert len(replicas) == 3
    victim_url = replicas[1]
    victim = _sim_child(up, int(victim_url.rsplit(":", 1)[1]))
    victim_name = victim_url.removeprefix("http://")

    async def kill_replica() -> None:
        # When a long stream from the victim has just begun (far from its end), so it is certainly cut.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(soak.next_stream_from(victim_name).wait(), timeout=5)
        victim.send_signal(signal.SIGKILL)

    async def kill_redis() -> None:
        redis_server.kill()

    async def start_redis() -> None:
        await asyncio.to_thread(redis_server.start)

    soak = Soak(up.url, API_KEY)
    faults: dict[float, tuple[str, Fault]] = {
        KILL_REPLICA_AT: ("replica_killed_at_s", kill_replica),
        KILL_REDIS_AT: ("redis_killed_at_s", kill_redis),
        START_REDIS_AT: ("redis_started_at_s", start_redis),
    }
    asyncio.run(soak.run(SECONDS, WORKERS, faults))

    # The router after the run: still ready, the victim ejected, the cache's view of the outage.
    ready = httpx.get(up.url + "/ready", timeout=5)
    state = {
        r["url"]: r["healthy"] for r in httpx.get(up.url + "/v1/cluster", headers=auth, timeout=5).json()["replicas"]
    }
    redis_errors = metric_sum(up.url, "qvl_cache_requests_total", result="error")
    cache_results = {
        result: metric_sum(up.url, "qvl_cache_requests_total", result=result)
        for result in ("hit", "miss", "coalesced", "bypass", "error")
    }
    upstream_errors = {
        kind: metric_sum(up.url, "qvl_upstream_errors_total", replica=victim_name, type=kind)
        for kind in ("connect", "disconnect", "http_5xx", "stream_interrupted")
    }
    retries = metric_sum(up.url, "qvl_retries_total")

    # A graceful stop, so that the audit log is written out and closed.
    up.terminate()
    exit_status = up.popen.wait(60)
    log: str = up.output()
    lines, files = _audit_lines(audit_dir)

    outcomes = soak.outcomes
    requests = sum(soak.sent.values())
    by_kind = {
        kind: {"sent": soak.sent[kind], **collections.Counter(o.ending for o in outcomes if o.kind == kind)}
        for kind in MIX
    }
    interrupted = [o for o in outcomes if o.ending == "interrupted"]
    report = {
        "benchmark": "soak",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "seconds": round(soak.duration_s, 1),
        "workers": WORKERS,
        "requests": requests,
        "requests_per_s": round(requests / soak.duration_s, 1),
        "by_kind": by_kind,
        "failed": sum(not o.ok for o in outcomes) + requests - len(outcomes),
        "stream_interrupted": len(interrupted),
        "stream_interrupted_at_s": [o.at_s for o in interrupted],
        "x_qvl_cache": dict(collections.Counter(o.cache for o in outcomes)),
        "router_cache_results": cache_results,
        "redis_errors": redis_errors,
        "retries": retries,
        "victim_upstream_errors": upstream_errors,
        "audit_lines": len(lines),
        "audit_files": files,
        "faults": soak.faults,
        "auth": KEY_ID,
    }
    print("\nsoak:", json.dumps(report, indent=2))
    if os.environ.get("QVL_SOAK_REPORT"):
        out = ROOT / "benchmarks" / "results" / "soak.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

    def tail() -> str:
        return "\n--- router log (last 8000 characters) ---\n" + log[-8000:]

    # Every request was answered, none failed, and the faults happened when planned.
    assert len(outcomes) == requests
    failures = [o for o in outcomes if not o.ok]
    assert not failures, f"{len(failures)} failed requests, first ones: {failures[:10]}" + tail()
    assert soak.faults.keys() == {name for name, _ in faults.values()}
    assert requests > 1000, report
    # The victim died in the middle of a stream; only streams under way on it then were cut.
    assert interrupted, "the replica's death cut no stream" + tail()
    assert all(o.replica == victim_name for o in interrupted), interrupted
    assert all(o.at_s < soak.faults["replica_killed_at_s"] for o in interrupted), interrupted
    assert report["x_qvl_cache"].get("hit", 0) > 0, report
    assert redis_errors > 0, "the Redis outage was not seen by the cache" + tail()
    # The router survived both faults: ready, with the victim ejected and the other two healthy.
    assert ready.status_code == 200 and ready.json()["healthy_replicas"] == 2, ready.text + tail()
    assert state == {url: url != victim_url for url in replicas}, state
    assert exit_status == 0, f"qvl up exited with {exit_status}" + tail()
    assert "audit line" not in log and "Traceback" not in log, tail()

    # The audit log: one line per request, matching what each client saw, and no image bytes.
    assert len(lines) == requests, f"{len(lines)} audit lines for {requests} requests" + tail()
    seen = {o.request_id: o for o in outcomes}
    assert len(seen) == requests and "" not in seen, "a request id is missing or was given twice"
    audited: collections.Counter[str] = collections.Counter()
    for raw in lines:
        assert b"data:image" not in raw and not BASE64_RUN.search(raw), raw[:300]
        line = json.loads(raw)
        rid = line["request_id"]
        audited[rid] += 1
        o = seen.get(rid)
        assert o is not None, f"audit line for a request no client sent: {line}"
        expected = (502, "stream_interrupted") if o.ending == "interrupted" else (200, "")
        assert (line["status"], line["error_type"]) == expected, (line, o)
        assert line["key_id"] == KEY_ID and line["model"] == MODEL, line
        assert line["image_digests"] == [o.image_digest], (line, o)
        assert (line["cache"], line["replica"]) == (o.cache, o.replica), (line, o)
        if o.kind not in STREAMING:
            assert line["completion_tokens"] == OUTPUT_TOKENS, (line, o)
    assert set(audited) == set(seen) and set(audited.values()) == {1}, "request ids audited more than once"
