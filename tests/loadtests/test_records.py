"""Per-request records, gap summaries, and the run verdict on the generator's send lag."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from support.loadtests import RECORD_FIELDS

from loadtests.records import (
    Record,
    RecordWriter,
    percentile,
    records_path,
    summarise,
    summarise_gaps,
    summary_path,
)

RECORD = Record(
    index=0,
    tenant="web",
    task="question",
    image_buckets=["listing"],
    stream=True,
    intended_s=1.0,
    sent_s=1.002,
    send_lag_ms=2.0,
    status=200,
    error_type=None,
    ttft_ms=80.0,
    itl=summarise_gaps([0.01, 0.02]),
    e2e_ms=300.0,
    prompt_tokens=820,
    image_tokens=800,
    output_tokens=3,
    replica="r1",
    cache="miss",
    worker=0,
)


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(i) for i in range(101)], 99) == 99.0


def test_gap_summary_in_milliseconds() -> None:
    summary = summarise_gaps([0.010, 0.020, 0.030])
    assert summary.count == 3 and summary.max_ms == 30.0
    assert summary.mean_ms == pytest.approx(20.0) and summary.p50_ms == pytest.approx(20.0)
    assert summarise_gaps([]).count == 0 and summarise_gaps([]).mean_ms is None


def test_writer_writes_one_json_line_per_record(tmp_path: Path) -> None:
    writer = RecordWriter(tmp_path / "runs" / "r.jsonl")
    writer.write(RECORD)
    writer.write(replace(RECORD, index=1, error_type="rate_limit_exceeded", status=429))
    writer.close()
    lines = [json.loads(line) for line in (tmp_path / "runs" / "r.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1]
    assert set(lines[0]) == RECORD_FIELDS
    assert lines[0]["itl"] == {
        "count": 2,
        "mean_ms": 15.0,
        "p50_ms": 15.0,
        "p99_ms": pytest.approx(19.9),
        "max_ms": 20.0,
    }


def test_paths_per_worker_and_summary() -> None:
    assert records_path(Path("r/storefront.jsonl"), None) == Path("r/storefront.jsonl")
    assert records_path(Path("r/storefront.jsonl"), 3) == Path("r/storefront.w3.jsonl")
    assert summary_path(Path("r/storefront.w3.jsonl")) == Path("r/storefront.w3.summary.json")


def test_run_is_valid_when_the_generator_kept_up() -> None:
    records = [replace(RECORD, index=i, send_lag_ms=float(i % 5)) for i in range(200)]
    summary = summarise(records)
    assert summary.valid and summary.requests == 200 and summary.errors == 0
    assert summary.ttft_p50_ms == 80.0
    assert summary.verdict().startswith("run valid")


def test_run_is_invalid_when_p99_send_lag_exceeds_the_bound() -> None:
    records = [replace(RECORD, index=i, send_lag_ms=50.0 if i % 10 == 0 else 1.0) for i in range(100)]
    summary = summarise(records, max_send_lag_ms=10)
    assert not summary.valid
    assert summary.verdict() == "run INVALID: the generator fell behind (P99 send lag 50.0 ms > 10 ms)"
    assert json.loads(summary.to_json())["valid"] is False
    assert summarise(records, max_send_lag_ms=60).valid


def test_closed_loop_has_no_lag_and_is_valid() -> None:
    summary = summarise([replace(RECORD, intended_s=None, send_lag_ms=None, error_type="x")])
    assert summary.valid and summary.send_lag_p99_ms is None and summary.errors == 1


def test_a_record_reads_back_from_its_json_line() -> None:
    assert Record.from_json(RECORD.to_json()) == RECORD
    plain = replace(RECORD, stream=False, itl=None, ttft_ms=None)
    assert Record.from_json(plain.to_json()) == plain
    with pytest.raises(TypeError):
        Record.from_json(json.dumps({"index": 1}))
