"""Factory fixtures that start real servers on free ports and kill them afterwards: `cluster` (`qvl`
processes) and `redis_server` (a redis-server the test can kill, pause and restart)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from support import ROOT

from qvl.procs import free_port


@dataclass
class Proc:
    """A running `qvl` process and the base URL it serves on."""

    url: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    """Starts `qvl sim`, `qvl router` and `qvl up` as subprocesses; everything is killed at teardown."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self, *args: str, port: int | None = None, ready_path: str = "/health", timeout: float = 60, auth: bool = False
    ) -> Proc:
        """Start `qvl ARGS --port P`. Routers (`router`, `up`) run with --no-auth unless `auth` is set:
        only the auth tests need keys; they pass them in the environment or a keys file."""
        port = port or free_port()
        if args[0] in ("router", "up") and not auth:
            args = (*args, "--no-auth")
        log = self.tmp / f"qvl-{len(self.procs)}-{args[0]}-{port}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "qvl", *args, "--port", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
                start_new_session=True,
            )
        proc = Proc(url=f"http://127.0.0.1:{port}", popen=popen, log=log, port=port)
        self.procs.append(proc)
        self.wait_ready(proc, ready_path, timeout)
        return proc

    def sim(self, *flags: str, model: str = "qwen3-vl-sim", port: int | None = None) -> Proc:
        return self.start("sim", "--model", model, *flags, port=port)

    def router(self, *replicas: Proc, flags: tuple[str, ...] = (), auth: bool = False) -> Proc:
        args = ["router"]
        for replica in replicas:
            args += ["--replica", replica.url]
        return self.start(*args, *flags, ready_path="/ready", auth=auth)

    def wait_ready(self, proc: Proc, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"process exited with {proc.popen.returncode}:\n{proc.output()}")
            try:
                if httpx.get(proc.url + path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{proc.url}{path} not ready after {timeout}s:\n{proc.output()}")

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


@dataclass
class RedisServer:
    """One redis-server process on a fixed port; kill(), pause() and restart() act on it in place."""

    port: int
    workdir: Path
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH; `make install` installs it (apt-get install redis-server)")
        log = self.workdir / f"redis-{self.port}.log"
        # No persistence: a restarted server comes back empty, like a lost cache.
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with log.open("ab") as out:
            self.popen = subprocess.Popen([*args, "--dir", str(self.workdir)], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._pong():
            if self.popen.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.popen.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server on port {self.port} not answering PING after {timeout}s")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: the port refuses connections at once, established ones are reset."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)  # a paused server must be able to die
            self.popen.kill()
            self.popen.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung Redis)."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Kill if running, then start again on the same port (empty: nothing is persisted)."""
        self.kill()
        self.start()

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.kill()
