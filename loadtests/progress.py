"""The progress line `qvl loadtest` shows while locust runs, read from the records as they are written.

    qvl loadtest: 42s  answered 331/960 (35%)  errors 2  TTFT p50 140 ms p99 480 ms  send lag p99 3.1 ms

On a terminal the line rewrites itself every second; otherwise (a log, CI) one line every 10 s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from loadtests.records import Record, percentile
from loadtests.runfolder import RunFolder

WINDOW = 2000
"""Recent requests the running percentiles are taken over."""


class Progress:
    """Follows a run folder's record files; `update` reads what is new and shows the line."""

    def __init__(
        self,
        folder: RunFolder,
        planned: int,
        say: Callable[[str], None],
        tty: bool | None = None,
    ) -> None:
        self.folder = folder
        self.planned = planned
        self.say = say
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.answered = 0
        self.errors = 0
        self._offsets: dict[Path, int] = {}
        self._recent: list[Record] = []
        self._started = time.monotonic()
        self._last_line = 0.0
        self._width = 0

    def update(self) -> int:
        """Read new records, show the line (rate-limited off a terminal); returns how many are answered."""
        for path in self.folder.record_files():
            self._read(path)
        now = time.monotonic()
        if self.tty or now - self._last_line >= 10:
            self._last_line = now
            self._show(self.line(now - self._started))
        return self.answered

    def line(self, elapsed_s: float) -> str:
        """The progress line for `elapsed_s` seconds into the run."""
        share = f" ({self.answered / self.planned:.0%})" if self.planned else ""
        ttfts = [r.ttft_ms for r in self._recent if r.ttft_ms is not None]
        lags = [r.send_lag_ms for r in self._recent if r.send_lag_ms is not None]
        parts = [f"{elapsed_s:.0f}s", f"answered {self.answered}/{self.planned}{share}", f"errors {self.errors}"]
        if ttfts:
            parts.append(f"TTFT p50 {percentile(ttfts, 50):.0f} ms p99 {percentile(ttfts, 99):.0f} ms")
        else:
            e2e = [r.e2e_ms for r in self._recent]
            if e2e:
                parts.append(f"E2E p50 {percentile(e2e, 50):.0f} ms p99 {percentile(e2e, 99):.0f} ms")
        if lags:
            parts.append(f"send lag p99 {percentile(lags, 99):.1f} ms")
        return "qvl loadtest: " + "  ".join(parts)

    def close(self) -> None:
        """Finish the line: read the last records and end the rewriting line with a newline."""
        for path in self.folder.record_files():
            self._read(path)
        self._show(self.line(time.monotonic() - self._started))
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def _show(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r" + text.ljust(self._width))
            sys.stderr.flush()
            self._width = len(text)
        else:
            self.say(text)

    def _read(self, path: Path) -> None:
        offset = self._offsets.get(path, 0)
        try:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        # Only whole lines: a writer may be in the middle of one.
        end = chunk.rfind(b"\n") + 1
        self._offsets[path] = offset + end
        for line in chunk[:end].decode().splitlines():
            try:
                record = Record.from_json(line)
            except (ValueError, TypeError):
                continue
            self.answered += 1
            self.errors += record.error_type is not None
            self._recent.append(record)
        del self._recent[:-WINDOW]
