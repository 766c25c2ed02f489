"""The process helper: spawn in a group of its own, wait until a URL answers, stop the whole group."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from qvl.procs import StartError, answers, free_port, port_free, spawn

# A server that answers 200 on /health after `delay` seconds, and starts a grandchild (`sleep`) that
# shares its process group; it prints the grandchild's pid, and "listening" once its socket is bound.
SERVER = """
import http.server, subprocess, sys, time
port, delay = int(sys.argv[1]), float(sys.argv[2])
child = subprocess.Popen(["sleep", "300"])
print("grandchild", child.pid, flush=True)
time.sleep(delay)
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Health)
print("listening", flush=True)
server.serve_forever()
"""
# Ignores SIGTERM: only SIGKILL ends it.
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still has a pid: it counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def grandchild(log: Path) -> int:
    for _ in range(100):
        for line in log.read_text().splitlines():
            if line.startswith("grandchild "):
                return int(line.split()[1])
        time.sleep(0.05)
    raise AssertionError("no grandchild line in " + log.read_text())


def test_ready_when_the_url_answers_and_stop_ends_the_whole_group(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    child = spawn("server", [sys.executable, "-c", SERVER, str(port), "0.3"], url=f"http://127.0.0.1:{port}", log=log)
    try:
        assert child.port == port and os.getpgid(child.pid) == child.pid  # the leader of its own group
        waited = child.wait_ready(10, interval_s=0.05)
        # It returned because the server came up (it listens only after its 0.3 s delay), not at once.
        assert "listening" in log.read_text() and isinstance(waited, float)
        assert answers(child.url + "/health") and not answers(child.url + "/other")
        sleeper = grandchild(log)
        assert alive(sleeper)
    finally:
        child.stop(grace_s=5)
    assert child.poll() is not None
    deadline = time.monotonic() + 5
    while alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(sleeper)
    assert not answers(child.url + "/health")


def test_an_early_exit_fails_with_the_status_and_the_log_tail(tmp_path: Path) -> None:
    script = "import sys; print('\\n'.join(f'line {i}' for i in range(50))); sys.exit(3)"
    child = spawn("broken", [sys.executable, "-c", script], url="http://127.0.0.1:9", log=tmp_path / "b.log")
    with pytest.raises(StartError) as info:
        child.wait_ready(10, interval_s=0.05)
    message = str(info.value)
    assert message.startswith("broken exited with status 3 before it was ready")
    assert str(tmp_path / "b.log") in message
    assert message.endswith("line 49") and "line 19\n" not in message  # the last 30 lines only


def test_a_timeout_stops_the_child_and_names_the_url(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    child = spawn("slow", [sys.executable, "-c", SERVER, str(port), "60"], url=url, log=tmp_path / "s.log")
    with pytest.raises(StartError, match=rf"slow did not answer {url}/ready within 1s; last lines of"):
        child.wait_ready(1, "/ready", interval_s=0.05)
    assert child.poll() is not None


def test_a_readiness_check_and_cancellation() -> None:
    child = spawn("sleeper", ["sleep", "30"])
    try:
        assert child.log_tail() == "(no log file)" and child.output() == ""
        assert child.wait_ready(5, check=lambda: True) < 1
        with pytest.raises(StartError, match="sleeper: start-up interrupted"):
            child.wait_ready(5, check=lambda: False, cancelled=lambda: True)
        notes: list[str] = []
        with pytest.raises(StartError, match="sleeper was not ready within 0s"):
            child.wait_ready(0.2, check=lambda: False, interval_s=0.05, progress=notes.append)
        assert notes == []  # progress is said every 15 s
    finally:
        child.stop()


def test_stop_escalates_to_sigkill_after_the_grace(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    child = spawn("stubborn", [sys.executable, "-c", STUBBORN], log=log)
    child.wait_ready(10, check=lambda: "up" in child.output(), interval_s=0.05)
    started = time.monotonic()
    child.stop(grace_s=0.5)
    assert 0.4 < time.monotonic() - started < 5
    assert child.poll() == -signal.SIGKILL


def test_logs_append_when_asked(tmp_path: Path) -> None:
    log = tmp_path / "deep" / "folder" / "x.log"
    for word in ("one", "two"):
        child = spawn("echo", ["echo", word], log=log, append=True)
        child.popen.wait(10)
    assert log.read_text() == "one\ntwo\n"
    spawn("echo", ["echo", "three"], log=log).popen.wait(10)
    assert log.read_text() == "three\n"


def test_free_port_is_free_and_a_listening_port_is_not() -> None:
    port = free_port()
    assert port_free("127.0.0.1", port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_free("127.0.0.1", port)
        assert not answers(f"http://127.0.0.1:{free_port()}/health", timeout_s=0.5)
