"""The `qvl` command line: every flag explains itself, flags set the settings fields they name, and both
`python -m` entries run."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest
from support import ROOT

from qvl.cli import _parser, parse_command
from qvl.cli.flags import SET_PREFIX, setting_field, setting_flag


def _commands(parser: argparse.ArgumentParser, name: str = "qvl") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the command tree (qvl, qvl router, ..., qvl cluster up, qvl model tiny)."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}")


COMMANDS = dict(_commands(_parser()))


def test_the_walk_reaches_every_subcommand() -> None:
    for name in ("qvl router", "qvl up", "qvl cluster up", "qvl cluster status", "qvl cluster scale"):
        assert name in COMMANDS
    assert {"qvl cluster down", "qvl model tiny", "qvl sim", "qvl replica", "qvl gpu-exporter"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_and_a_readable_placeholder(name: str) -> None:
    parser = COMMANDS[name]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        shown = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"{name} {shown} has no help text"
        if action.dest.startswith(SET_PREFIX):
            setting_field(action.dest.removeprefix(SET_PREFIX))  # names a real field
    text = parser.format_help()
    assert "SET:" not in text, f"`{name} --help` shows a settings path as a placeholder:\n{text}"


def test_help_comes_from_the_settings_field() -> None:
    text = COMMANDS["qvl router"].format_help()
    assert "--port PORT" in text
    assert setting_field("router.port").description in " ".join(text.split())
    assert "--keys-file PATH" in text
    assert "{round-robin,least-loaded,session,image-affinity}" in text
    assert "--step-base-ms MS" in COMMANDS["qvl sim"].format_help()
    assert "--enforce-eager, --no-enforce-eager" in COMMANDS["qvl replica"].format_help()


def test_setting_flag_derives_type_choices_and_placeholder() -> None:
    parser = argparse.ArgumentParser()
    port = setting_flag(parser, "--port", "router.port")
    policy = setting_flag(parser, "--policy", "router.policy")
    timeout = setting_flag(parser, "--timeout", "router.request_timeout_s", help="own words")
    assert (port.type, port.metavar, port.dest) == (int, "PORT", "set:router.port")
    assert policy.choices == ["round-robin", "least-loaded", "session", "image-affinity"]
    assert timeout.metavar == "SECONDS"
    assert timeout.help is not None and timeout.help.startswith("own words")
    args = parser.parse_args(["--port", "9001", "--timeout", "2.5"])
    assert vars(args)["set:router.port"] == 9001
    assert vars(args)["set:router.request_timeout_s"] == 2.5


def test_setting_flag_refuses_a_path_that_is_not_a_field() -> None:
    with pytest.raises(KeyError, match=r"router\.prot"):
        setting_flag(argparse.ArgumentParser(), "--port", "router.prot")
    with pytest.raises(KeyError, match=r"router\.port"):
        setting_field("router.port.number")


def test_flags_set_the_settings_they_name() -> None:
    replicas = ["--replica", "http://127.0.0.1:9100", "--replica", "http://127.0.0.1:9101"]
    _, settings = parse_command(
        ["router", "--port", "9001", "--policy", "session", "--no-auth", "--keys-file", "keys.yaml", *replicas]
    )
    assert settings.router.port == 9001
    assert settings.router.policy == "session"
    assert settings.router.auth.enabled is False
    assert settings.router.auth.keys_file == "keys.yaml"
    assert settings.router.replicas == ["http://127.0.0.1:9100", "http://127.0.0.1:9101"]

    _, settings = parse_command(["replica", "--tp", "2", "--gpus", "0,1", "--no-enforce-eager", "--no-gpu-exporter"])
    assert settings.replica.tensor_parallel_size == 2
    assert settings.replica.gpus == [0, 1]
    assert settings.replica.enforce_eager is False
    assert settings.up.gpu_exporter is False

    args, settings = parse_command(["cluster", "scale", "3", "--address", "local", "--log-level", "debug"])
    assert (args.count, settings.cluster.address, settings.log_level) == (3, "local", "debug")


def test_a_flag_not_given_leaves_the_setting_alone() -> None:
    _, settings = parse_command(["up"])
    assert settings.up.gpu_exporter is True
    assert settings.router.auth.enabled is True


@pytest.mark.parametrize("module", ["qvl", "qvl.cli"])
def test_python_m_runs_the_command(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: qvl")
    assert "cluster" in done.stdout
