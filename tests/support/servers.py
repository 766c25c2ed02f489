"""Real servers for tests, each on a free port: `Cluster` starts `qvl` processes (`qvl sim`, `qvl router`,
`qvl up`, ...), `RedisServer` one redis-server the test can kill, pause and restart. The `cluster` and
`redis_server` fixtures in conftest.py build them and stop them afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from qvl.procs import Child, free_port, spawn
from support import ROOT

Proc = Child
"""A running `qvl` process: its base URL and port, log file (`output()`), `kill()` (qvl/procs.py)."""


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
        argv = [sys.executable, "-m", "qvl", *args, "--port", str(port)]
        proc = spawn(f"qvl {args[0]}", argv, url=f"http://127.0.0.1:{port}", log=log, env=env, cwd=ROOT)
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
        """Until GET proc.url+path answers 200; StartError (with the log's tail) if it exits or times out."""
        proc.wait_ready(timeout, path, interval_s=0.05)

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.stop(grace_s=10)


@dataclass
class RedisServer:
    """One redis-server process on a fixed port; kill(), pause() and restart() act on it in place."""

    port: int
    workdir: Path
    args: tuple[str, ...] = ()
    """More redis-server arguments, such as ("--replicaof", "127.0.0.1", "6379")."""
    child: Child | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH; `make install` installs it (apt-get install redis-server)")
        log = self.workdir / f"redis-{self.port}.log"
        # No persistence: a restarted server comes back empty, like a lost cache.
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *self.args]
        self.child = spawn("redis-server", [*args, "--dir", str(self.workdir)], log=log, append=True)
        self.child.wait_ready(timeout, check=self._pong, interval_s=0.02)

    def kill(self) -> None:
        """SIGKILL: the port refuses connections at once, established ones are reset."""
        if self.child is not None:
            self.child.signal(signal.SIGCONT)  # a paused server must be able to die
            self.child.kill()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung Redis)."""
        assert self.child is not None
        self.child.signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.child is not None
        self.child.signal(signal.SIGCONT)

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


def sim_pid(port: int) -> int:
    """The `qvl sim` process (a child of `qvl up`, say) listening on `port`."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "sim" in cmdline and str(port) in cmdline:
            return int(proc.pid)
    raise LookupError(f"no qvl sim process on port {port}")
