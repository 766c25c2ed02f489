"""What the load-test tests share: the tenants' keys of the shipped workloads, and the simulated cluster
they drive (`qvl up --engine sim`, reniced below the generator)."""

from __future__ import annotations

import collections
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from support.servers import Cluster, Proc

LOCUST = Path(sys.executable).parent / "locust"
KEYS = {
    "web": "sk-loadtest-web-0123456789",
    "app": "sk-loadtest-app-0123456789",
    "partner": "sk-loadtest-partner-0123456789",
    "indexer": "sk-loadtest-indexer-0123456789",
}
LIMITED_KEY = "sk-loadtest-limited-0123456789"
"""A key with a quota of 300 requests a minute (5/s, a burst of 50): sending faster gets 429s."""
RECORD_FIELDS = {
    "index", "tenant", "task", "image_buckets", "stream", "intended_s", "sent_s", "send_lag_ms", "status",
    "error_type", "ttft_ms", "itl", "e2e_ms", "prompt_tokens", "image_tokens", "output_tokens", "replica",
    "cache", "worker",
}  # fmt: skip
"""Every field of a request record (loadtests/records.py)."""
TENANT_ENV = {f"QVL_LOADTEST_KEY_{tenant.upper()}": key for tenant, key in KEYS.items()}


TINY_WORKLOAD = """
version: 1
name: tiny
seed: 9
images:
  buckets: [{{name: thumbnail, width: 256, height: 256, share: 1}}]
  formats: {{jpeg: 1}}
popularity: {{catalogue: 10, alpha: 1.0, upload_share: 0}}
tasks:
  - {{name: caption, prompt: "Describe.", output: {{kind: fixed, tokens: 4}}, temperature: 0.7, share: 1}}
arrivals: {arrivals}
tenants: [{{id: web, key_env: QVL_LOADTEST_KEY_WEB, share: 1}}]
"""


def tiny_workload(arrivals: str) -> str:
    """A workload file of 256x256 captions of 4 tokens (sampled: never cached), with these arrivals."""
    return TINY_WORKLOAD.format(arrivals=arrivals)


class Lru:
    """An exact LRU cache of keys: what a replica's engine image cache does, for checking the models."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: collections.OrderedDict[object, None] = collections.OrderedDict()

    def lookup(self, key: object) -> bool:
        """Whether `key` is cached; then it is the most recent (inserted on a miss, the oldest evicted)."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return False


def loadtest_env() -> dict[str, str]:
    """The environment a generator runs in: the shipped workloads' keys set."""
    return {**os.environ, **TENANT_ENV}


@contextlib.contextmanager
def sim_cluster(tmp: Path, *flags: str) -> Iterator[Proc]:
    """`qvl up --engine sim --replicas 2` with the workloads' keys, at a lower CPU priority than the
    generator; inter-token latency 2 ms so that a few users keep up with tens of requests a second."""
    keys = tmp / "keys.yaml"
    keys.write_text(
        "keys:\n"
        + "".join(f"  - {{id: {t}, key: {k}}}\n" for t, k in KEYS.items())
        + f"  - {{id: limited, key: {LIMITED_KEY}, requests_per_minute: 300}}\n"
    )
    cluster = Cluster(tmp)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QVL_SIM__STEP_BASE_MS", "2")
        try:
            up = cluster.start(
                "up",
                "--engine",
                "sim",
                "--replicas",
                "2",
                "--keys-file",
                str(keys),
                *flags,
                ready_path="/ready",
                auth=True,
            )
            # The generator must not wait for a core: on a small machine the cluster under test shares the
            # CPUs with it, so the cluster yields (a generator's send lag is what these tests judge).
            leader = psutil.Process(up.pid)
            for proc in [leader, *leader.children(recursive=True)]:
                proc.nice(10)
            yield up
        finally:
            cluster.stop_all()
