"""Scraping the router's and the replicas' /metrics through a run into metrics.jsonl.

Which replicas: the router's `GET /v1/cluster` at the start of the run (their URLs as the router reaches
them; a load machine that cannot reach them records the failures and goes on). Kept: every sample of the
`qvl_*` and `vllm:*` families except histogram buckets (the engine queue, running requests, KV-cache use,
image- and prefix-cache queries and hits, the router's counters). One JSON line per page read:

    {"unix": 1764379200.5, "source": "replica 127.0.0.1:8001", "ok": true, "error": null,
     "samples": [["vllm:num_requests_waiting", {"model_name": "qwen3-vl"}, 3.0], ...]}

The scraper runs in a thread of `qvl loadtest` (not in locust's processes, whose timing it would disturb).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

KEPT_PREFIXES = ("qvl_", "vllm:")
DEFAULT_INTERVAL_S = 2.0


@dataclass(frozen=True)
class Source:
    """A /metrics endpoint to read: `name` is what the records call it ("router", "replica host:port")."""

    name: str
    url: str


def parse_page(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The kept samples of a Prometheus text page as (name, labels, value); bucket samples dropped."""
    samples = []
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(KEPT_PREFIXES):
            continue
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            samples.append((sample.name, dict(sample.labels), float(sample.value)))
    return samples


@dataclass(frozen=True)
class ClusterView:
    """What the router says of its cluster at the start of a run: where to scrape, and how it routes."""

    sources: list[Source]
    policy: str | None
    replicas: int
    warning: str | None
    """Why only the router is scraped (GET /v1/cluster failed); None when it answered."""


def discover(target: str, api_key: str | None, timeout_s: float = 10) -> ClusterView:
    """The router and its replicas (from GET /v1/cluster), its routing policy and replica count."""
    sources = [Source("router", f"{target.rstrip('/')}/metrics")]
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.get(f"{target.rstrip('/')}/v1/cluster", headers=headers, timeout=timeout_s)
        answer.raise_for_status()
        cluster = answer.json()
        replicas = cluster["replicas"]
        policy = cluster.get("policy")
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        reason = f"cannot list the replicas (GET /v1/cluster: {exc}); scraping the router only"
        return ClusterView(sources, None, 0, reason)
    for replica in replicas:
        sources.append(Source(f"replica {replica['name']}", f"{str(replica['url']).rstrip('/')}/metrics"))
    return ClusterView(sources, policy if isinstance(policy, str) else None, len(replicas), None)


class Scraper:
    """Reads every source each `interval_s` seconds in a background thread, appending to `path`."""

    def __init__(
        self,
        sources: Sequence[Source],
        path: Path,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sources = list(sources)
        self.path = path
        self.interval_s = interval_s
        self.pages = 0
        self.failures = 0
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="qvl-scraper", daemon=True)
        self._client = httpx.Client(timeout=max(1.0, interval_s))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Take one last reading (the counters at the end of the run), then stop."""
        self._stop.set()
        self._thread.join()
        self._client.close()

    def _loop(self) -> None:
        with self.path.open("a") as out:
            while True:
                started = time.monotonic()
                for source in self.sources:
                    out.write(json.dumps(self.read(source)) + "\n")
                out.flush()
                if self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started))):
                    for source in self.sources:
                        out.write(json.dumps(self.read(source)) + "\n")
                    return

    def read(self, source: Source) -> dict[str, object]:
        """One reading of one source, as a metrics.jsonl line's object (failures recorded, not raised)."""
        unix = self._clock()
        try:
            answer = self._client.get(source.url)
            answer.raise_for_status()
            samples = parse_page(answer.text)
        except (httpx.HTTPError, ValueError) as exc:
            self.failures += 1
            return {"unix": unix, "source": source.name, "ok": False, "error": str(exc)[:300], "samples": []}
        self.pages += 1
        return {"unix": unix, "source": source.name, "ok": True, "error": None, "samples": samples}
