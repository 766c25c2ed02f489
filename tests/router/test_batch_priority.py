"""Priority classes against a real `qvl sim` replica with priority scheduling: a running batch backs off
when an interactive burst fills the replica (its lines beyond one are taken back), `flex` is shed while the
replica is saturated and interactive is not, and the batch finishes once the burst is over."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
from support.batch import OpenAIClient, batch_lines, wait_batch
from support.metrics import metric_sum
from support.polling import wait_for
from support.servers import Cluster

MODEL = "qwen3-vl-sim"


def ask(url: str, i: int, tier: str | None = None) -> httpx.Response:
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 60}
    if tier is not None:
        body["service_tier"] = tier
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_batch_backs_off_under_an_interactive_burst_and_flex_is_shed_first(
    cluster: Cluster, tmp_path: Path, openai_client: OpenAIClient
) -> None:
    # 25 ms steps: a 60-token line runs for 1.5 s, the 60 lines for over 20 s at 4 at a time.
    sim = cluster.sim("--output-tokens", "60", "--max-running", "4", "--step-base-ms", "25")
    config = tmp_path / "router.yaml"
    config.write_text(
        f"router:\n  batch:\n    files_dir: '{tmp_path / 'files'}'\n    in_flight_per_replica: 4\n"
        "  load_scrape_interval_s: 0.25\n"
    )
    router = cluster.router(sim, flags=("--config", str(config)))
    client = openai_client(router.url)
    upload = client.files.create(file=("tags.jsonl", batch_lines(MODEL, 60, max_tokens=60)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    # With nothing else to run, the batch takes the replica's 4 slots (at least 3 at any one look).
    try:
        wait_for(lambda: metric_sum(router.url, "qvl_batch_in_flight") >= 3, timeout=30)
    except AssertionError:
        state = client.batches.retrieve(batch.id).model_dump_json()
        raise AssertionError(f"the batch never held 3 slots: {state}\nrouter log:\n{router.output()[-4000:]}") from None

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        burst = [pool.submit(ask, router.url, i) for i in range(32)]
        # The replica's queue fills: batch gives its slots back, down to the one line the floor allows.
        wait_for(lambda: metric_sum(router.url, "qvl_batch_in_flight") <= 1, timeout=5)
        wait_for(lambda: metric_sum(router.url, "qvl_replica_engine_waiting") >= 1, timeout=5)
        shed = ask(router.url, 99, tier="flex")
        answers = [f.result() for f in burst]
    assert shed.status_code == 429 and shed.json()["error"]["code"] == "flex_shed"
    assert int(shed.headers["retry-after"]) >= 1
    assert [a.status_code for a in answers] == [200] * 32  # interactive is never shed
    assert metric_sum(router.url, "qvl_admission_decisions_total", **{"class": "batch", "decision": "aborted"}) >= 1
    assert metric_sum(router.url, "qvl_admission_decisions_total", **{"class": "flex", "decision": "shed"}) == 1

    done = wait_batch(client, batch.id, timeout=90)  # aborted lines ran again: nothing lost
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (60, 0)
    assert ask(router.url, 100, tier="flex").status_code == 200  # with room again, flex is served
