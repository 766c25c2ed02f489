"""The load-test report of one run or several side by side: Markdown and a self-contained HTML page.

Everything is derived from the run folders' raw data (STYLE.md): the records are summarised again with
`summarise_run` and the SLO of run.json, not read from summary.json, and the cache ratios come from the
records' headers and the scraped counters. A prediction is shown beside its measured error.

    out/report.md     tables, and links to the plots
    out/report.html   the same, with the plots embedded as data URIs: one file to mail or attach
    out/plots/*.png   one figure each (loadtests/plots.py)

The page is built once as a list of blocks (headings, text, tables, images) and rendered twice, so the
Markdown and the HTML cannot disagree.
"""

from __future__ import annotations

import base64
import html
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests import plots
from loadtests.records import DEFAULT_MAX_SEND_LAG_MS, Record, percentile
from loadtests.runfolder import RUN, RunFolder, RunFolderError, Scrape
from loadtests.slo import Objective, SloError, parse_slo
from loadtests.summary import RunSummary, summarise_run

MARKDOWN = "report.md"
HTML = "report.html"
PLOTS = "plots"
ANSWER_HITS = ("hit", "coalesced")
_MD_SPECIAL = re.compile(r"[\\`*\[\]<>]")
_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}caption{text-align:left;font-weight:bold;
padding:.3em 0}img{max-width:100%}figure{margin:1em 0}.note{color:#666;font-style:italic}"""


@dataclass(frozen=True)
class Report:
    """What `write_report` wrote: the Markdown and HTML pages, the PNGs, and the plots left out (with why)."""

    markdown: Path
    html: Path
    plots: list[Path]
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoadedRun:
    """One run folder read back and summarised again from its records."""

    label: str
    path: Path
    meta: dict[str, Any]
    records: list[Record]
    scrapes: list[Scrape]
    objectives: tuple[Objective, ...]
    max_send_lag_ms: float
    summary: RunSummary
    rate: float | None
    """The offered rate (requests/s) from run.json; None for a closed loop or a folder without run.json."""
    policy: str | None
    notes: list[str]
    """What the reader should know about how the folder was read (shown under the run's heading)."""


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Text:
    text: str
    note: bool = False


@dataclass(frozen=True)
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass(frozen=True)
class Image:
    path: Path
    title: str


Block = Heading | Text | Table | Image


def load_run(path: Path) -> LoadedRun:
    """A run folder read and summarised; raises RunFolderError naming the file when it is not a readable run."""
    folder = RunFolder(path)
    records = folder.records()
    meta = folder.meta()
    processes = folder.process_summaries()
    slo = meta.get("slo")
    if slo is not None and not isinstance(slo, str):
        raise RunFolderError(f"{folder.file(RUN)}: slo is {slo!r}, not an SLO string")
    try:
        objectives = parse_slo(slo) if slo else ()
    except SloError as exc:
        raise RunFolderError(f"{folder.file(RUN)}: {exc}") from None
    bound = _number(folder, meta, "max_send_lag_ms")
    if bound is None:
        bound = processes[0].max_send_lag_ms if processes else DEFAULT_MAX_SEND_LAG_MS
    summary = summarise_run(records, processes, objectives, bound)
    label = str(meta.get("label") or path.resolve().name)
    policy = None if meta.get("policy") is None else str(meta["policy"])
    rate = _number(folder, meta, "rate")
    scrapes, notes = folder.scrapes(), []
    if scrapes and folder.clock_start_unix() is None:
        # No process summary tells when the records' clock started: count from the first scrape, which the
        # scraper reads as the run starts, so that the time axes roughly agree; the report says so.
        first = min(s.t_s for s in scrapes)
        scrapes = [replace(s, t_s=s.t_s - first) for s in scrapes]
        notes.append("No records summary gives the run clock's start: scrape times count from the first scrape.")
    return LoadedRun(label, path, meta, records, scrapes, objectives, bound, summary, rate, policy, notes)


def write_report(runs: Sequence[Path], out: Path) -> Report:
    """Write out/report.md, out/report.html and out/plots/*.png for one run or several compared.

    Raises RunFolderError for a folder that is not a readable run (before anything is written).
    """
    if not runs:
        raise RunFolderError("no run folder given")
    loaded = [load_run(path) for path in runs]
    (out / PLOTS).mkdir(parents=True, exist_ok=True)
    page = _Page(out)
    title = f"Load-test report: {loaded[0].label}" if len(loaded) == 1 else f"Load-test report: {len(loaded)} runs"
    page.blocks.append(Heading(1, title))
    if len(loaded) > 1:
        page.comparison(loaded)
    for number, run in enumerate(loaded, 1):
        page.run(run, prefix="" if len(loaded) == 1 else f"run{number}_")
    markdown, page_html = out / MARKDOWN, out / HTML
    markdown.write_text(_markdown(page.blocks, out))
    page_html.write_text(_html(page.blocks, title))
    return Report(markdown, page_html, page.plots, page.skipped)


class _Page:
    """The blocks of the report as they are built, and the plots drawn or left out on the way."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.blocks: list[Block] = []
        self.plots: list[Path] = []
        self.skipped: list[str] = []

    def plot(self, title: str, name: str, draw: Callable[[Path], Path]) -> None:
        try:
            path = draw(self.out / PLOTS / f"{name}.png")
        except plots.NoData as exc:
            self.blocks.append(Text(f"{title}: not drawn: {exc}.", note=True))
            self.skipped.append(f"{title}: {exc}")
            return
        self.blocks.append(Image(path, title))
        self.plots.append(path)

    def comparison(self, runs: Sequence[LoadedRun]) -> None:
        self.blocks += [Heading(2, "Runs compared"), comparison_table(runs)]
        self.plot(
            "TTFT CDF by run",
            "compare_ttft_cdf",
            lambda p: plots.ttft_cdf_overlay([(r.label, r.records) for r in runs], p),
        )
        points = [
            plots.SweepPoint(r.label, r.policy or "runs", rate, r.summary) for r in runs if (rate := r.rate) is not None
        ]
        if len({p.rate for p in points}) > 1:
            self.plot(
                "Sweep: latency and throughput against offered rate", "compare_sweep", lambda p: plots.sweep(points, p)
            )

    def run(self, run: LoadedRun, prefix: str) -> None:
        records, summary, scrapes = run.records, run.summary, run.scrapes
        window = plots.window_s(summary.duration_s)
        self.blocks += [Heading(2, f"Run {run.label}"), Text(f"Folder: {run.path}"), Text(summary.verdict())]
        self.blocks += [Text(note, note=True) for note in run.notes]
        self.blocks += [t for t in (setup_table(run), headline_table(summary), latency_table(summary)) if t]
        self.blocks += [slo_table(summary)] if summary.slo else []
        self.blocks += [cache_table(run), bucket_table(records), group_table("By tenant", "tenant", records)]
        self.blocks.append(replica_table(run))
        drawings: list[tuple[str, str, Callable[[Path], Path]]] = [
            ("Latency over time", "latency_time", lambda p: plots.latency_over_time(records, window, p)),
            ("Latency by image bucket", "latency_bucket", lambda p: plots.latency_by_bucket(records, p)),
            ("TTFT distribution", "ttft", lambda p: plots.ttft_distribution(records, p)),
            ("Throughput and goodput", "throughput",
             lambda p: plots.throughput_over_time(records, run.objectives, run.rate, window, p)),
            ("Send lag", "send_lag", lambda p: plots.send_lag(records, run.max_send_lag_ms, p)),
            ("Replicas: load and cache results", "replicas", lambda p: plots.replicas(records, scrapes, window, p)),
            ("Engine queue per replica", "engine_queue", lambda p: plots.engine_queue(scrapes, p)),
        ]  # fmt: skip
        for title, name, draw in drawings:
            self.plot(title, prefix + name, draw)


def comparison_table(runs: Sequence[LoadedRun]) -> Table:
    """One row per run: rate, policy, throughput, goodput, TTFT/E2E P50/P99, error ratio, validity, SLO."""
    policies = any(r.policy for r in runs)
    header = ["run", "offered rate (req/s)", *(["policy"] if policies else []), "requests", "throughput (req/s)"]
    header += ["goodput (req/s)", "TTFT P50 (ms)", "TTFT P99 (ms)", "E2E P50 (ms)", "E2E P99 (ms)", "errors", "valid"]
    rows = []
    for run in runs:
        s = run.summary
        row = [run.label, _num(run.rate, 2), *([run.policy or ""] if policies else []), str(s.requests)]
        row += [_num(s.throughput_rps, 2), _num(s.goodput_rps, 2), _num(s.ttft_ms.p50), _num(s.ttft_ms.p99)]
        row += [_num(s.e2e_ms.p50), _num(s.e2e_ms.p99), _pct(s.error_ratio), _yes(s.valid)]
        rows.append([*row, "no SLO" if s.slo_held is None else _yes(s.slo_held)])
    return Table("Runs side by side", [*header, "SLO held"], rows)


def setup_table(run: LoadedRun) -> Table | None:
    """How the run was made, from run.json (None for a folder written by locust alone)."""
    rows = []
    keys = ("workload", "target", "rate", "duration_s", "planned_requests", "users", "processes", "policy", "slo")
    for key in (*keys, "max_send_lag_ms"):
        if run.meta.get(key) is not None:
            rows.append([key, str(run.meta[key])])
    for key in ("started_unix", "ended_unix"):
        if isinstance(run.meta.get(key), int | float):
            rows.append(
                [key.removesuffix("_unix"), datetime.fromtimestamp(run.meta[key], UTC).isoformat(" ", "seconds")]
            )
    return Table("How it was run (run.json)", ["setting", "value"], rows) if rows else None


def headline_table(s: RunSummary) -> Table:
    """Requests, errors by type, duration, throughput, goodput and the generator's send lag."""
    errors = ", ".join(f"{kind}: {count}" for kind, count in sorted(s.errors_by_type.items()))
    rows = [
        ["requests", str(s.requests)],
        ["answered without error", str(s.ok)],
        ["errors", f"{s.errors} ({_pct(s.error_ratio)})" + (f": {errors}" if errors else "")],
        ["duration (s, first send to last answer)", _num(s.duration_s, 2)],
        ["throughput (req/s)", _num(s.throughput_rps, 2)],
        ["goodput (req/s, met every SLO)", "no SLO given" if s.goodput_rps is None else _num(s.goodput_rps, 2)],
        ["send lag P99 (ms)", f"{_num(s.send_lag_p99_ms)} (bound {s.max_send_lag_ms:g})"],
        ["valid (the generator kept to its schedule)", _yes(s.valid)],
    ]
    return Table("Headline", ["", "value"], rows)


def latency_table(s: RunSummary) -> Table:
    """TTFT, inter-token latency and end-to-end percentiles over the requests answered without error."""
    rows = [
        [name, str(p.count), _num(p.p50), _num(p.p90), _num(p.p99)]
        for name, p in (("TTFT", s.ttft_ms), ("ITL (mean gap per request)", s.itl_ms), ("E2E", s.e2e_ms))
    ]
    return Table("Latency (ms)", ["", "requests", "P50", "P90", "P99"], rows, "TTFT and ITL: streamed requests only.")


def slo_table(s: RunSummary) -> Table:
    """Each objective: measured against its bound."""
    rows = [[c.objective, _bound(c.objective, c.measured), _bound(c.objective, c.bound), _yes(c.held)] for c in s.slo]
    return Table("SLO checks", ["objective", "measured", "bound", "held"], rows)


def cache_table(run: LoadedRun) -> Table:
    """Predicted and measured answer-cache and engine image-cache hit ratios, with the error in points."""
    predicted = run.meta.get("predicted")
    predicted = predicted if isinstance(predicted, dict) else {}
    headed = [r for r in run.records if r.cache is not None]
    answer = sum(r.cache in ANSWER_HITS for r in headed) / len(headed) if headed else None
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(r.cache for r in headed).items()))
    pages = plots.replica_scrapes(run.scrapes)

    def engine(cache: str) -> float | None:
        return plots.engine_hit_ratio([p for replica in pages.values() for p in replica], cache)

    rows = [
        _ratio_row("answer cache", predicted.get("answer_cache_hit_ratio"), answer, f"x-qvl-cache: {counts or 'none'}"),
        _ratio_row("engine image cache", predicted.get("engine_image_cache_hit_ratio"), engine("mm")),
        _ratio_row("engine prefix cache (tokens)", None, engine("prefix")),
    ]
    note = (
        "Answer cache: requests answered with x-qvl-cache hit or coalesced, over the requests that carried the"
        " header (bypass and none included, as the prediction counts every request). Engine caches: the increase"
        " of the hits counter over that of the queries counter through the run (vllm:mm_cache_hits_total and"
        " vllm:mm_cache_queries_total; prefix: in tokens), summed over the scraped replicas. The image-cache"
        " prediction counts from empty caches over the run's replicas and routing policy (run.json), as if every"
        " request reached an engine: answer-cache hits never do, so with greedy tasks the engines see fewer"
        " repeats than predicted. Error: measured minus predicted, in percentage points."
    )
    return Table("Cache hit ratios", ["cache", "predicted", "measured", "error (points)", "counts"], rows, note)


