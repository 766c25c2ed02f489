"""Batch jobs on shared state: two `qvl router` processes on one Redis and one files directory, two `qvl sim`
replicas. The router running a job and one replica are SIGKILLed mid-job; the other router resumes the job
once its lease lapses, and the output holds every custom_id exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from support.batch import OpenAIClient, batch_lines, jsonl, wait_batch
from support.polling import wait_for
from support.servers import Cluster, RedisServer

MODEL = "qwen3-vl-sim"
LINES = 300


def test_a_job_survives_killing_its_router_and_a_replica_and_answers_each_line_once(
    cluster: Cluster, redis_server: RedisServer, tmp_path: Path, openai_client: OpenAIClient
) -> None:
    sims = [cluster.sim("--output-tokens", "24") for _ in range(2)]
    config = tmp_path / "routers.yaml"
    config.write_text(
        f"""router:
  batch:
    state: "{redis_server.url}"
    files_dir: "{tmp_path / "shared-files"}"
    lease_s: 2
    in_flight_per_replica: 4
"""
    )
    routers = [cluster.router(*sims, flags=("--config", str(config))) for _ in range(2)]
    submit = openai_client(routers[0].url)
    upload = submit.files.create(file=("catalogue.jsonl", batch_lines(MODEL, LINES, max_tokens=24)), purpose="batch")
    batch = submit.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")

    def progress() -> int:
        counts = submit.batches.retrieve(batch.id).request_counts
        return counts.completed if counts is not None else 0

    wait_for(lambda: progress() >= 40, timeout=60)
    holder = next(r for r in routers if f"running batch {batch.id}" in r.output())
    survivor = next(r for r in routers if r is not holder)
    holder.kill()
    sims[1].kill()
    client = openai_client(survivor.url)
    counts = client.batches.retrieve(batch.id).request_counts
    assert counts is not None and counts.completed < LINES  # killed mid-job
    done = wait_batch(client, batch.id, timeout=120)
    assert f"running batch {batch.id}" in survivor.output()  # resumed here
    assert done.status == "completed" and done.request_counts is not None
    out = jsonl(client.files.content(done.output_file_id or "").read())
    seen = Counter(line["custom_id"] for line in out)
    assert set(seen) == {f"req-{i}" for i in range(LINES)}
    assert max(seen.values()) == 1
    assert (done.request_counts.completed, done.request_counts.failed, done.error_file_id) == (LINES, 0, None)
    assert [line["custom_id"] for line in out] == [f"req-{i}" for i in range(LINES)]  # in input order
