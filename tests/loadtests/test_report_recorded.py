"""`qvl loadtest report` on a run recorded by `qvl loadtest` (tests/loadtests/data/flash-sale-run: the
flash-sale workload at 10 requests/s for 12 s against `qvl up --engine sim --replicas 2`), alone and as
the levels of a sweep."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from support import ROOT

from loadtests.runfolder import RunFolder
from loadtests.slo import parse_slo
from loadtests.summary import summarise_run

RECORDED = ROOT / "tests" / "loadtests" / "data" / "flash-sale-run"
PNG = b"\x89PNG\r\n\x1a\n"


def qvl_report(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qvl", "loadtest", "report", *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False)


def test_the_recorded_run_is_what_its_summary_says() -> None:
    folder = RunFolder(RECORDED)
    records = folder.records()
    again = summarise_run(records, folder.process_summaries(), parse_slo(folder.meta()["slo"]), 100.0)
    assert json.loads(again.to_json()) == folder.summary()
    assert len(records) == folder.meta()["planned_requests"] and {s.source for s in folder.scrapes()} == set(
        folder.meta()["scrape_sources"]
    )


def test_a_report_renders_from_a_recorded_run(tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = qvl_report(str(RECORDED), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    plots = sorted((out / "plots").glob("*.png"))
    names = {p.stem for p in plots}
    assert {"latency_time", "latency_bucket", "ttft", "throughput", "send_lag", "replicas", "engine_queue"} <= names
    html = (out / "report.html").read_text()
    markdown = (out / "report.md").read_text()
    embedded = {base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)}
    for plot in plots:
        data = plot.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, plot.name
        assert data in embedded, f"{plot.name} is not embedded in report.html"
        assert f"plots/{plot.name}" in markdown
    assert "<script" not in html and 'src="http' not in html
    summary = RunFolder(RECORDED).summary()
    assert f"| throughput (req/s) | {summary['throughput_rps']:.2f} |" in markdown


def test_a_sweep_folder_reports_its_levels_side_by_side(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for rate in (5, 10):
        level = sweep / f"rate-{rate}"
        shutil.copytree(RECORDED, level)
        meta = json.loads((level / "run.json").read_text())
        (level / "run.json").write_text(json.dumps({**meta, "rate": rate, "label": f"{rate}/s"}))
    (sweep / "sweep.json").write_text("{}")
    done = qvl_report(str(sweep))
    assert done.returncode == 0, done.stderr[-3000:]
    markdown = (sweep / "report" / "report.md").read_text()
    assert "5/s" in markdown and "10/s" in markdown
    assert (sweep / "report" / "plots" / "compare_sweep.png").read_bytes().startswith(PNG)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path: Path) -> None:
    done = qvl_report(str(tmp_path))
    assert done.returncode == 1 and f"{tmp_path}: no records.jsonl" in done.stderr
