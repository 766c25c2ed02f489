"""The folder a load-test run leaves behind, and reading it back. Everything a report shows derives from it.

runs/X/
  workload.yaml          the workload as run (with --rate/--duration applied): it rebuilds the schedule
  run.json               how it was run: target, rate, users, SLO, processes, start and end, predictions
  records.jsonl          one JSON line per request (loadtests/records.py); records.w<i>.jsonl per worker
  records.summary.json   each locust process's own summary (records.w<i>.summary.json per worker)
  metrics.jsonl          the router's and replicas' /metrics, scraped through the run (loadtests/scrape.py)
  summary.json           the run's summary: throughput, goodput, percentiles, SLO checks, validity
  locust_stats.csv ...   locust's own CSV files; locust.log its output
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.records import Record, Summary

WORKLOAD = "workload.yaml"
RUN = "run.json"
RECORDS = "records.jsonl"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOCUST_CSV = "locust"
LOCUST_LOG = "locust.log"


class RunFolderError(ValueError):
    """A folder that is not a readable run (no records, or a damaged file); the message says which file."""


@dataclass(frozen=True)
class Sample:
    """One sample of a scraped page: metric name (with its _total/_sum/_count suffix), labels, value."""

    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True)
class Scrape:
    """One /metrics page read during a run, at `t_s` seconds on the run's clock (records' `sent_s`)."""

    t_s: float
    source: str
    """"router", or "replica <host:port>"."""
    ok: bool
    error: str | None
    samples: list[Sample]

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the samples named `name` whose labels include `labels`; None if there is none."""
        found = [s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items()]
        return sum(found) if found else None


class RunFolder:
    """A run's folder: paths of its files, and loaders that fail with the file's name."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def file(self, name: str) -> Path:
        return self.path / name

    def record_files(self) -> list[Path]:
        """records.jsonl of a single-process run, or every worker's records.w<i>.jsonl."""
        base = self.file(RECORDS)
        workers = sorted(self.path.glob(f"{base.stem}.w*{base.suffix}"), key=lambda p: p.name)
        return ([base] if base.exists() else []) + workers

    def records(self) -> list[Record]:
        """Every request of the run, all processes merged, in schedule order."""
        files = self.record_files()
        if not files:
            raise RunFolderError(f"{self.path}: no {RECORDS} (is this a load-test run folder?)")
        records: list[Record] = []
        for path in files:
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(Record.from_json(line))
                except (ValueError, TypeError) as exc:
                    raise RunFolderError(f"{path}:{number}: not a request record: {exc}") from None
        return sorted(records, key=lambda r: r.index)

    def process_summaries(self) -> list[Summary]:
        """Each locust process's own summary (its verdict on its share of the schedule)."""
        summaries = []
        for records in self.record_files():
            path = records.with_name(f"{records.stem}.summary.json")
            if path.exists():
                summaries.append(Summary(**self._json(path)))
        return summaries

    def clock_start_unix(self) -> float | None:
        """When the run's clock started (the earliest process's), to align scrapes with records."""
        starts = [s.clock_start_unix for s in self.process_summaries() if s.clock_start_unix is not None]
        return min(starts) if starts else None

    def scrapes(self) -> list[Scrape]:
        """The scraped /metrics pages, on the records' clock (empty if the run scraped none)."""
        path = self.file(METRICS)
        if not path.exists():
            return []
        start = self.clock_start_unix()
        scrapes = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            try:
                data = json.loads(line)
                samples = [Sample(n, dict(labels), float(v)) for n, labels, v in data["samples"]]
                t = data["unix"] - start if start is not None else data["unix"]
                scrapes.append(Scrape(t, data["source"], data["ok"], data["error"], samples))
            except (ValueError, KeyError, TypeError) as exc:
                raise RunFolderError(f"{path}:{number}: not a scrape: {exc}") from None
        return scrapes

    def meta(self) -> dict[str, Any]:
        """run.json: how the run was made ({} for a folder written by locust alone)."""
        path = self.file(RUN)
        return self._json(path) if path.exists() else {}

    def summary(self) -> dict[str, Any]:
        """summary.json as written at the end of the run."""
        return self._json(self.file(SUMMARY))

    def _json(self, path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RunFolderError(f"{path}: cannot read: {exc}") from None
        if not isinstance(data, dict):
            raise RunFolderError(f"{path}: expected a JSON object")
        return data
