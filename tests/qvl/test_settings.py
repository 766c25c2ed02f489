import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

from qvl.settings import Settings, SettingsError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "qvl.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid() -> None:
    s = load_settings()
    assert s.router.policy == "least-loaded"
    assert s.router.load_factor == 1.25
    assert s.up.engine == "vllm"


def test_flags_beat_env_beat_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, "router:\n  port: 9000\n  policy: session\n  health:\n    interval_s: 2\n")
    assert load_settings(cfg).router.port == 9000
    monkeypatch.setenv("QVL_ROUTER__PORT", "9100")
    monkeypatch.setenv("QVL_ROUTER__REPLICAS", '["http://127.0.0.1:1/"]')
    s = load_settings(cfg, {"router": {"policy": "round-robin"}})
    assert s.router.port == 9100
    assert s.router.policy == "round-robin"
    assert s.router.health.interval_s == 2.0
    assert s.router.replicas == ["http://127.0.0.1:1"]
    assert isinstance(s, Settings)


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("router:\n  port: abc\n", "router.port"),
        ("router:\n  polcy: x\n", "router.polcy"),
        ("router:\n  load_factor: 0.5\n", "router.load_factor"),
        ("router:\n  replicas: [ftp://x]\n", "router.replicas"),
        ("sim:\n  max_running: 0\n", "sim.max_running"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, yaml_text: str, field: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(write(tmp_path, yaml_text))
    assert f"setting {field}:" in str(info.value)


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(tmp_path / "missing.yaml")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(write(tmp_path, "- 1\n- 2\n"))


def test_every_field_is_documented() -> None:
    def walk(model: type) -> list[str]:
        missing = []
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            if not info.description:
                missing.append(name)
            sub = info.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                missing += [f"{name}.{m}" for m in walk(sub)]
        return missing

    assert walk(Settings) == []


def test_cli_bad_value_stops_with_one_line(tmp_path: Path) -> None:
    cfg = write(tmp_path, "router:\n  port: not-a-port\n")
    run = subprocess.run(
        [sys.executable, "-m", "qvl", "router", "--config", str(cfg), "--replica", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("qvl: setting router.port:")
