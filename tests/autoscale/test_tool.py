"""`qvl autoscale replay`: the settings' policy, the reactive baseline and the oracle on a built-in trace or
a user's CSV, as a table, a JSON file and a figure; a bad CSV is refused naming the row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvl.cli import main


def test_a_flash_sale_replay_prints_and_writes_every_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["autoscale", "replay", "--out", str(tmp_path), "--max-replicas", "40", "--target-utilisation", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| demand (settings) |" in out and "| reactive baseline |" in out and "| oracle |" in out
    found = {r["policy"]: r for r in json.loads((tmp_path / "replay.json").read_text())["rows"]}
    assert found["oracle"]["violation_min"] == 0 and found["oracle"]["vs_oracle"] == 1.0
    # Nobody starts a replica in under 120 s: both policies fall short when the sale's ramp comes.
    assert found["demand (settings)"]["violation_min"] > 0 and found["reactive baseline"]["violation_min"] > 0
    assert (tmp_path / "replay.png").stat().st_size > 10_000


def test_a_users_rate_curve_is_replayed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    curve = tmp_path / "day.csv"
    curve.write_text("t_s,rate\n0,20\n1800,20\n1860,80\n3600,80\n3660,20\n5400,20\n")
    code = main(["autoscale", "replay", "--trace", str(curve), "--out", str(tmp_path / "out"), "--max-replicas", "12"])
    assert code == 0
    rows = json.loads((tmp_path / "out" / "replay.json").read_text())["rows"]
    demand = next(r for r in rows if r["policy"] == "demand (settings)")
    assert demand["max_replicas"] >= 8  # 80 requests/s at 10 per replica and 0.8 utilisation
    assert "rate curve" in capsys.readouterr().out


def test_a_bad_rate_curve_is_refused_naming_the_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    curve = tmp_path / "bad.csv"
    curve.write_text("0,20\n10,twenty\n")
    assert main(["autoscale", "replay", "--trace", str(curve), "--out", str(tmp_path)]) == 1
    assert "row 2" in capsys.readouterr().err
