"""What the routing-policy benchmark's runs and its report share: the workload file, the targets, each
engine's cluster and load (`Engine`), the regimes, and the sizes that make vLLM's caches hold C photos."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from loadtests.popularity import RoutingPolicy

CATALOGUE = Path(__file__).resolve().parents[1] / "loadtests" / "workloads" / "catalogue.yaml"
POLICIES: tuple[RoutingPolicy, ...] = ("round-robin", "least-loaded", "image-affinity")
TARGET_RATIO = 2.0
TARGET_LOAD = 1.25
VIRTUAL_NODES = 160  # router.virtual_nodes' default: the ring rebuilt here to know each photo's owner
COUNTERS = (
    "mm_cache_queries",
    "mm_cache_hits",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "prompt_tokens",
    "generation_tokens",
)

# vLLM sizes its processor cache in bytes. Measured with vLLM 0.32.0 and the tiny model, 256x256 photos:
# 0.01 GiB held 30 (of 60 photos asked for again in reverse order, 30 were hits) and 0.002787 GiB held 7
# (its hits matched an exact LRU of 7 replayed over the requests each replica got): one photo fewer than
# the bytes hold, at 332-346 KB a photo. So C photos take (C + 1.5) x 346 KB.
VLLM_PHOTO = (256, 256)
VLLM_PHOTO_BYTES = 346_000
VLLM_PHOTO_SLACK = 1.5
# KV cache: blocks of 32 tokens (vLLM's CPU default of 128 is longer than a prompt here: nothing would be
# cached); the tiny model keeps 2 layers x (K, V) x 2 heads x 32 x 2 bytes = 512 bytes a token.
VLLM_BLOCK = 32
VLLM_TOKEN_BYTES = 512
VLLM_PROMPT_BLOCKS = 6  # a catalogue prompt with a 256x256 photo is 165 tokens (measured), its answer 16 more
VLLM_MAX_MODEL_LEN = 1024

PUZZLE_REQUESTS = 300
PUZZLE_CATALOGUE = 60
PUZZLE_CONCURRENCY = 8
LOAD_SAMPLE_S = 0.25


@dataclass(frozen=True)
class Engine:
    """One engine's cluster and load: R replicas, each caching C photos, driven by a closed loop."""

    name: str
    replicas: int
    cache_items: int
    concurrency: int
    requests: int
    max_tokens: int
    photo: tuple[int, int] | None  # every photo this size; None: the workload's own size buckets

    def qvl_up_args(self) -> list[str]:
        """`qvl up` flags beyond the policy and port: the engine, its replicas, no answer cache, cache sizes."""
        args = ["--engine", self.name, "--replicas", str(self.replicas), "--cache", "off", "--no-auth"]
        if self.name == "sim":
            return args
        blocks = max((self.concurrency + self.cache_items) * VLLM_PROMPT_BLOCKS, VLLM_MAX_MODEL_LEN // VLLM_BLOCK)
        return [
            *args,
            "--no-gpu-exporter",
            "--max-model-len",
            str(VLLM_MAX_MODEL_LEN),
            "--kv-cache-memory-bytes",
            str(blocks * VLLM_BLOCK * VLLM_TOKEN_BYTES),
            "--engine-arg",
            f"block_size={VLLM_BLOCK}",
            "--engine-arg",
            f"mm_processor_cache_gb={(self.cache_items + VLLM_PHOTO_SLACK) * VLLM_PHOTO_BYTES / 2**30:.6f}",
        ]

    def env(self) -> dict[str, str]:
        """The simulator's cache size and answer length come from its settings' environment variables."""
        env = dict(os.environ)
        if self.name == "sim":
            env["QVL_SIM__MM_CACHE_ITEMS"] = str(self.cache_items)
            env["QVL_SIM__OUTPUT_TOKENS"] = str(self.max_tokens)
        return env


@dataclass(frozen=True)
class Regime:
    name: str
    catalogue: int
    seed: int


def regimes(cache_items: int) -> list[Regime]:
    return [Regime("fits", cache_items, 101), Regime("4x cache", 4 * cache_items, 102)]


def ratio(hits: float, queries: float) -> float | None:
    return hits / queries if queries else None