def bucket_table(records: Sequence[Record]) -> Table:
    """Requests, errors and TTFT/E2E P50/P99 per image bucket (latencies over answers without error)."""
    by_bucket = _group(records, plots.bucket_of)
    rows = []
    for bucket, group in by_bucket.items():
        ok = [r for r in group if r.error_type is None]
        ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        e2e = [r.e2e_ms for r in ok]
        rows.append([bucket, str(len(group)), str(len(group) - len(ok)), *_p50_p99(ttft), *_p50_p99(e2e)])
    header = ["image bucket", "requests", "errors", "TTFT P50", "TTFT P99", "E2E P50", "E2E P99"]
    return Table(
        "By image bucket (ms)", header, rows, "A request with several images counts under their buckets joined by +."
    )


def group_table(title: str, attribute: str, records: Sequence[Record]) -> Table:
    """Requests, errors and E2E P50/P99 per value of a record attribute (tenant, replica)."""
    rows = []
    for key, group in _group(records, lambda r: _or_none(getattr(r, attribute))).items():
        e2e = [r.e2e_ms for r in group if r.error_type is None]
        errors = sum(r.error_type is not None for r in group)
        rows.append([key, str(len(group)), _pct(len(group) / len(records)), str(errors), *_p50_p99(e2e)])
    return Table(title, [attribute, "requests", "share", "errors", "E2E P50 (ms)", "E2E P99 (ms)"], rows)


