"""`qvl plan report` from a recorded planning folder (tests/loadtests/data/plan-example, made by calibrate,
validate, size and verify against two simulated replicas): all three files and the PNGs are written, the
HTML fetches nothing, report.json carries the inputs' numbers, missing parts are said to be missing, a
trace's windows are drawn, and the command's exit status."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from loadtests.planner.planfolder import ReportError, grid, locate
from loadtests.planner.report import REPORT_JSON, PlanReport, write_plan_report
from loadtests.runfolder import RunFolder
from qvl.cli import main

EXAMPLE = Path(__file__).parent / "data" / "plan-example"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PLOTS = {"headline", "goodput", "errors", "replicas", "intervals"}


def _json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> tuple[PlanReport, dict[str, Any]]:
    report = write_plan_report(EXAMPLE, tmp_path_factory.mktemp("report"), lambda _: None)
    return report, _json(report.json)


def test_the_example_writes_markdown_html_json_and_every_plot(example: tuple[PlanReport, dict[str, Any]]) -> None:
    report, data = example
    assert report.missing == []
    assert {p.stem for p in report.plots} == ALL_PLOTS
    for path in report.plots:
        assert path.read_bytes().startswith(PNG_MAGIC)
        assert path.parent.name == "plots"
    markdown = report.markdown.read_text()
    for path in report.plots:
        assert f"](plots/{path.name})" in markdown
    n = _json(EXAMPLE / "sizing" / "sizing.json")["replicas"]
    assert f"N = {n} replicas" in markdown and "Error table" in markdown and "What-if rows" in markdown
    assert data["plots"] == [p.name for p in report.plots] and data["plots_skipped"] == []


def test_the_html_page_embeds_its_plots_and_fetches_nothing(example: tuple[PlanReport, dict[str, Any]]) -> None:
    report, _ = example
    page = report.html.read_text()
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == len(report.plots)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"<link|@import|url\(", page)


def test_report_json_carries_the_numbers_of_the_recorded_files(example: tuple[PlanReport, dict[str, Any]]) -> None:
    _, data = example
    sizing = _json(EXAMPLE / "sizing" / "sizing.json")
    validation = _json(EXAMPLE / "validation" / "validation.json")
    verify = _json(EXAMPLE / "verify" / "verify.json")
    for key in ("replicas", "headroom_replicas", "gpus", "peak_rate", "trials", "what_if"):
        assert data["sizing"][key] == sizing[key]
    assert data["validation"]["errors"] == validation["errors"]
    assert data["validation"]["max_rate"] == validation["max_rate"]
    assert data["validation"]["passed"] == validation["passed"]
    assert data["verify"]["runs"] == verify["runs"]
    assert data["slo"] == sizing["slo"]
    assert data["curve"]["highest_rate"] == validation["max_rate"]["predicted"]
    profile = data["profile"]["costs"]
    assert set(profile) >= {"step_base_ms", "per_decode_ms", "per_image_token_ms", "image_hit_discount"}
    assert all(c["low"] <= c["value"] <= c["high"] for c in profile.values())


def test_measured_levels_are_the_runs_numbers(example: tuple[PlanReport, dict[str, Any]]) -> None:
    _, data = example
    levels = data["levels"]
    calibration = [lv for lv in levels if lv["kind"] == "calibration"]
    assert [lv["rate"] for lv in calibration] == _json(EXAMPLE / "calibration.json")["rates"]
    for level in calibration:
        # Summarised again from the records (under the plan's SLO): the percentiles are those of the run.
        recorded = RunFolder(Path(level["folder"])).summary()
        assert level["source"] == "records"
        assert level["metrics"]["ttft_p99"] == pytest.approx(recorded["ttft_ms"]["p99"])
        assert level["metrics"]["goodput"] is not None
    held_out = {lv["name"]: lv for lv in levels if lv["kind"] != "calibration"}
    for level in _json(EXAMPLE / "validation" / "validation.json")["levels"]:
        mine = held_out[level["name"]]
        assert mine["predicted"] == level["predicted"]
        for metric, value in level["measured"].items():
            assert mine["metrics"][metric] == pytest.approx(value)


def test_the_predicted_curve_spans_the_measured_rates(example: tuple[PlanReport, dict[str, Any]]) -> None:
    _, data = example
    curve = data["curve"]
    rates = [p["rate"] for p in curve["points"]]
    assert rates == sorted(rates)
    measured = [lv["rate"] for lv in data["levels"] if lv["kind"] != "bursty"]
    assert min(rates) < min(measured) and max(rates) > max(measured)
    assert curve["replicas"] == 2 and curve["simulated_requests"] > 0
    assert all(p["ttft_p99"] >= p["ttft_p50"] for p in curve["points"])


def test_a_folder_with_only_a_profile_says_what_is_missing(tmp_path: Path) -> None:
    folder = tmp_path / "plan"
    folder.mkdir()
    shutil.copy(EXAMPLE / "profile.yaml", folder / "profile.yaml")
    report = write_plan_report(folder, tmp_path / "out", lambda _: None)
    assert report.missing == ["calibration", "validation", "sizing", "verify"]
    markdown = report.markdown.read_text()
    for command in ("qvl plan calibrate", "qvl plan validate", "qvl plan size", "qvl plan verify"):
        assert f"run {command} to add it" in markdown
    assert "No measured level run in the folder" in markdown
    assert [p.stem for p in report.plots] == ["intervals"]
    data = _json(tmp_path / "out" / REPORT_JSON)
    assert data["missing"] == report.missing and data["curve"] is None and data["sizing"] is None


def test_a_trace_is_drawn_window_by_window_and_a_lost_run_is_noted(tmp_path: Path) -> None:
    folder = tmp_path / "plan"
    shutil.copytree(EXAMPLE, folder)
    sizing = _json(folder / "sizing" / "sizing.json")
    windows = [
        {"start_s": h * 3600.0, "end_s": (h + 1) * 3600.0, "peak_rate": rate, "replicas": n, "gpus": n}
        for h, (rate, n) in enumerate([(2.0, 1), (6.5, 2), (10.0, 3), (4.0, 2)])
    ]
    sizing["trace"] = {"window_s": 3600.0, "sample_s": 180.0, "replicas": 3, "windows": windows}
    (folder / "sizing" / "sizing.json").write_text(json.dumps(sizing))
    shutil.rmtree(folder / "profile-runs" / "level-1-1")
    report = write_plan_report(folder, tmp_path / "out", lambda _: None)
    assert "trace" in {p.stem for p in report.plots}
    markdown = report.markdown.read_text()
    assert "Replicas per window" in markdown and "| 2.0 | 3.0 | 10.00 | 3 |" in markdown
    data = _json(report.json)
    assert data["sizing"]["trace"]["windows"] == windows
    assert len([lv for lv in data["levels"] if lv["kind"] == "calibration"]) == 5
    assert any("level-1-1 not found" in note for note in data["notes"])


def test_recorded_paths_are_found_where_the_folder_is_now(tmp_path: Path) -> None:
    (tmp_path / "validation" / "between-3.46").mkdir(parents=True)
    found = locate("runs/plan/validation/between-3.46", "runs/plan/profile.yaml", tmp_path)
    assert found == tmp_path / "validation" / "between-3.46"
    assert locate("/elsewhere/x/validation/between-3.46", None, tmp_path) == found
    assert locate("/elsewhere/validation/gone", None, tmp_path) is None


def test_the_rate_grid_keeps_the_measured_rates_and_reaches_past_the_compliant_rate() -> None:
    rates = grid([1.0, 2.0, 4.0], highest=8.0)
    assert {1.0, 2.0, 4.0} <= set(rates) and rates == sorted(rates)
    assert rates[0] == 0.5 and rates[-1] == pytest.approx(8.8)
    assert grid([], None) == []


def test_the_command_exits_0_and_2_for_a_folder_without_a_profile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "plan"
    folder.mkdir()
    assert main(["plan", "report", str(folder)]) == 2
    assert "no profile.yaml" in capsys.readouterr().err
    shutil.copy(EXAMPLE / "profile.yaml", folder / "profile.yaml")
    assert main(["plan", "report", str(folder)]) == 0
    assert (folder / "report" / "report.html").is_file()
    err = capsys.readouterr().err
    assert "no sizing in" in err and "wrote" in err
    (folder / "calibration.json").write_text("{not json")
    assert main(["plan", "report", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "calibration.json: cannot read" in capsys.readouterr().err


def test_a_damaged_profile_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "profile.yaml").write_text("schema: qvl-capacity-profile/1\n")
    with pytest.raises(ReportError, match=r"profile\.yaml"):
        write_plan_report(tmp_path, tmp_path / "out", lambda _: None)
