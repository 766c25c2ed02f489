"""The load-test report's figures: each a function of a run's loaded data that writes one PNG and returns its path.

A figure with nothing to show raises `NoData` with the reason, which the report prints in its place: an
empty or half-drawn PNG would read as a measurement. Figures are drawn on `matplotlib.figure.Figure`
(the Agg canvas) without pyplot: no global figure registry, nothing to close, nothing shared between
reports made in one process.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from loadtests.records import Record, percentile
from loadtests.runfolder import Scrape
from loadtests.slo import Objective, meets
from loadtests.summary import RunSummary

NO_IMAGE = "(no image)"
MM_HITS = "vllm:mm_cache_hits_total"
MM_QUERIES = "vllm:mm_cache_queries_total"
WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = "vllm:kv_cache_usage_perc"
_NICE_WINDOWS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)


class NoData(Exception):
    """A figure that has nothing to draw; the message says why, for the report to print instead."""


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep: its offered rate, the series it belongs to (a policy, or one series), its summary."""

    label: str
    series: str
    rate: float
    summary: RunSummary


def window_s(span_s: float) -> float:
    """A time-series window: about a 40th of the run, rounded up to a round number of seconds (at least 1 s)."""
    target = max(span_s / 40, 1.0)
    return float(next((w for w in _NICE_WINDOWS_S if w >= target), math.ceil(target / 3600) * 3600))


def bucket_of(record: Record) -> str:
    """The image-bucket key of a request: its buckets' names joined with "+", or "(no image)"."""
    return "+".join(sorted(set(record.image_buckets))) or NO_IMAGE


def increase(values: Sequence[float]) -> float:
    """A counter's increase over successive readings; a drop is a restart counted from zero, as in Prometheus."""
    return sum(b - a if b >= a else b for a, b in pairwise(values))


def replica_scrapes(scrapes: Iterable[Scrape]) -> dict[str, list[Scrape]]:
    """The replicas' readable pages by replica name (the scrape source without "replica "), in time order."""
    by_replica: dict[str, list[Scrape]] = defaultdict(list)
    for scrape in scrapes:
        if scrape.ok and scrape.source.startswith("replica "):
            by_replica[scrape.source.removeprefix("replica ")].append(scrape)
    return {name: sorted(pages, key=lambda s: s.t_s) for name, pages in sorted(by_replica.items())}


def counter_increase(pages: Sequence[Scrape], name: str) -> float | None:
    """The increase of counter `name` over one source's pages; None when fewer than two pages carry it."""
    values = [v for v in (p.value(name) for p in pages) if v is not None]
    return increase(values) if len(values) >= 2 else None


def engine_hit_ratio(scrapes: Sequence[Scrape], cache: str) -> float | None:
    """Hits over queries of an engine cache ("mm": images, "prefix": tokens) through the run, summed over the
    replicas' pages among `scrapes`; None when no replica's counters were read twice or nothing was queried."""
    hits = queries = 0.0
    for pages in replica_scrapes(scrapes).values():
        h = counter_increase(pages, f"vllm:{cache}_cache_hits_total")
        q = counter_increase(pages, f"vllm:{cache}_cache_queries_total")
        if h is not None and q is not None:
            hits, queries = hits + h, queries + q
    return hits / queries if queries else None


def latency_over_time(records: Sequence[Record], window: float, out: Path) -> Path:
    """TTFT (when streamed) and end-to-end P50/P99 of the requests sent in each window, answered without error."""
    ok = [r for r in records if r.error_type is None]
    if not ok:
        raise NoData("no request was answered without error")
    ttft = [(r.sent_s, r.ttft_ms) for r in ok if r.ttft_ms is not None]
    panels = [
        (t, points) for t, points in (("TTFT", ttft), ("End-to-end", [(r.sent_s, r.e2e_ms) for r in ok])) if points
    ]
    figure = _figure(len(panels))
    for axes, (title, points) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        windows = _windows(points, window)
        for q, style in ((50, "o-"), (99, "s--")):
            axes.plot(
                [t for t, _ in windows], [percentile(vs, q) for _, vs in windows], style, markersize=3, label=f"P{q}"
            )
        _decorate(axes, f"{title} latency by send time ({window:g} s windows)", "run time (s)", "ms")
    return _save(figure, out)


