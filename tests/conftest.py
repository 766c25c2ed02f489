"""One factory fixture, `cluster`, that starts real `qvl` processes on free ports and kills them afterwards."""

from __future__ import annotations

import base64
import io
import os
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
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_data_url(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)) -> str:
    """A small, real PNG as a data URL; a different colour gives a different image digest."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_chat(model: str, image_url: str, text: str = "What is in this photo?", **extra: object) -> dict:
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": image_url}},
                ],
            }
        ],
        **extra,
    }


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

    def start(self, *args: str, port: int | None = None, ready_path: str = "/health", timeout: float = 60) -> Proc:
        port = port or free_port()
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

    def router(self, *replicas: Proc, flags: tuple[str, ...] = ()) -> Proc:
        args = ["router"]
        for replica in replicas:
            args += ["--replica", replica.url]
        return self.start(*args, *flags, ready_path="/ready")

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
