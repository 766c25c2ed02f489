"""Per-request records of a load-test run (one JSON line each), and the run's summary and verdict.

Raw records come first; every table is derived from them (STYLE.md). A run is valid only if the
generator kept to its schedule: the P99 of the send lag (actual minus intended send time) must stay
within a bound, 10 ms by default, else the latencies measured describe the generator, not the cluster.
No locust import: the locustfile builds records through this module, the tests without servers.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

DEFAULT_MAX_SEND_LAG_MS = 10.0


@dataclass(frozen=True)
class GapSummary:
    """The inter-token gaps of one streamed answer, in milliseconds."""

    count: int
    mean_ms: float | None
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass(frozen=True)
class Record:
    """One request as the client saw it. Times: seconds since the process's run start (intended_s,
    sent_s) or milliseconds (the rest); None where it does not apply (no stream, no answer)."""

    index: int
    tenant: str
    task: str
    image_buckets: list[str]
    stream: bool
    intended_s: float | None
    """Planned send time; None in a closed loop, which has no schedule to keep."""
    sent_s: float
    send_lag_ms: float | None
    status: int | None
    """HTTP status; None when no response came (connection refused, reset, timeout)."""
    error_type: str | None
    ttft_ms: float | None
    itl: GapSummary | None
    e2e_ms: float
    prompt_tokens: int | None
    image_tokens: int
    """Image tokens of the request's images by Qwen3-VL's rules (the client knows the sizes it sent)."""
    output_tokens: int | None
    replica: str | None
    cache: str | None
    worker: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Record:
        """A record back from its JSON line (`to_json`); raises ValueError or TypeError on a foreign line."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("a record is a JSON object")
        itl = data.pop("itl", None)
        return cls(**data, itl=None if itl is None else GapSummary(**itl))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between order statistics; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise_gaps(gaps_s: Sequence[float]) -> GapSummary:
    """Count, mean, p50, p99 and max of a stream's inter-token gaps (given in seconds), in milliseconds."""
    ms = [g * 1000 for g in gaps_s]
    if not ms:
        return GapSummary(0, None, None, None, None)
    return GapSummary(len(ms), sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 99), max(ms))


def records_path(base: Path, worker: int | None) -> Path:
    """Where one process writes: `base` itself when alone, `runs.w3.jsonl` for worker 3 of a distributed run."""
    if worker is None:
        return base
    return base.with_name(f"{base.stem}.w{worker}{base.suffix}")


def summary_path(records: Path) -> Path:
    """The summary JSON beside a records file: `runs.jsonl` -> `runs.summary.json`."""
    return records.with_name(f"{records.stem}.summary.json")


class RecordWriter:
    """Appends records to one file, a line at a time and flushed, so a killed run keeps what it sent.
    A lock guards the writes: greenlets or threads of one process may share a writer."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = path.open("w")
        self._lock = threading.Lock()
        self.records: list[Record] = []

    def write(self, record: Record) -> None:
        with self._lock:
            self._file.write(record.to_json() + "\n")
            self._file.flush()
            self.records.append(record)

    def close(self) -> None:
        with self._lock:
            self._file.close()


@dataclass(frozen=True)
class Summary:
    """A run's headline numbers and whether it is valid (the generator kept to its schedule)."""

    requests: int
    errors: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    send_lag_p99_ms: float | None
    max_send_lag_ms: float
    valid: bool
    clock_start_unix: float | None = None
    """Unix time of the process's run clock's zero (records' `sent_s` count from it); None if unknown."""
    worker: int = 0
    """The worker index of a distributed run's process; 0 for a single process."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=2)

    def verdict(self) -> str:
        """One line for the console: valid, or INVALID with the measured lag and the bound."""
        if self.valid:
            lag = "n/a (closed loop)" if self.send_lag_p99_ms is None else f"{self.send_lag_p99_ms:.1f} ms"
            return f"run valid: P99 send lag {lag} <= {self.max_send_lag_ms:g} ms"
        return (
            f"run INVALID: the generator fell behind "
            f"(P99 send lag {self.send_lag_p99_ms:.1f} ms > {self.max_send_lag_ms:g} ms)"
        )


def summarise(
    records: Sequence[Record],
    max_send_lag_ms: float = DEFAULT_MAX_SEND_LAG_MS,
    clock_start_unix: float | None = None,
    worker: int = 0,
) -> Summary:
    """The summary of a run's records; invalid when the P99 send lag exceeds `max_send_lag_ms`."""
    lags = [r.send_lag_ms for r in records if r.send_lag_ms is not None]
    ttfts = [r.ttft_ms for r in records if r.ttft_ms is not None]
    lag_p99 = percentile(lags, 99)
    return Summary(
        requests=len(records),
        errors=sum(1 for r in records if r.error_type is not None),
        ttft_p50_ms=percentile(ttfts, 50),
        ttft_p99_ms=percentile(ttfts, 99),
        send_lag_p99_ms=lag_p99,
        max_send_lag_ms=max_send_lag_ms,
        valid=lag_p99 is None or lag_p99 <= max_send_lag_ms,
        clock_start_unix=clock_start_unix,
        worker=worker,
    )
