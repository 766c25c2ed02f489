"""`qvl batch submit FILE --wait` against a live router: progress lines, the results downloaded beside the
file, and the exit status saying whether every line was answered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support import ROOT
from support.batch import batch_lines, jsonl
from support.servers import Cluster

MODEL = "qwen3-vl-sim"


def qvl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qvl", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )


def test_submit_waits_shows_progress_and_downloads_the_results(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim("--output-tokens", "8")
    config = tmp_path / "router.yaml"
    config.write_text(f"router:\n  batch:\n    files_dir: '{tmp_path / 'files'}'\n")
    router = cluster.router(sim, flags=("--config", str(config)))
    source = tmp_path / "catalogue.jsonl"
    bad = json.dumps({"custom_id": "no-model", "method": "POST", "url": "/v1/chat/completions", "body": {}})
    source.write_bytes(batch_lines(MODEL, 40, max_tokens=8) + bad.encode() + b"\n")

    done = qvl("batch", "submit", str(source), "--wait", "--interval", "0.2", "--url", router.url, "--metadata", "k=v")
    assert done.returncode == 3, done.stderr  # completed, with a failed line
    assert "created from" in done.stdout and "lines (1 failed)" in done.stdout and "lines/s" in done.stdout
    out = jsonl((tmp_path / "catalogue.output.jsonl").read_bytes())
    errors = jsonl((tmp_path / "catalogue.errors.jsonl").read_bytes())
    assert len(out) == 40 and [e["custom_id"] for e in errors] == ["no-model"]
    batch_id = done.stdout.split("batch ", 1)[1].split(" ", 1)[0]
    status = qvl("batch", "status", batch_id, "--url", router.url)
    assert status.returncode == 0 and json.loads(status.stdout)["metadata"] == {"k": "v"}
    assert qvl("batch", "cancel", batch_id, "--url", router.url).returncode == 1  # it has ended: refused
    assert qvl("batch", "submit", str(tmp_path / "missing.jsonl"), "--url", router.url).returncode == 2
