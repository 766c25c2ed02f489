"""The `qvl cluster` commands that deploy/ray/cluster.sim.yaml's comments and the README's "Trying it
without GPUs" block give, run exactly as written (from the repository root, `qvl` on PATH): `status`
and `down` find the cluster `up --address local` started, and `down` leaves nothing running. Only the
environment differs from a user's: Redis on a free port instead of 6379 (the file names a Redis),
the router on a free port, and run directories under the test's tmp_path."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import ROOT
from support.polling import wait_for

from qvl.procs import Child, free_port, spawn
from qvl.settings import ClusterSettings
from serving.ray import local as ray_local

SIM_CONFIG = ROOT / "deploy" / "ray" / "cluster.sim.yaml"


def yaml_commands() -> list[str]:
    """The `qvl` lines of the file's leading comments."""
    return [m.group(1) for m in re.finditer(r"^#\s+(qvl .*)$", SIM_CONFIG.read_text(), re.MULTILINE)]


def readme_commands() -> list[str]:
    """The `$ qvl` lines of the README code block that follows "Trying it without GPUs"."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("**Trying it without GPUs.**") :].split("```")[1]
    return [line.removeprefix("$ ") for line in block.splitlines() if line.startswith("$ qvl ")]


def argv_of(line: str) -> tuple[list[str], bool]:
    """A written command line as argv, and whether it runs in the background (a trailing `&`)."""
    argv = shlex.split(line, comments=True)
    background = argv[-1] == "&"
    return (argv[:-1] if background else argv), background


@pytest.mark.parametrize("source", ["yaml", "readme"])
def test_written_cluster_commands_work_as_written(source: str, redis_server, tmp_path: Path) -> None:
    lines = yaml_commands() if source == "yaml" else readme_commands()
    assert [argv_of(line)[0][:3] for line in lines if argv_of(line)[0][1] == "cluster"] == [
        ["qvl", "cluster", "up"],
        ["qvl", "cluster", "status"],
        ["qvl", "cluster", "down"],
    ], lines
    assert yaml.safe_load(SIM_CONFIG.read_text())["registry"]["url"].startswith("redis://")
    run_dir = tmp_path / "cluster"
    router_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("QVL_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "QVL_REGISTRY__URL": redis_server.url,
        "QVL_CLUSTER__RUN_DIR": str(run_dir),
        "QVL_REPLICA__RUN_DIR": str(tmp_path),
        "QVL_ROUTER__PORT": str(router_port),
    }
    conf = ClusterSettings(run_dir=str(run_dir))
    router: Child | None = None
    ran: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for line in lines:
            argv, background = argv_of(line)
            if background or argv[1] == "router":
                router = spawn(
                    "router",
                    argv,
                    url=f"http://127.0.0.1:{router_port}",
                    log=tmp_path / "router.log",
                    env=env,
                    cwd=ROOT,
                )
                # It finds both replicas in the registry: /ready answers once one is healthy.
                router.wait_ready(30, "/ready", interval_s=0.2)
                continue
            done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            print(f"$ {line}\n{done.stderr}{done.stdout}")
            assert done.returncode == 0, f"{line}\n{done.stderr}"
            ran[argv[2]] = done
        assert router is not None
        head = ran["up"].stderr.split("local Ray head at ")[1].split()[0]
        table = ran["status"].stdout.splitlines()
        assert [row.split()[0] for row in table[1:]] == ["qvl-replica-0", "qvl-replica-1"]
        assert f"address auto: using the local Ray head at {head}" in ran["status"].stderr
        assert f"2 replica(s) of cluster 'qvl' on Ray at {head}" in ran["status"].stderr
        assert f"stopped 2 replica(s) of cluster 'qvl' on Ray at {head}" in ran["down"].stderr
        assert f"stopped the local Ray head ({head})" in ran["down"].stderr
        assert ray_local.recorded_head(conf) is None
        wait_for(lambda: not ray_local.accepts(head), timeout=10)

        # Run again with nothing left, `status` fails instead of printing an empty table.
        status_line = next(line for line in lines if argv_of(line)[0][1:3] == ["cluster", "status"])
        again = subprocess.run(argv_of(status_line)[0], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        print(f"$ {status_line}\n{again.stderr}{again.stdout}")
        assert again.returncode != 0 and again.stdout == ""
        assert again.stderr.startswith("qvl: ") and ("Ray at " in again.stderr or "address auto" in again.stderr)
    finally:
        if router is not None:
            router.stop(grace_s=15)
        leftover = ray_local.running_head(conf)
        if leftover is not None:
            ray_local.stop_head(leftover, grace_s=0)
