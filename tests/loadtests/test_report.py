"""The load-test report renders from recorded run folders: PNGs exist and are valid, the HTML embeds them and
nothing external, the tables agree with `summarise_run` over the same records, several runs are compared,
plots without data are left out with a note, and a folder that is not a run is refused by name."""

from __future__ import annotations

import base64
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from loadtests.records import Record, Summary, percentile, summarise, summarise_gaps
from loadtests.report import Report, write_report
from loadtests.runfolder import RunFolderError
from loadtests.slo import parse_slo
from loadtests.summary import RunSummary, summarise_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SLO = "ttft_p99<=400ms,e2e_p99<=2s,errors<=5%"
REPLICAS = ("127.0.0.1:8001", "127.0.0.1:8002")
CLOCK_START = 1_764_379_200.0
ONE_RUN_PLOTS = {
    "latency_time",
    "latency_bucket",
    "ttft",
    "throughput",
    "send_lag",
    "replicas",
    "engine_queue",
}

WriteRun = Callable[..., Path]


def make_records(rng: random.Random, count: int, rate: float, stream_share: float, open_loop: bool) -> list[Record]:
    """A run's requests: two buckets, streamed and whole answers, two replicas, cache hits, a few errors."""
    records = []
    for index in range(count):
        intended = 0.5 + index / rate
        lag = rng.uniform(0.2, 3.0) if rng.random() < 0.95 else rng.uniform(3, 8)
        bucket = rng.choice(["thumb", "listing"])
        stream = rng.random() < stream_share
        roll = rng.random()
        error = "overloaded" if roll < 0.02 else "connection" if roll < 0.03 else None
        tokens = rng.randint(8, 64)
        base = 60.0 if bucket == "thumb" else 180.0
        ttft = base + rng.expovariate(1 / 40)
        gaps = [rng.uniform(0.008, 0.03) for _ in range(tokens - 1)]
        e2e = ttft + 1000 * sum(gaps) if error is None else rng.uniform(1, 20)
        cache = None if error else rng.choices(["hit", "miss", "bypass", "coalesced"], [20, 60, 18, 2])[0]
        answered_by_replica = error is None and cache not in ("hit", "coalesced")
        records.append(
            Record(
                index=index,
                tenant=rng.choice(["web", "app"]),
                task="attributes",
                image_buckets=[bucket],
                stream=stream,
                intended_s=intended if open_loop else None,
                sent_s=intended + lag / 1000,
                send_lag_ms=lag if open_loop else None,
                status={None: 200, "overloaded": 503, "connection": None}[error],
                error_type=error,
                ttft_ms=ttft if stream and error is None else None,
                itl=summarise_gaps(gaps) if stream and error is None else None,
                e2e_ms=e2e,
                prompt_tokens=None if error else 900,
                image_tokens=800 if bucket == "listing" else 200,
                output_tokens=None if error else tokens,
                replica=REPLICAS[index % 2] if answered_by_replica else None,
                cache=cache,
                worker=0,
            )
        )
    return records


def scrape_lines(rng: random.Random, seconds: int) -> list[str]:
    """metrics.jsonl: the router and two replicas every 2 s, the replicas' gauges and cumulative counters."""
    lines = []
    totals = {(r, n): 0.0 for r in REPLICAS for n in ("mmq", "mmh", "pq", "ph")}
    for t in range(0, seconds + 1, 2):
        unix = CLOCK_START + t
        lines.append(json.dumps({"unix": unix, "source": "router", "ok": True, "error": None,
                                 "samples": [["qvl_requests_total", {"model": "qwen3-vl"}, 15.0 * t]]}))  # fmt: skip
        for replica in REPLICAS:
            images = rng.randint(10, 20)
            totals[replica, "mmq"] += images
            totals[replica, "mmh"] += rng.randint(0, images)
            totals[replica, "pq"] += 900 * images
            totals[replica, "ph"] += rng.randint(0, 900 * images)
            model = {"model_name": "qwen3-vl"}
            samples = [
                ["vllm:num_requests_waiting", model, float(rng.randint(0, 6))],
                ["vllm:num_requests_running", model, float(rng.randint(1, 8))],
                ["vllm:kv_cache_usage_perc", model, rng.random()],
                ["vllm:mm_cache_queries_total", model, totals[replica, "mmq"]],
                ["vllm:mm_cache_hits_total", model, totals[replica, "mmh"]],
                ["vllm:prefix_cache_queries_total", model, totals[replica, "pq"]],
                ["vllm:prefix_cache_hits_total", model, totals[replica, "ph"]],
            ]
            lines.append(json.dumps({"unix": unix, "source": f"replica {replica}", "ok": True, "error": None,
                                     "samples": samples}))  # fmt: skip
    lines.append(json.dumps({"unix": CLOCK_START + seconds + 1, "source": f"replica {REPLICAS[0]}", "ok": False,
                             "error": "connection refused", "samples": []}))  # fmt: skip
    return lines