def latency_by_bucket(records: Sequence[Record], out: Path) -> Path:
    """TTFT and end-to-end P50/P99 per image bucket, as grouped bars with each bucket's request count."""
    by_bucket: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        if record.error_type is None:
            by_bucket[bucket_of(record)].append(record)
    if not by_bucket:
        raise NoData("no request was answered without error")
    names = sorted(by_bucket)
    # No TTFT panel without a streamed answer, and no bar for a bucket without one: a zero would read as fast.
    panels = [
        (t, f) for t, f in (("TTFT", "ttft"), ("End-to-end", "e2e")) if any(_values(by_bucket[n], f) for n in names)
    ]
    figure = _figure(len(panels))
    for axes, (title, field) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for offset, q in ((-0.2, 50), (0.2, 99)):
            heights = [percentile(_values(by_bucket[n], field), q) for n in names]
            axes.bar(
                [i + offset for i in range(len(names))],
                [math.nan if h is None else h for h in heights],
                0.4,
                label=f"P{q}",
            )
        axes.set_xticks(range(len(names)), [f"{_text(n)}\n(n={len(_values(by_bucket[n], field))})" for n in names])
        _decorate(axes, f"{title} latency by image bucket", "", "ms")
    return _save(figure, out)


def ttft_distribution(records: Sequence[Record], out: Path) -> Path:
    """The TTFT of streamed answers: a histogram and the empirical CDF with P50/P90/P99 marked."""
    ttfts = sorted(r.ttft_ms for r in records if r.error_type is None and r.ttft_ms is not None)
    if not ttfts:
        raise NoData("no streamed request was answered (only a stream has a first token the client sees)")
    figure = _figure(2)
    hist, cdf = figure.subplots(1, 2)
    hist.hist(ttfts, bins=min(50, max(5, len(ttfts) // 5)))
    _decorate(hist, f"TTFT histogram ({len(ttfts)} streamed answers)", "TTFT (ms)", "requests")
    _cdf(cdf, ttfts, "_nolegend_")
    for q, offset in ((50, 0), (90, -12), (99, -24)):
        value = percentile(ttfts, q)
        if value is not None:
            cdf.axvline(value, linestyle=":", color="grey")
            cdf.annotate(f"P{q} {value:.0f} ms", (value, q / 100), (4, offset), textcoords="offset points", fontsize=8)
    _decorate(cdf, "TTFT CDF", "TTFT (ms)", "share of requests")
    return _save(figure, out)


def throughput_over_time(
    records: Sequence[Record], objectives: Sequence[Objective], offered_rps: float | None, window: float, out: Path
) -> Path:
    """Requests sent, answered without error and meeting the SLO (goodput) per second, by window of completion."""
    if not records:
        raise NoData("no request in the run")
    sent = _rates([(r.sent_s, 1.0) for r in records], window)
    done = [(r.sent_s + r.e2e_ms / 1000, r) for r in records]
    figure = _figure(1)
    axes = figure.subplots()
    axes.plot(*zip(*sent, strict=True), ".-", label="sent")
    throughput = _rates([(t, 1.0) for t, r in done if r.error_type is None], window)
    if throughput:
        axes.plot(*zip(*throughput, strict=True), "o-", markersize=3, label="throughput (answered, no error)")
    if objectives:
        goodput = _rates([(t, 1.0) for t, r in done if meets(r, objectives)], window)
        if goodput:
            axes.plot(*zip(*goodput, strict=True), "s--", markersize=3, label="goodput (met the SLO)")
    if offered_rps is not None:
        axes.axhline(offered_rps, color="grey", linestyle=":", label=f"offered {offered_rps:g}/s")
    _decorate(axes, f"Requests per second ({window:g} s windows)", "run time (s)", "requests/s")
    return _save(figure, out)


def send_lag(records: Sequence[Record], bound_ms: float, out: Path) -> Path:
    """The generator's send lag (actual minus planned send time) over time and its distribution, with the bound."""
    points = [(r.sent_s, r.send_lag_ms) for r in records if r.send_lag_ms is not None]
    if not points:
        raise NoData("no planned send times (a closed loop has no schedule to lag behind)")
    figure = _figure(2)
    over_time, distribution = figure.subplots(1, 2)
    over_time.plot([t for t, _ in points], [lag for _, lag in points], ".", markersize=2, label="request")
    over_time.axhline(bound_ms, color="red", linestyle="--", label=f"P99 bound {bound_ms:g} ms")
    _decorate(over_time, "Send lag by send time", "run time (s)", "ms")
    lags = sorted(lag for _, lag in points)
    _cdf(distribution, lags, "send lag")
    distribution.axvline(bound_ms, color="red", linestyle="--", label=f"P99 bound {bound_ms:g} ms")
    distribution.axhline(0.99, color="grey", linestyle=":", label="99%")
    _decorate(distribution, "Send lag CDF", "send lag (ms)", "share of requests")
    return _save(figure, out)


def replicas(records: Sequence[Record], scrapes: Sequence[Scrape], window: float, out: Path) -> Path:
    """Requests per replica over time (x-qvl-replica), x-qvl-cache results, and each replica's engine
    image-cache hit ratio between scrapes; panels without data are left out."""
    load: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for record in records:
        if record.replica is not None:
            load[record.replica].append((record.sent_s, 1.0))
    cache = sorted({r.cache for r in records if r.cache is not None})
    ratios = {name: _hit_ratios(pages) for name, pages in replica_scrapes(scrapes).items()}
    ratios = {name: points for name, points in ratios.items() if points}
    panels = [p for p, present in (("load", load), ("cache", cache), ("ratio", ratios)) if present]
    if not panels:
        raise NoData("no x-qvl-replica or x-qvl-cache header recorded and no replica image-cache counters scraped")
    figure = _figure(len(panels))
    axes_list: list[Axes] = list(figure.subplots(1, len(panels), squeeze=False)[0])
    for axes, panel in zip(axes_list, panels, strict=True):
        if panel == "load":
            for name, points in sorted(load.items()):
                axes.plot(*zip(*_rates(points, window), strict=True), ".-", label=_text(name))
            _decorate(axes, f"Requests per replica ({window:g} s windows)", "run time (s)", "requests/s")
        elif panel == "cache":
            counts = [sum(r.cache == c for r in records) for c in cache]
            axes.bar([_text(c) for c in cache], counts)
            _decorate(axes, "Answer cache (x-qvl-cache)", "", "requests")
        else:
            for name, points in ratios.items():
                axes.plot(*zip(*points, strict=True), "o-", markersize=3, label=_text(name))
            axes.set_ylim(0, 1.05)
            _decorate(axes, "Engine image-cache hit ratio per replica", "run time (s)", "hits / queries")
    return _save(figure, out)


def engine_queue(scrapes: Sequence[Scrape], out: Path) -> Path:
    """Each replica's waiting and running requests (and KV-cache use when scraped) over time, from /metrics."""
    pages = {name: [p for p in ps if p.value(WAITING) is not None] for name, ps in replica_scrapes(scrapes).items()}
    pages = {name: ps for name, ps in pages.items() if ps}
    if not pages:
        raise NoData("no replica /metrics page with vllm:num_requests_waiting was scraped")
    gauges = [(WAITING, "Waiting (engine queue)"), (RUNNING, "Running (in the batch)"), (KV_USAGE, "KV-cache use")]
    gauges = [(n, t) for n, t in gauges if any(p.value(n) is not None for ps in pages.values() for p in ps)]
    figure = _figure(len(gauges))
    for axes, (name, title) in zip(figure.subplots(1, len(gauges), squeeze=False)[0], gauges, strict=True):
        for replica, replica_pages in pages.items():
            points = [(p.t_s, v) for p in replica_pages if (v := p.value(name)) is not None]
            axes.step([t for t, _ in points], [v for _, v in points], where="post", label=_text(replica))
        _decorate(axes, f"{title} per replica", "run time (s)", "fraction" if name == KV_USAGE else "requests")
    return _save(figure, out)


def ttft_cdf_overlay(runs: Sequence[tuple[str, Sequence[Record]]], out: Path) -> Path:
    """The TTFT CDF of each run on one axis (runs without a streamed answer are left out)."""
    figure = _figure(1)
    axes = figure.subplots()
    drawn = 0
    for label, records in runs:
        ttfts = sorted(r.ttft_ms for r in records if r.error_type is None and r.ttft_ms is not None)
        if ttfts:
            _cdf(axes, ttfts, _text(label))
            drawn += 1
    if not drawn:
        raise NoData("no run has a streamed answer")
    _decorate(axes, "TTFT CDF by run", "TTFT (ms)", "share of requests")
    return _save(figure, out)


def sweep(points: Sequence[SweepPoint], out: Path) -> Path:
    """Latency P50/P99 and throughput/goodput against offered rate, one line per series (a policy)."""
    if len({p.rate for p in points}) < 2:
        raise NoData("fewer than two distinct offered rates")
    series: dict[str, list[SweepPoint]] = defaultdict(list)
    for point in sorted(points, key=lambda p: p.rate):
        series[point.series].append(point)
    figure = _figure(3)
    ttft, e2e, rates = figure.subplots(1, 3)
    # One colour per series (policy), one line style per percentile or measure.
    for colour, (name, runs) in enumerate(series.items()):
        prefix, c = (f"{_text(name)} " if len(series) > 1 else ""), f"C{colour}"
        xs = [p.rate for p in runs]
        for axes, attribute in ((ttft, "ttft_ms"), (e2e, "e2e_ms")):
            for q, style in (("p50", "o-"), ("p99", "s--")):
                ys = [getattr(getattr(p.summary, attribute), q) for p in runs]
                axes.plot(xs, [math.nan if y is None else y for y in ys], style, color=c, label=f"{prefix}{q.upper()}")
        rates.plot(xs, [p.summary.throughput_rps for p in runs], "o-", color=c, label=f"{prefix}throughput")
        goodput = [p.summary.goodput_rps for p in runs]
        if any(g is not None for g in goodput):
            rates.plot(xs, [math.nan if g is None else g for g in goodput], "x:", color=c, label=f"{prefix}goodput")
    every = [p.rate for p in points]
    rates.plot([min(every), max(every)], [min(every), max(every)], "-", color="grey", alpha=0.5, label="offered")
    _decorate(ttft, "TTFT against offered rate", "offered requests/s", "ms")
    _decorate(e2e, "End-to-end latency against offered rate", "offered requests/s", "ms")
    _decorate(rates, "Throughput and goodput against offered rate", "offered requests/s", "requests/s")
    return _save(figure, out)


def _values(records: Sequence[Record], field: str) -> list[float]:
    values = (r.ttft_ms if field == "ttft" else r.e2e_ms for r in records)
    return [v for v in values if v is not None]


def _windows(points: Sequence[tuple[float, float]], window: float) -> list[tuple[float, list[float]]]:
    """Values grouped by window of their time, as (window centre, values), windows with values only."""
    groups: dict[int, list[float]] = defaultdict(list)
    for t, value in points:
        groups[math.floor(t / window)].append(value)
    return [((k + 0.5) * window, groups[k]) for k in sorted(groups)]


def _rates(points: Sequence[tuple[float, float]], window: float) -> list[tuple[float, float]]:
    """Per-second rates of events by window, empty windows between the first and last counted as zero."""
    grouped = dict(_windows(points, window))
    if not grouped:
        return []
    first, last = math.floor(min(grouped) / window), math.floor(max(grouped) / window)
    centres = [(k + 0.5) * window for k in range(first, last + 1)]
    return [(c, sum(grouped.get(c, [])) / window) for c in centres]


def _hit_ratios(pages: Sequence[Scrape]) -> list[tuple[float, float]]:
    """(time, hits / queries) of the engine image cache between successive pages that carry both counters."""
    readings = [
        (p.t_s, h, q) for p in pages if (h := p.value(MM_HITS)) is not None and (q := p.value(MM_QUERIES)) is not None
    ]
    points = []
    for (_, h0, q0), (t, h1, q1) in pairwise(readings):
        queries = increase([q0, q1])
        if queries > 0:
            points.append((t, increase([h0, h1]) / queries))
    return points


def _text(label: str) -> str:
    """A label from the data as matplotlib should print it: a pair of "$" would otherwise start mathtext."""
    return label.replace("$", r"\$")


def _cdf(axes: Axes, ordered: Sequence[float], label: str) -> None:
    axes.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=label)
    axes.set_ylim(0, 1.02)


def _figure(panels: int) -> Figure:
    return Figure(figsize=(5.5 * panels, 3.8), layout="constrained")


def _decorate(axes: Axes, title: str, xlabel: str, ylabel: str) -> None:
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    # matplotlib warns on a legend without labelled artists, and the tests turn warnings into errors.
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=8)


def _save(figure: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" metadata: the same records give the same bytes whatever matplotlib wrote them.
    figure.savefig(out, format="png", dpi=100, metadata={"Software": None})
    return out
