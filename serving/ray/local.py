"""A Ray head on this machine for `qvl cluster up --address local`, and its stop for `qvl cluster down`.

The head is `ray start --head --block` in a session of its own, so that stopping it stops exactly
this cluster's processes (its workers included): `ray stop` would stop every Ray on the machine.
A record in `cluster.run_dir/ray-local.json` (pid, GCS address) lets later commands find it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qvl.procs import free_port
from qvl.settings import ClusterSettings


class LocalHeadError(RuntimeError):
    """The local Ray head could not be started, or none is running where one was expected."""


@dataclass(frozen=True)
class LocalHead:
    pid: int
    address: str
    temp_dir: str
    log: str
    client_address: str = ""


def record_path(conf: ClusterSettings) -> Path:
    return Path(conf.run_dir).resolve() / "ray-local.json"


def recorded_head(conf: ClusterSettings) -> LocalHead | None:
    """The head this run_dir's record names, whether or not it still runs (see `is_running`)."""
    try:
        return LocalHead(**json.loads(record_path(conf).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def running_head(conf: ClusterSettings) -> LocalHead | None:
    """The head this run_dir's record names, if its process still runs."""
    head = recorded_head(conf)
    return head if head is not None and is_running(head) else None


def is_running(head: LocalHead) -> bool:
    return _alive(head.pid)


def start_head(conf: ClusterSettings, timeout_s: float = 60) -> LocalHead:
    """Start a head (GPUs and CPUs as `conf` declares them) and wait until its GCS accepts connections."""
    run_dir = Path(conf.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    # Ray puts unix sockets under its temp dir: keep the path short whatever run_dir is.
    temp_dir = Path(tempfile.gettempdir()) / f"qvl-ray-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:10]}"
    port, client_port = free_port(""), free_port("")
    argv = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--ray-client-server-port={client_port}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    if conf.local_gpus:
        argv.append(f"--num-gpus={conf.local_gpus}")
    if conf.local_cpus:
        argv.append(f"--num-cpus={conf.local_cpus}")
    log = run_dir / "ray-head.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # posix_spawn, not Popen: the head is meant to outlive this process, and a Popen object dropped
    # while its child runs is a resource leak as far as Python can tell.
    pid = os.posix_spawn(
        argv[0],
        argv,
        env,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ],
        setsid=True,
    )
    address = f"{_node_ip()}:{port}"
    deadline = time.monotonic() + timeout_s
    # `ray start` prints this once the GCS and the raylet are both up, and drivers can connect.
    while not (accepts(address) and "Ray runtime started" in log.read_text(errors="replace")):
        if not _alive(pid) or time.monotonic() > deadline:
            stop_head(LocalHead(pid, address, str(temp_dir), str(log)), grace_s=0)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise LocalHeadError(f"the local Ray head did not start; last lines of {log}:\n{tail}")
        time.sleep(0.3)
    head = LocalHead(pid, address, str(temp_dir), str(log), f"ray://{address.rpartition(':')[0]}:{client_port}")
    record_path(conf).write_text(json.dumps(asdict(head)))
    return head


def stop_head(head: LocalHead, grace_s: float = 5) -> None:
    """SIGTERM the head, then SIGKILL whatever of its session is left after `grace_s` (Ray would
    otherwise drain for 30 s; the replicas were stopped before this)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(head.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _alive(head.pid):
        time.sleep(0.2)
    for pid in _session_members(head.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    _alive(head.pid)  # reaps it when it is our child (a test's fixture)


def forget(conf: ClusterSettings) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(conf).unlink()


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == sid:
                    members.append(int(entry))
    return members


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # reap it if it is our child and has exited
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def accepts(address: str) -> bool:
    """Whether HOST:PORT (or ray://HOST:PORT) takes a TCP connection within a second."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except (OSError, ValueError):  # ValueError: no port in the address
        return False


def _node_ip() -> str:
    """The address Ray itself picks for this node (that of the default route)."""
    import ray

    return str(ray.util.get_node_ip_address())