def write_run_folder(
    folder: Path,
    *,
    seed: int = 7,
    rate: float | None = 15.0,
    stream_share: float = 0.6,
    scrapes: bool = True,
    run_json: dict[str, object] | None = None,
) -> Path:
    """Writes a run folder as `qvl loadtest` leaves it: ~300 requests over ~20 s and everything beside them."""
    rng = random.Random(seed)
    folder.mkdir()
    records = make_records(rng, 300, rate or 15.0, stream_share, open_loop=rate is not None)
    (folder / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
    summary = summarise(records, clock_start_unix=CLOCK_START)
    (folder / "records.summary.json").write_text(summary.to_json())
    if scrapes:
        (folder / "metrics.jsonl").write_text("\n".join(scrape_lines(rng, 22)) + "\n")
    meta: dict[str, object] = {
        "workload": "storefront",
        "target": "http://127.0.0.1:8000",
        "rate": rate,
        "duration_s": 20,
        "users": 16,
        "processes": 1,
        "slo": SLO,
        "max_send_lag_ms": 10.0,
        "started_unix": CLOCK_START,
        "ended_unix": CLOCK_START + 21,
        "predicted": {"answer_cache_hit_ratio": 0.25, "engine_image_cache_hit_ratio": 0.4},
    }
    meta.update(run_json or {})
    (folder / "run.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def write_run(tmp_path: Path) -> WriteRun:
    """`write_run_folder` under this test's tmp_path: write_run("name", rate=..., ...)."""

    def write(name: str = "run", **options: Any) -> Path:
        return write_run_folder(tmp_path / name, **options)

    return write


@pytest.fixture(scope="module")
def one_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report]:
    """The default run and its report, made once: drawing the plots is most of this module's time."""
    base = tmp_path_factory.mktemp("one-run")
    run = write_run_folder(base / "run")
    return run, write_report([run], base / "report")


def read_records(folder: Path) -> list[Record]:
    return [Record.from_json(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def summary_of(folder: Path) -> RunSummary:
    """The run's summary computed here from the same files, independently of the report."""
    process = Summary(**json.loads((folder / "records.summary.json").read_text()))
    return summarise_run(read_records(folder), [process], parse_slo(SLO), 10.0)


def table_rows(markdown: str, title: str) -> list[list[str]]:
    """The body rows of the Markdown table under **title**, as cells."""
    block = markdown.split(f"**{title}**\n", 1)[1].strip().split("\n\n", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")][2:]
    # Cells split on " | " (an escaped pipe is "\\|"), then Markdown's backslash escapes undone.
    return [[re.sub(r"\\(.)", r"\1", cell.strip()) for cell in line.strip("|").split(" | ")] for line in lines]


def row(markdown: str, title: str, first: str) -> list[str]:
    matches = [r for r in table_rows(markdown, title) if r[0] == first]
    assert len(matches) == 1, f"{first!r} in {title!r}: {matches}"
    return matches[0]


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def check_plots(report: Report, out: Path) -> None:
    html = report.html.read_text()
    markdown = report.markdown.read_text()
    assert report.plots, "no plot was drawn"
    for plot in report.plots:
        data = plot.read_bytes()
        assert plot.parent == out / "plots" and len(data) > 1000 and data.startswith(PNG_MAGIC), plot
        assert f"data:image/png;base64,{base64.b64encode(data).decode()}" in html, plot.name
        assert f"](plots/{plot.name})" in markdown, plot.name
    assert sorted(report.plots) == sorted((out / "plots").glob("*.png"))
    lowered = html.lower()
    assert "<script" not in lowered and "javascript:" not in lowered
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", lowered), "the page references something external"
    assert "url(" not in lowered and "@import" not in lowered


def test_one_run_renders_every_plot_and_embeds_it(one_run: tuple[Path, Report]) -> None:
    run, report = one_run
    out = run.parent / "report"
    assert report.markdown == out / "report.md" and report.html == out / "report.html"
    assert {p.stem for p in report.plots} == ONE_RUN_PLOTS and report.skipped == []
    check_plots(report, out)


def test_tables_match_summarise_run_of_the_same_records(one_run: tuple[Path, Report]) -> None:
    run, report = one_run
    markdown = report.markdown.read_text()
    expected = summary_of(run)
    records = read_records(run)
    assert expected.errors > 0 and expected.ttft_ms.count > 0, "the fixture should have errors and streams"

    assert row(markdown, "Headline", "requests")[1] == str(expected.requests)
    assert row(markdown, "Headline", "answered without error")[1] == str(expected.ok)
    errors = row(markdown, "Headline", "errors")[1]
    assert errors.startswith(f"{expected.errors} ({100 * expected.error_ratio:.1f}%)")
    for kind, count in expected.errors_by_type.items():
        assert f"{kind}: {count}" in errors
    assert row(markdown, "Headline", "throughput (req/s)")[1] == fmt(expected.throughput_rps, 2)
    assert row(markdown, "Headline", "goodput (req/s, met every SLO)")[1] == fmt(expected.goodput_rps, 2)
    assert row(markdown, "Headline", "send lag P99 (ms)")[1].startswith(fmt(expected.send_lag_p99_ms))
    assert row(markdown, "Headline", "valid (the generator kept to its schedule)")[1] == (
        "yes" if expected.valid else "NO"
    )
    for name, p in (
        ("TTFT", expected.ttft_ms),
        ("ITL (mean gap per request)", expected.itl_ms),
        ("E2E", expected.e2e_ms),
    ):
        assert row(markdown, "Latency (ms)", name)[1:] == [str(p.count), fmt(p.p50), fmt(p.p90), fmt(p.p99)]
    for check in expected.slo:
        cells = row(markdown, "SLO checks", check.objective)
        assert cells[3] == ("yes" if check.held else "NO")
        if not check.objective.startswith("errors"):
            assert cells[1:3] == [f"{fmt(check.measured)} ms", f"{fmt(check.bound)} ms"]

    for bucket in ("listing", "thumb"):
        group = [r for r in records if r.image_buckets == [bucket]]
        ok = [r for r in group if r.error_type is None]
        ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        e2e = [r.e2e_ms for r in ok]
        cells = row(markdown, "By image bucket (ms)", bucket)
        assert cells[1:3] == [str(len(group)), str(len(group) - len(ok))]
        assert cells[3:] == [
            fmt(percentile(ttft, 50)),
            fmt(percentile(ttft, 99)),
            fmt(percentile(e2e, 50)),
            fmt(percentile(e2e, 99)),
        ]
    for tenant, count in Counter(r.tenant for r in records).items():
        assert row(markdown, "By tenant", tenant)[1] == str(count)
    for replica, count in expected.replicas.items():
        assert row(markdown, "By replica", replica)[1] == str(count)

    headed = [r for r in records if r.cache is not None]
    answer = sum(r.cache in ("hit", "coalesced") for r in headed) / len(headed)
    assert row(markdown, "Cache hit ratios", "answer cache")[1:4] == [
        "25.0%",
        f"{100 * answer:.1f}%",
        f"{100 * (answer - 0.25):+.1f}",
    ]
    hits, queries = engine_totals(run)
    engine = row(markdown, "Cache hit ratios", "engine image cache")
    assert engine[1:4] == ["40.0%", f"{100 * hits / queries:.1f}%", f"{100 * (hits / queries - 0.4):+.1f}"]


def engine_totals(run: Path) -> tuple[float, float]:
    """Image-cache hits and queries through the run from metrics.jsonl: last minus first page, per replica."""
    pages = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    hits = queries = 0.0
    for replica in REPLICAS:
        mine = [p for p in pages if p["source"] == f"replica {replica}" and p["ok"]]
        first, last = ({n: v for n, _, v in p["samples"]} for p in (mine[0], mine[-1]))
        hits += last["vllm:mm_cache_hits_total"] - first["vllm:mm_cache_hits_total"]
        queries += last["vllm:mm_cache_queries_total"] - first["vllm:mm_cache_queries_total"]
    return hits, queries


def test_two_runs_side_by_side_compare_and_sweep(write_run: WriteRun, tmp_path: Path) -> None:
    slow = write_run("slow", seed=1, rate=10.0, run_json={"policy": "least-loaded"})
    fast = write_run("fast", seed=2, rate=20.0, run_json={"label": "fast <20/s> & co", "policy": "image-affinity"})
    out = tmp_path / "report"
    report = write_report([slow, fast], out)
    check_plots(report, out)
    names = {p.stem for p in report.plots}
    assert {"compare_ttft_cdf", "compare_sweep"} <= names
    assert {f"run{i}_{plot}" for i in (1, 2) for plot in ONE_RUN_PLOTS} <= names
    markdown = report.markdown.read_text()
    for folder, label, rate in ((slow, "slow", 10.0), (fast, "fast <20/s> & co", 20.0)):
        expected = summary_of(folder)
        cells = row(markdown, "Runs side by side", label)
        assert cells[1:5] == [
            fmt(rate, 2),
            "least-loaded" if label == "slow" else "image-affinity",
            str(expected.requests),
            fmt(expected.throughput_rps, 2),
        ]
        assert cells[6:10] == [
            fmt(expected.ttft_ms.p50),
            fmt(expected.ttft_ms.p99),
            fmt(expected.e2e_ms.p50),
            fmt(expected.e2e_ms.p99),
        ]
    # Markdown escapes the label's < and > (raw HTML to a Markdown viewer), the HTML page escapes it as HTML.
    assert r"fast \<20/s\> & co" in markdown and "fast <20/s>" not in markdown
    html = report.html.read_text()
    assert "fast &lt;20/s&gt; &amp; co" in html and "fast <20/s>" not in html


def test_same_rate_runs_have_no_sweep(write_run: WriteRun, tmp_path: Path) -> None:
    runs = [write_run("a", seed=1), write_run("b", seed=2)]
    report = write_report(runs, tmp_path / "report")
    assert "compare_ttft_cdf" in {p.stem for p in report.plots}
    assert "compare_sweep" not in {p.stem for p in report.plots}


def test_plots_without_data_are_skipped_with_a_note(write_run: WriteRun, tmp_path: Path) -> None:
    run = write_run(rate=None, stream_share=0.0, scrapes=False)
    out = tmp_path / "report"
    report = write_report([run], out)
    check_plots(report, out)
    drawn = {p.stem for p in report.plots}
    assert drawn == ONE_RUN_PLOTS - {"ttft", "send_lag", "engine_queue"}
    assert not (out / "plots" / "ttft.png").exists()
    markdown, html = report.markdown.read_text(), report.html.read_text()
    for note in (
        "TTFT distribution: not drawn: no streamed request was answered",
        "Send lag: not drawn: no planned send times",
        "Engine queue per replica: not drawn: no replica /metrics page",
    ):
        assert note in markdown and note in html
        assert any(s.startswith(note.replace(": not drawn", "")) for s in report.skipped)


def test_a_run_where_every_request_failed(write_run: WriteRun, tmp_path: Path) -> None:
    run = write_run()
    failed = [
        replace(r, status=503, error_type="overloaded", ttft_ms=None, itl=None, replica=None, cache=None)
        for r in read_records(run)
    ]
    (run / "records.jsonl").write_text("".join(r.to_json() + "\n" for r in failed))
    out = tmp_path / "report"
    report = write_report([run], out)
    check_plots(report, out)
    assert {p.stem for p in report.plots} == {"throughput", "send_lag", "replicas", "engine_queue"}
    markdown = report.markdown.read_text()
    assert row(markdown, "Headline", "answered without error")[1] == "0"
    assert "SLO MISSED: no request was answered" in markdown


def test_a_folder_written_by_locust_alone(write_run: WriteRun, tmp_path: Path) -> None:
    run = write_run("locust-only", scrapes=False)
    (run / "run.json").unlink()
    (run / "records.summary.json").unlink()
    report = write_report([run], tmp_path / "report")
    markdown = report.markdown.read_text()
    assert markdown.startswith("# Load-test report: locust-only")
    assert row(markdown, "Headline", "goodput (req/s, met every SLO)")[1] == "no SLO given"
    assert "Cache hit ratios" in markdown and "How it was run" not in markdown


def test_a_folder_without_records_is_refused_by_name(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(RunFolderError, match=re.escape(str(empty))):
        write_report([empty], tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_a_bad_slo_in_run_json_is_refused_naming_the_file(write_run: WriteRun, tmp_path: Path) -> None:
    run = write_run(run_json={"slo": "ttft_p99<=fast"})
    with pytest.raises(RunFolderError, match=re.escape(str(run / "run.json"))):
        write_report([run], tmp_path / "report")