def replica_table(run: LoadedRun) -> Table:
    """Per replica (x-qvl-replica): the group table plus its engine image-cache hit ratio from the scrapes."""
    table = group_table("By replica", "replica", run.records)
    pages = plots.replica_scrapes(run.scrapes)
    rows = [[*row, _pct(plots.engine_hit_ratio(pages.get(row[0], []), "mm"))] for row in table.rows]
    note = "replica (none): no x-qvl-replica header (no answer, or an answer from the cache)."
    return Table(table.title, [*table.header, "engine image-cache hit ratio"], rows, note)


def _ratio_row(name: str, predicted: object, measured: float | None, counts: str = "") -> list[str]:
    expected = float(predicted) if isinstance(predicted, int | float) else None
    error = None if expected is None or measured is None else 100 * (measured - expected)
    return [name, _pct(expected), _pct(measured), "n/a" if error is None else f"{error:+.1f}", counts]


def _group(records: Sequence[Record], key: Callable[[Record], str]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return dict(sorted(groups.items()))


def _number(folder: RunFolder, meta: dict[str, Any], key: str) -> float | None:
    """A number of run.json, or None when absent; a value of another type is a damaged file."""
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RunFolderError(f"{folder.file(RUN)}: {key} is {value!r}, not a number")
    return float(value)


def _or_none(value: object) -> str:
    return "(none)" if value is None else str(value)


def _p50_p99(values: Sequence[float]) -> list[str]:
    return [_num(percentile(values, 50)), _num(percentile(values, 99))]


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


def _bound(objective: str, value: float | None) -> str:
    """A check's value in the bound's unit: a ratio for errors, milliseconds for latencies."""
    return _pct(value) if objective.startswith("errors") else f"{_num(value)} ms"


def _markdown(blocks: Sequence[Block], out: Path) -> str:
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines.append(f"{'#' * block.level} {_md(block.text)}")
        elif isinstance(block, Text):
            lines.append(f"*{_md(block.text)}*" if block.note else _md(block.text))
        elif isinstance(block, Table):
            lines.append(f"**{_md(block.title)}**\n")
            lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
            lines.append("|" + "|".join("---" for _ in block.header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            if block.note:
                lines.append(f"\n*{_md(block.note)}*")
        else:
            lines.append(f"![{_md(block.title)}]({block.path.relative_to(out).as_posix()})")
        lines.append("")
    return "\n".join(lines)


def _md(text: str) -> str:
    """Text from the data as Markdown shows it literally: run labels, folder names, error types, tenants.
    Underscores are left alone (inside a word CommonMark does not read them as emphasis) so that names such
    as max_send_lag_ms stay readable in the raw file."""
    return _MD_SPECIAL.sub(r"\\\g<0>", text).replace("\n", " ")


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|")


def _html(blocks: Sequence[Block], title: str) -> str:
    esc = html.escape
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>']
    parts.append(f"<style>{_CSS}</style></head><body>")
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f'<p class="note">{esc(block.text)}</p>' if block.note else f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><caption>{esc(block.title)}</caption><thead><tr>{head}</tr></thead>")
            parts.append(f"<tbody>{body}</tbody></table>")
            if block.note:
                parts.append(f'<p class="note">{esc(block.note)}</p>')
        else:
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{esc(block.title)}" src="data:image/png;base64,{data}">')
            parts.append(f"<figcaption>{esc(block.title)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
