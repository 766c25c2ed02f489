"""How batch shares the cluster, against `qvl sim` replicas: identical greedy lines answered once by the
answer cache, two tenants' batches progressing side by side, and the aging floor letting a batch through a
replica that interactive load keeps full (and `strict` not)."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from pathlib import Path

import httpx
import openai
from support.batch import OpenAIClient, batch_lines, wait_batch
from support.chat import png_data_url
from support.polling import wait_for
from support.servers import Cluster, Proc

MODEL = "qwen3-vl-sim"
ALICE = "sk-tenant-alice-0123456789"
BOB = "sk-tenant-bob-9876543210aa"
BUSY_TOKENS = 60


def router_with(cluster: Cluster, tmp_path: Path, sim: Proc, batch: str, name: str) -> Proc:
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"router:\n  load_scrape_interval_s: 0.25\n  batch:\n    files_dir: '{tmp_path / name}'\n{batch}")
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - id: alice\n    key: {ALICE}\n  - id: bob\n    key: {BOB}\n")
    return cluster.router(sim, flags=("--config", str(config), "--keys-file", str(keys)), auth=True)


def submit(openai_client: OpenAIClient, router: Proc, key: str, data: bytes) -> tuple[openai.OpenAI, str]:
    client = openai_client(router.url, key)
    upload = client.files.create(file=("in.jsonl", data), purpose="batch")
    return client, client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def test_identical_greedy_lines_are_answered_once_and_tenants_share_evenly(
    cluster: Cluster, tmp_path: Path, openai_client: OpenAIClient
) -> None:
    sim = cluster.sim("--output-tokens", "30", "--max-running", "64")
    router = router_with(cluster, tmp_path, sim, "    in_flight_per_replica: 4\n", "share")
    content = [{"type": "text", "text": "Tag this bag."}, {"type": "image_url", "image_url": {"url": png_data_url()}}]
    same = {"model": MODEL, "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": content}]}
    lines = [json.dumps({"custom_id": f"same-{i}", "method": "POST", "url": "/v1/chat/completions", "body": same})
             for i in range(12)]  # fmt: skip
    client, batch_id = submit(openai_client, router, ALICE, ("\n".join(lines) + "\n").encode())
    assert wait_batch(client, batch_id, timeout=60).status == "completed"
    cache = {r: float(v) for r, v in _cache_results(router).items()}
    assert cache.get("miss", 0) <= 4 and cache.get("hit", 0) + cache.get("coalesced", 0) >= 8  # at most K misses

    # Two tenants at once: each gets a fair share of the same spare slots.
    alice, a = submit(openai_client, router, ALICE, batch_lines(MODEL, 120, max_tokens=30, prefix="a"))
    bob, b = submit(openai_client, router, BOB, batch_lines(MODEL, 120, max_tokens=30, prefix="b"))

    def done(client: openai.OpenAI, batch_id: str) -> int:
        counts = client.batches.retrieve(batch_id).request_counts
        return counts.completed if counts is not None else 0

    wait_for(lambda: done(alice, a) + done(bob, b) >= 80, timeout=60)
    first, second = done(alice, a), done(bob, b)
    assert min(first, second) >= 0.6 * max(first, second), (first, second)
    assert wait_batch(alice, a, timeout=60).status == wait_batch(bob, b, timeout=60).status == "completed"


def _cache_results(router: Proc) -> dict[str, str]:
    found = {}
    for line in httpx.get(router.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("qvl_cache_requests_total{"):
            found[line.split('result="', 1)[1].split('"', 1)[0]] = line.rsplit(" ", 1)[1]
    return found


def keep_busy(router: Proc, stop: threading.Event) -> None:
    """Interactive requests back to back from 16 threads on a 2-slot replica: 14 wait at every step, so the
    queue stays non-empty even when the loaded machine holds several threads between two requests (with 8,
    one scrape in a full-suite run saw none waiting and the strict batch ran a line). Each asks for 60
    tokens (about 1 s on the sim), so the queue takes some 7 s to drain: with 20 (2 s) a full-suite run
    stalled the busy router that long and the strict batch ran two lines."""

    def loop(i: int) -> None:
        while not stop.is_set():
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": BUSY_TOKENS}
            httpx.post(
                router.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {ALICE}"}, timeout=60
            )

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for i in range(16):
            pool.submit(loop, i)


def test_the_aging_floor_lets_a_starved_batch_through_and_strict_does_not(
    cluster: Cluster, tmp_path: Path, openai_client: OpenAIClient
) -> None:
    sim = cluster.sim("--output-tokens", "20", "--max-running", "2")
    floor = router_with(cluster, tmp_path, sim, "    aging_after_s: 1\n", "floor")
    strict = router_with(cluster, tmp_path, sim, "    aging_after_s: 1\n    strict: true\n", "strict")
    stop = threading.Event()
    busy = threading.Thread(target=keep_busy, args=(floor, stop))
    busy.start()
    try:
        wait_for(lambda: _waiting(floor) >= 1, timeout=15)
        client_floor, with_floor = submit(openai_client, floor, BOB, batch_lines(MODEL, 4, max_tokens=4, prefix="f"))
        client_strict, without = submit(openai_client, strict, BOB, batch_lines(MODEL, 4, max_tokens=4, prefix="s"))
        # Under the floor the starved batch still finishes, one line at a time, while the queue stays full.
        assert wait_batch(client_floor, with_floor, timeout=180).status == "completed"
        assert _waiting(floor) >= 1
        counts = client_strict.batches.retrieve(without).request_counts
        assert counts is not None and counts.completed == 0  # strict: only spare capacity, and there is none
    finally:
        stop.set()
        busy.join(timeout=60)
    assert wait_batch(client_strict, without, timeout=60).status == "completed"  # room again: it runs


def _waiting(router: Proc) -> float:
    total = 0.0
    for line in httpx.get(router.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("qvl_replica_engine_waiting{"):
            total += float(line.rsplit(" ", 1)[1])
    return total
