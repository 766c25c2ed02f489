"""`qvl up`: local replicas as child processes and a router in front, as one foreground process tree.

Replicas get the same resolved settings as the parent (written to a private YAML file) and die with
it: SIGINT/SIGTERM stops the router, then every child; a parent killed outright takes its children
along through PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn
import yaml

from qvl.settings import Settings
from router.server import uvicorn_config

log = logging.getLogger("qvl.up")
_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    name: str
    url: str
    popen: subprocess.Popen[bytes]


def run_up(settings: Settings) -> int:
    """Start replicas, wait until each is healthy, serve the router until a signal; returns exit status."""
    if settings.up.engine != "sim":
        print("qvl: --engine vllm is not available yet in this version; use --engine sim", file=sys.stderr)
        return 2
    received: list[int] = []

    def remember(sig: int, frame: FrameType | None) -> None:
        received.append(sig)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    with tempfile.TemporaryDirectory(prefix="qvl-up-") as tmp:
        children: list[Child] = []
        try:
            config = Path(tmp) / "settings.yaml"
            config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
            ports = _replica_ports(settings.up.replica_base_port, settings.up.replicas)
            print(f"qvl: starting {len(ports)} {settings.up.engine} replica(s) on ports {ports}", flush=True)
            children = [_spawn_sim(config, port, i) for i, port in enumerate(ports)]
            if not _wait_healthy(children, settings.up.ready_timeout_s, lambda: bool(received)):
                return 1
            router_settings = settings.router.model_copy(update={"replicas": [c.url for c in children]})
            settings = settings.model_copy(update={"router": router_settings})
            return _serve_router(settings, children)
        finally:
            _stop(children)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _serve_router(settings: Settings, children: list[Child]) -> int:
    config = uvicorn_config(settings)
    server = uvicorn.Server(config)

    async def main() -> None:
        async def announce() -> None:
            while not server.started:
                if server.should_exit:
                    return
                await asyncio.sleep(0.05)
            url = f"http://{settings.router.host}:{settings.router.port}"
            names = ", ".join(c.url for c in children)
            print(f"qvl: ready at {url} (policy {settings.router.policy}; replicas {names})", flush=True)

        async def watch_children() -> None:
            reported: set[str] = set()
            while True:
                for child in children:
                    code = child.popen.poll()
                    if code is not None and child.name not in reported:
                        reported.add(child.name)
                        log.error("replica %s (%s) exited with status %s", child.name, child.url, code)
                await asyncio.sleep(1.0)

        tasks = [asyncio.create_task(announce()), asyncio.create_task(watch_children())]
        try:
            await server.serve()
        finally:
            for task in tasks:
                task.cancel()

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())
    return 0 if server.started else 1


def _replica_ports(base: int, count: int) -> list[int]:
    if base:
        return [base + i for i in range(count)]
    ports = []
    for _ in range(count):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
    return ports


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: a replica must not outlive a killed `qvl up`.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn_sim(config: Path, port: int, index: int) -> Child:
    argv = [sys.executable, "-m", "qvl", "sim", "--config", str(config), "--port", str(port)]
    popen = subprocess.Popen(argv, preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    return Child(name=f"replica-{index}", url=f"http://127.0.0.1:{port}", popen=popen)


def _wait_healthy(children: list[Child], timeout_s: float, interrupted: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + timeout_s
    pending = list(children)
    while pending:
        if interrupted():
            return False
        for child in list(pending):
            code = child.popen.poll()
            if code is not None:
                print(f"qvl: {child.name} exited with status {code} before it was healthy", file=sys.stderr)
                return False
            if _healthy(child.url):
                pending.remove(child)
                print(f"qvl: {child.name} healthy at {child.url}", flush=True)
        if time.monotonic() > deadline:
            names = ", ".join(c.name for c in pending)
            print(f"qvl: {names} not healthy after {timeout_s:.0f}s", file=sys.stderr)
            return False
        time.sleep(0.1)
    return True


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(children: list[Child]) -> None:
    for child in children:
        if child.popen.poll() is None:
            child.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for child in children:
        try:
            child.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.popen.kill()
            child.popen.wait()
    if children:
        print(f"qvl: stopped {len(children)} replica(s)", flush=True)
