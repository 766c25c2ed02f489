"""SLO strings, which requests count towards goodput, and a run's SLO checks and summary."""

from __future__ import annotations

from dataclasses import replace

import pytest

from loadtests.records import Record, Summary, percentile, summarise_gaps
from loadtests.slo import SloError, check, meets, parse_slo
from loadtests.summary import summarise_run

BASE = Record(
    index=0, tenant="web", task="question", image_buckets=["listing"], stream=True, intended_s=0.0, sent_s=0.0,
    send_lag_ms=1.0, status=200, error_type=None, ttft_ms=100.0, itl=summarise_gaps([0.02, 0.04]), e2e_ms=1000.0,
    prompt_tokens=10, image_tokens=100, output_tokens=3, replica="r1", cache="miss", worker=0,
)  # fmt: skip


def records(n: int) -> list[Record]:
    """n streamed requests sent 0.1 s apart, TTFT 10, 20, ... ms; every tenth failed."""
    return [
        replace(
            BASE,
            index=i,
            intended_s=i / 10,
            sent_s=i / 10 + 0.001,
            ttft_ms=10.0 * (i + 1),
            e2e_ms=500.0,
            error_type="rate_limit_exceeded" if i % 10 == 9 else None,
            status=429 if i % 10 == 9 else 200,
        )
        for i in range(n)
    ]


def test_an_slo_string_parses_units_and_percentiles() -> None:
    ttft, itl, e2e, errors = parse_slo("ttft_p99<=1.5s, itl_p99.9<=60ms,e2e_p50<=10s,errors<=0.1%")
    assert (ttft.metric, ttft.percentile, ttft.bound) == ("ttft", 99.0, 1500.0)
    assert (itl.metric, itl.percentile, itl.bound) == ("itl", 99.9, 60.0)
    assert (e2e.metric, e2e.percentile, e2e.bound) == ("e2e", 50.0, 10000.0)
    assert (errors.metric, errors.percentile, errors.bound) == ("errors", None, pytest.approx(0.001))
    assert parse_slo("errors<=0.02")[0].bound == 0.02


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ttft_p99<1.5s", "expected METRIC<=BOUND"),
        ("ttft_p99<=fast", "not a number with ms, s or %"),
        ("ttft_p99<=15", "needs a unit"),
        ("latency_p99<=1s", "unknown metric 'latency_p99'"),
        ("errors<=5ms", "ratio"),
        ("errors<=150%", "cannot exceed 100%"),
        ("", "empty SLO"),
    ],
)
def test_a_bad_slo_says_which_part_and_why(text: str, message: str) -> None:
    with pytest.raises(SloError, match=message):
        parse_slo(text)


def test_a_request_meets_the_slo_only_without_error_and_within_every_bound() -> None:
    objectives = parse_slo("ttft_p99<=200ms,itl_p99<=35ms,e2e_p99<=2s")
    assert meets(BASE, objectives)  # TTFT 100, mean gap 30, E2E 1000
    assert not meets(replace(BASE, ttft_ms=201.0), objectives)
    assert not meets(replace(BASE, itl=summarise_gaps([0.02, 0.06])), objectives)  # mean gap 40 ms
    assert not meets(replace(BASE, e2e_ms=2001.0), objectives)
    assert not meets(replace(BASE, error_type="timeout"), objectives)
    # A whole JSON answer has no TTFT or gaps: only its end-to-end time is judged.
    assert meets(replace(BASE, stream=False, ttft_ms=None, itl=None), objectives)


def test_the_checks_take_percentiles_over_answered_requests_and_the_error_ratio_over_all() -> None:
    run = records(100)
    answered = [r.ttft_ms for r in run if r.error_type is None and r.ttft_ms is not None]
    ttft, errors = check(run, parse_slo("ttft_p90<=900ms,errors<=5%"))
    assert ttft.measured == percentile(answered, 90) and ttft.held == (ttft.measured <= 900)
    assert errors.measured == pytest.approx(0.1) and not errors.held


def test_goodput_counts_the_requests_that_met_every_objective() -> None:
    run = records(100)
    summary = summarise_run(run, objectives=parse_slo("ttft_p50<=500ms"))
    good = sum(1 for r in run if r.error_type is None and r.ttft_ms is not None and r.ttft_ms <= 500)
    assert summary.duration_s == pytest.approx(run[-1].sent_s + 0.5 - run[0].sent_s)
    assert summary.goodput_rps == pytest.approx(good / summary.duration_s)
    assert summary.throughput_rps == pytest.approx(90 / summary.duration_s)
    assert summary.errors == 10 and summary.errors_by_type == {"rate_limit_exceeded": 10}
    assert summary.slo_held is True and summary.valid
    assert "SLO held" in summary.verdict()
    missed = summarise_run(run, objectives=parse_slo("errors<=1%"))
    assert missed.slo_held is False and "SLO MISSED: errors<=1%" in missed.verdict()
    assert summarise_run(run).goodput_rps is None and summarise_run(run).slo_held is None


def test_a_late_worker_makes_the_merged_run_invalid() -> None:
    run = records(20)
    on_time = Summary(10, 0, None, None, 1.0, 10.0, True, worker=0)
    late = Summary(10, 0, None, None, 50.0, 10.0, False, worker=1)
    summary = summarise_run(run, [on_time, late])
    assert not summary.valid and summary.late_workers == [1]
    assert "run INVALID" in summary.verdict() and "workers [1]" in summary.verdict()
    assert summarise_run(run, [on_time]).valid
    lagging = [replace(r, send_lag_ms=40.0) for r in run]
    assert not summarise_run(lagging, [on_time]).valid  # the merged lag judges too


def test_no_answer_at_all_does_not_hold_an_slo() -> None:
    failed = [replace(r, error_type="ConnectError", status=None) for r in records(5)]
    summary = summarise_run(failed, objectives=parse_slo("ttft_p99<=1s"))
    assert summary.slo_held is False and "no request was answered" in summary.verdict()
