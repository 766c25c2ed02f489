"""The processes qvl starts: free ports, and children spawned in a process group of their own, waited for
until a URL answers, and stopped as a group.

Every launcher (replicas, the GPU exporter, the Ray supervisor's servers), benchmark, tool and test fixture
starts its processes with `spawn` and stops them with `Child.stop`: a child's own children (vLLM's engine
workers) share its group, so one signal reaches them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1
# Health checks go straight to the child: never through an HTTP proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StartError(RuntimeError):
    """A child exited, or was not ready in time, or its start was cancelled; the message ends with its log's
    tail when there is one."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind `host:port` now, binding as servers do (SO_REUSEADDR): connections
    of a dead server in TIME_WAIT do not count as taken."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError:
        return False
    return True


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A preexec_fn: the child gets `sig` when the thread that forked it ends (Linux's PR_SET_PDEATHSIG;
    elsewhere nothing). The *thread*: fork from one that lives as long as the parent process."""

    def arrange() -> None:
        # Runs in the child between fork and exec.
        if sys.platform == "linux":
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)

    return arrange


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether GET `url` answers 200 within `timeout_s` (blocking; never through a proxy)."""
    try:
        with _DIRECT.open(url, timeout=timeout_s) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Child:
    """A process started by `spawn`: the leader of its own process group, its base URL and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    url: str = ""
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def port(self) -> int:
        """The port of `url` (0 without one)."""
        return urllib.parse.urlsplit(self.url).port or 0

    def poll(self) -> int | None:
        """The exit status once the process has exited, else None."""
        return self.popen.poll()

    def output(self) -> str:
        """Everything in its log file so far ("" without one)."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.exists():
            return "(no log file)"
        return "\n".join(self.output().splitlines()[-lines:])

    def wait_ready(
        self,
        timeout_s: float,
        path: str = "/health",
        *,
        check: Callable[[], bool] | None = None,
        interval_s: float = 0.5,
        progress: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> float:
        """Block until GET url+path answers 200 (or `check()` holds, when given); returns the seconds it
        took. Raises StartError when the process exits first, when `cancelled()` turns true, or after
        `timeout_s` (the process is stopped then). `progress` hears every 15 s that it is still starting."""
        ready = check or (lambda: answers(self.url + path))
        started = time.monotonic()
        next_note = started + 15
        while True:
            if cancelled():
                raise StartError(f"{self.name}: start-up interrupted")
            code = self.popen.poll()
            if code is not None:
                raise StartError(f"{self.name} exited with status {code} before it was ready; {self._tail_note()}")
            if ready():
                return time.monotonic() - started
            now = time.monotonic()
            if now - started > timeout_s:
                self.stop()
                what = "was not ready" if check is not None else f"did not answer {self.url}{path}"
                raise StartError(f"{self.name} {what} within {timeout_s:.0f}s; {self._tail_note()}")
            if progress is not None and now >= next_note:
                progress(f"{self.name}: still starting ({now - started:.0f}s)")
                next_note = now + 15
            time.sleep(interval_s)

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the process group, if the leader still runs."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it exited since the poll
                os.killpg(self.popen.pid, sig)

    def terminate(self) -> None:
        """SIGTERM the process group without waiting (stop several children at once, then stop() each)."""
        self.signal(signal.SIGTERM)

    def stop(self, grace_s: float = 20) -> None:
        """SIGTERM the process group, SIGKILL it if the leader still runs after `grace_s`, and reap the leader.
        What is left of the group once the leader is gone (orphaned workers) gets SIGKILL."""
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._killpg()
                self.popen.wait(10)
        self._killpg()

    def kill(self) -> None:
        """SIGKILL the process group now and reap the leader."""
        self._killpg()
        self.popen.wait(10)

    def _killpg(self) -> None:
        # The group's id is the leader's pid, which Linux does not hand out again while the group has
        # members: after the leader's end this reaches only its leftovers, or nobody (ESRCH).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def _tail_note(self) -> str:
        return f"last lines of {self.log or 'its output'}:\n{self.log_tail()}"


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    url: str = "",
    log: Path | None = None,
    append: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    preexec: Callable[[], None] | None = None,
) -> Child:
    """Start `argv` as the leader of a new process group (session), its stdout and stderr in `log` (created
    with its folder, appended to with `append`; None: this process's own output). `url` is where it will
    serve; `preexec` runs in the child before exec (see die_with_parent). Raises OSError when it cannot start."""
    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("ab" if append else "wb")
    try:
        popen = subprocess.Popen(
            list(argv),
            env=None if env is None else dict(env),
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
            preexec_fn=preexec,
        )
    finally:
        if out is not None:
            out.close()
    return Child(name=name, popen=popen, url=url, log=log)
