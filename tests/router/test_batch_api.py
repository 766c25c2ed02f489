"""The OpenAI files and batches API with the official `openai` client, against `qvl sim` replicas behind a
`qvl router` (job state in memory here; tests/router/test_batch_durable.py runs it on Redis with kills)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from support.batch import OpenAIClient, batch_lines, jsonl, wait_batch
from support.chat import png_data_url
from support.servers import Cluster, Proc

MODEL = "qwen3-vl-sim"
OWNER = "sk-batch-owner-0123456789"
OTHER = "sk-batch-other-9876543210"


@pytest.fixture
def router(cluster: Cluster, tmp_path: Path) -> Proc:
    sim = cluster.sim("--output-tokens", "6")
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - id: owner\n    key: {OWNER}\n    models: [{MODEL}]\n  - id: other\n    key: {OTHER}\n")
    config = tmp_path / "router.yaml"
    config.write_text(
        f"router:\n  batch:\n    files_dir: '{tmp_path / 'files'}'\n  audit:\n    path: '{tmp_path / 'audit.jsonl'}'\n"
    )
    return cluster.router(sim, flags=("--keys-file", str(keys), "--config", str(config)), auth=True)


def test_a_batch_with_images_runs_to_completion_through_the_openai_client(
    router: Proc, tmp_path: Path, openai_client: OpenAIClient
) -> None:
    owner = openai_client(router.url, OWNER)
    upload = owner.files.create(
        file=("products.jsonl", batch_lines(MODEL, 5, image_url=png_data_url())), purpose="batch"
    )
    assert (upload.object, upload.purpose, upload.filename) == ("file", "batch", "products.jsonl")
    batch = owner.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "tags"}
    )
    assert batch.status == "validating" and batch.metadata == {"job": "tags"}
    done = wait_batch(owner, batch.id, timeout=60)
    assert done.status == "completed", done
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 5, 0)
    assert done.output_file_id and done.error_file_id is None and done.completed_at and done.in_progress_at
    out = jsonl(owner.files.content(done.output_file_id).read())
    assert [line["custom_id"] for line in out] == [f"req-{i}" for i in range(5)]
    for line in out:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["response"]["body"]["choices"][0]["message"]["content"]
    # Each line went through the edge, the proxy and the audit log like any request, marked with its batch.
    audit = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    lines = [a for a in audit if a["batch_id"] == batch.id]
    assert len(lines) == 5 and all(a["key_id"] == "owner" and len(a["image_digests"]) == 1 for a in lines)
    metrics = httpx.get(router.url + "/metrics", timeout=5).text
    assert 'qvl_batch_lines_total{result="completed"} 5.0' in metrics
    assert 'qvl_batches_total{status="completed"} 1.0' in metrics
    assert 'qvl_admission_decisions_total{class="batch",decision="admitted"}' in metrics


def test_invalid_lines_go_to_the_error_file_with_their_line_and_reason(
    router: Proc, openai_client: OpenAIClient
) -> None:
    owner = openai_client(router.url, OWNER)
    good = batch_lines(MODEL, 2).decode().splitlines()
    lines = [
        good[0],
        json.dumps({"custom_id": "bad-image", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}]}}),
        json.dumps({"custom_id": "other-model", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": "not-mine", "messages": [{"role": "user", "content": "hi"}]}}),
        json.dumps({"custom_id": "streams", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}}),
        json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}),
        "{not json",
        json.dumps({"custom_id": "remote", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": MODEL, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/bag.png"}}]}]}}),
        good[1],
    ]  # fmt: skip
    upload = owner.files.create(file=("mixed.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    batch = owner.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_batch(owner, batch.id, timeout=60)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (8, 2, 6)
    assert [x["custom_id"] for x in jsonl(owner.files.content(done.output_file_id or "").read())] == ["req-0", "req-1"]
    errors = jsonl(owner.files.content(done.error_file_id or "").read())
    by_line = {e["error"]["line"]: (e["custom_id"], e["error"]["code"]) for e in errors}
    assert by_line == {
        2: ("bad-image", "unsupported_image_format"),
        3: ("other-model", "model_not_allowed"),
        4: ("streams", "invalid_request_error"),
        5: (None, "invalid_custom_id"),
        6: (None, "invalid_json"),
        7: ("remote", "unsupported_image_url"),  # remote URLs: router.fetch is off
    }
    assert all(e["response"] is None and e["error"]["message"] for e in errors)


def test_another_key_sees_404_and_cannot_cancel(router: Proc, openai_client: OpenAIClient) -> None:
    owner, other = openai_client(router.url, OWNER), openai_client(router.url, OTHER)
    upload = owner.files.create(file=("a.jsonl", batch_lines(MODEL, 2)), purpose="batch")
    batch = owner.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    for call in (
        lambda: other.batches.retrieve(batch.id),
        lambda: other.batches.cancel(batch.id),
        lambda: other.files.retrieve(upload.id),
        lambda: other.files.content(upload.id),
        lambda: other.files.delete(upload.id),
        lambda: other.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.batches.list().data == []
    assert wait_batch(owner, batch.id, timeout=60).status == "completed"
    assert [b.id for b in owner.batches.list().data] == [batch.id]


def test_cancel_stops_new_lines_and_keeps_the_finished_ones(
    cluster: Cluster, tmp_path: Path, openai_client: OpenAIClient
) -> None:
    sim = cluster.sim("--output-tokens", "40", "--max-running", "2")
    config = tmp_path / "router.yaml"
    config.write_text(f"router:\n  batch:\n    files_dir: '{tmp_path / 'files'}'\n    in_flight_per_replica: 2\n")
    router = cluster.router(sim, flags=("--config", str(config)))
    owner = openai_client(router.url, "unused")
    upload = owner.files.create(file=("big.jsonl", batch_lines(MODEL, 200, max_tokens=40)), purpose="batch")
    batch = owner.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    started = wait_batch(owner, batch.id, timeout=60, until=("in_progress",))
    while (counts := owner.batches.retrieve(batch.id).request_counts) is None or counts.completed < 3:
        assert started.status == "in_progress"
    cancelling = owner.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_batch(owner, batch.id, timeout=30)
    assert done.status == "cancelled" and done.cancelled_at and done.request_counts is not None
    finished = jsonl(owner.files.content(done.output_file_id or "").read())
    assert 3 <= len(finished) == done.request_counts.completed < 200
    assert owner.batches.cancel(batch.id).status == "cancelled"  # cancelling again changes nothing
    with pytest.raises(openai.BadRequestError) as refused:
        owner.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    assert refused.value.code == "invalid_batch"
