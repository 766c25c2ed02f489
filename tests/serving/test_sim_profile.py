"""Capacity profiles: the file round-trips, it sets the simulated engine's terms and limits, `qvl sim
--profile` serves with them, and a bad profile stops start-up naming the field at fault."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.chat import image_chat, png_data_url
from support.polling import wait_for
from support.servers import Cluster, Proc

from qvl.cli import main, with_sim_profile
from qvl.procs import free_port
from qvl.settings import Settings, SimSettings, load_settings
from serving.engines import ENGINES
from serving.sim.engine import ImageInput, SimEngine, SimRequest, step_costs
from serving.sim.profile import (
    CapacityProfile,
    Costs,
    EngineLimits,
    Estimate,
    FittedOn,
    ProfileError,
    Tokens,
    load_profile,
    write_profile,
)

MODEL = "qwen3-vl-sim"


def profile(max_running: int = 3, prefill_base_ms: float = 21.0) -> CapacityProfile:
    fixed = Estimate.fixed
    return CapacityProfile(
        fitted_on=FittedOn(
            model="Qwen/Qwen3-VL-8B-Instruct",
            hardware="NVIDIA H100 80GB",
            engine="vllm",
            engine_version="0.11.0",
            date=datetime.datetime(2025, 11, 3, 12, 0, tzinfo=datetime.UTC),
            workload="calibration",
            rates=[1.0, 2.0, 4.0],
            requests=1200,
            replicas=2,
        ),
        engine=EngineLimits(max_running=max_running, max_batched_tokens=4096, mm_cache_items=77),
        costs=Costs(
            step_base_ms=Estimate(value=9.5, low=9.0, high=10.0),
            per_decode_ms=fixed(0.12),
            per_kv_ktoken_ms=fixed(0.03),
            prefill_base_ms=fixed(prefill_base_ms),
            per_text_token_ms=fixed(0.015),
            per_image_token_ms=fixed(0.08),
            image_hit_discount=fixed(0.9),
            frontend_base_ms=fixed(3.0),
            frontend_per_image_token_ms=fixed(0.002),
        ),
        validation={"ttft_p50": 0.04},
    )


def test_a_profile_round_trips_through_its_file(tmp_path: Path) -> None:
    original = profile()
    path = tmp_path / "profile.yaml"
    write_profile(original, path)
    assert yaml.safe_load(path.read_text())["schema"] == "qvl-capacity-profile/1"
    assert load_profile(path) == original


def test_apply_replaces_the_terms_and_limits() -> None:
    loaded = profile()
    sim = loaded.apply(SimSettings(model="m", port=8123, max_running=64))
    assert (sim.max_running, sim.max_batched_tokens, sim.mm_cache_items) == (3, 4096, 77)
    assert (sim.step_base_ms, sim.prefill_base_ms, sim.image_hit_discount) == (9.5, 21.0, 0.9)
    assert (sim.frontend_base_ms, sim.frontend_per_image_token_ms) == (3.0, 0.002)
    assert (sim.model, sim.port) == ("m", 8123)  # not the profile's business
    # The engine reads the settings into the very step model the planner takes from the profile.
    assert step_costs(sim) == loaded.step_costs()
    engine = SimEngine(sim)
    assert engine.costs == loaded.step_costs() and engine.max_running == 3
    request = SimRequest(text_tokens=5, images=(ImageInput(b"photo", 500),))
    assert engine.frontend_seconds(request) == pytest.approx(loaded.frontend_s(500))


def bad_profile(tmp_path: Path, edit: str) -> Path:
    data = yaml.safe_load(profile().dump())
    if edit == "missing":
        del data["costs"]["step_base_ms"]
    elif edit == "negative":
        data["costs"]["per_decode_ms"]["value"] = -1
    elif edit == "schema":
        data["schema"] = "qvl-capacity-profile/0"
    path = tmp_path / f"{edit}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("edit", "named"),
    [("missing", "costs.step_base_ms"), ("negative", "costs.per_decode_ms.value"), ("schema", "schema")],
)
def test_a_malformed_profile_names_the_field(tmp_path: Path, edit: str, named: str) -> None:
    path = bad_profile(tmp_path, edit)
    with pytest.raises(ProfileError, match=f"{path}.*{named.replace('.', '[.]')}"):
        load_profile(path)


def test_an_unreadable_profile_says_so(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read capacity profile"):
        load_profile(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("costs: [unclosed\n")
    with pytest.raises(ProfileError, match="is not YAML"):
        load_profile(broken)


@pytest.mark.parametrize("command", [["sim"], ["up", "--engine", "sim", "--replicas", "1"]])
def test_a_bad_profile_fails_start_up_with_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    path = bad_profile(tmp_path, "missing")
    # Nothing starts: the profile is read before any server or replica.
    assert main([*command, "--profile", str(path), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qvl: capacity profile") and "costs.step_base_ms" in err


def test_the_profile_reaches_every_replica_of_qvl_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_profile(profile(), tmp_path / "p.yaml")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, {"up": {"engine": "sim"}, "sim": {"profile": "p.yaml"}})
    applied = with_sim_profile(settings, runs_sim=True)
    assert applied.sim.profile == tmp_path / "p.yaml"  # absolute: a replica may run in another folder
    assert applied.sim.max_running == 3
    assert with_sim_profile(settings, runs_sim=False) is settings  # a vLLM launcher ignores it
    command = ENGINES["sim"].command(applied, "127.0.0.1", 9100, (), tmp_path / "replica")
    written = Settings.model_validate(
        yaml.safe_load(Path(command.argv[command.argv.index("--config") + 1]).read_text())
    )
    assert written.sim.profile == tmp_path / "p.yaml"
    assert written.sim.max_running == 3


def engine_load(proc: Proc) -> tuple[float, float]:
    samples = {}
    for family in text_string_to_metric_families(httpx.get(proc.url + "/metrics").text):
        for sample in family.samples:
            samples[sample.name] = sample.value
    return samples["vllm:num_requests_running"], samples["vllm:num_requests_waiting"]


def test_qvl_sim_serves_with_the_profiles_limits(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "slow.yaml"
    # One request at a time, each with 1 s steps: a second request can only wait, and the engine's gauge
    # counts it from the second step on (vLLM's scheduler sees a request at the start of a step).
    slow = profile(max_running=1, prefill_base_ms=1_000)
    slow = slow.model_copy(update={"costs": slow.costs.model_copy(update={"step_base_ms": Estimate.fixed(1_000)})})
    write_profile(slow, path)
    # The profile wins over the flags for the terms and limits it holds.
    sim = cluster.sim("--profile", str(path), "--max-running", "8")

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=30) as first, httpx.AsyncClient(timeout=30) as second:
            doc = image_chat(MODEL, png_data_url())
            tasks = [
                asyncio.create_task(client.post(sim.url + "/v1/chat/completions", json=doc))
                for client in (first, second)
            ]
            # Well under the first request's 24 s (24 tokens of 1 s steps): a request that ended instead is a failure.
            await asyncio.to_thread(wait_for, lambda: engine_load(sim) == (1, 1), 10)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    wait_for(lambda: engine_load(sim) == (0, 0), 5)


def test_qvl_sim_counts_tokens_as_the_profile_says_and_names_itself(cluster: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "counting.yaml"
    tokens = Tokens(chars_per_token=2.0, template_tokens=10, image_max_pixels=448 * 448, natural_output_tokens=7)
    write_profile(profile(prefill_base_ms=1).model_copy(update={"tokens": tokens}), path)
    sim = cluster.sim("--profile", str(path))
    assert httpx.get(sim.url + "/version").json()["version"].startswith("qvl-sim ")
    text = "What colour is this bag?"  # 24 characters
    doc = image_chat(MODEL, png_data_url(size=(640, 640)), text=text, max_tokens=50)
    usage = httpx.post(sim.url + "/v1/chat/completions", json=doc, timeout=30).json()["usage"]
    # 10 template + 24 / 2 text tokens, and the 640x640 photo capped at 448x448: 196 image tokens.
    assert usage["prompt_tokens"] == 10 + 12 + 196
    assert usage["completion_tokens"] == 7  # it stops where the profile says the model stops
