"""Local launchers: `qvl up` (replicas and a router as one foreground process tree) and `qvl replica`.

Replicas die with their launcher: SIGINT/SIGTERM stops the router, then every replica's process
group; a launcher killed outright takes its replicas along through PR_SET_PDEATHSIG. Beside vLLM
replicas (not simulated ones) the launcher also starts this host's GPU exporter, the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn
import yaml

from qvl.procs import die_with_parent, free_port, port_free
from qvl.settings import ReplicaSettings, Settings
from router.auth import AuthConfigError, KeyRing
from router.server import uvicorn_config
from serving.gpu_exporter import exporter_command
from serving.tiny_model import SERVED_NAME, ensure_tiny_model
from serving.vllm_replica import (
    PlacementError,
    ReplicaPlan,
    ReplicaProcess,
    ReplicaStartError,
    detect_gpus,
    launch,
    plan_replicas,
    served_name,
)

log = logging.getLogger("qvl.up")


def run_up(settings: Settings) -> int:
    """Start replicas, wait until each is healthy, serve the router until a signal; returns exit status."""
    settings = _apply_up_model(settings)
    stop_requested: list[int] = []
    previous = _trap_signals(stop_requested)
    children: list[ReplicaProcess] = []
    exporter: ReplicaProcess | None = None
    try:
        # The router's keys are checked before any replica starts: a bad keys file fails in a second.
        KeyRing.from_settings(settings)
        with tempfile.TemporaryDirectory(prefix="qvl-up-") as tmp:
            ports = _replica_ports(settings.up.replica_base_port, settings.up.replicas)
            engine = settings.up.engine
            say(f"starting {len(ports)} {engine} replica(s) on ports {', '.join(map(str, ports))}")
            if engine == "sim":
                config = Path(tmp) / "settings.yaml"
                config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
                children = [_spawn_sim(config, port, i) for i, port in enumerate(ports)]
                timeout = settings.up.ready_timeout_s
            else:
                exporter = _spawn_gpu_exporter(settings, log_dir=Path(settings.replica.run_dir).resolve())
                children = _spawn_vllm(settings.replica, ports)
                timeout = max(settings.up.ready_timeout_s, settings.replica.startup_timeout_s)
            for child in children:
                seconds = child.wait_healthy(timeout, progress=say, cancelled=lambda: bool(stop_requested))
                say(f"{child.name} healthy at {child.url} after {seconds:.1f}s")
            router = settings.router.model_copy(update={"replicas": [c.url for c in children]})
            return _serve_router(settings.model_copy(update={"router": router}), children, exporter)
    except (ReplicaStartError, PlacementError, AuthConfigError) as exc:
        print(f"qvl: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(children, exporter)
        _restore_signals(previous)


def run_replica(settings: Settings) -> int:
    """`qvl replica`: one vLLM server in the foreground (its log on this terminal) until a signal."""
    stop_requested: list[int] = []
    previous = _trap_signals(stop_requested)
    replica: ReplicaProcess | None = None
    exporter: ReplicaProcess | None = None
    try:
        exporter = _spawn_gpu_exporter(settings, log_dir=None)
        model, spec = _model_for(settings.replica)
        (plan,) = _plans(spec, model, [spec.port])
        replica = launch(plan, spec.host, log_to_file=False)
        seconds = replica.wait_healthy(spec.startup_timeout_s, progress=say, cancelled=lambda: bool(stop_requested))
        say(f"ready at {replica.url} serving {spec.served_model_name} ({plan.device}) after {seconds:.1f}s")
        while replica.popen.poll() is None and not stop_requested:
            time.sleep(0.5)
        return 0 if stop_requested else int(replica.popen.returncode or 0)
    except (ReplicaStartError, PlacementError) as exc:
        print(f"qvl: {exc}", file=sys.stderr)
        return 1
    finally:
        if exporter is not None:
            exporter.terminate()
        if replica is not None:
            replica.stop()
        if exporter is not None:
            exporter.stop()
        _restore_signals(previous)


def say(message: str) -> None:
    print(f"qvl: {message}", flush=True)


def _apply_up_model(settings: Settings) -> Settings:
    if settings.up.model is None:
        return settings
    if settings.up.engine == "sim":
        return settings.model_copy(update={"sim": settings.sim.model_copy(update={"model": settings.up.model})})
    return settings.model_copy(update={"replica": settings.replica.model_copy(update={"model": settings.up.model})})


def _model_for(spec: ReplicaSettings) -> tuple[str, ReplicaSettings]:
    """The checkpoint to serve and the spec with its served name filled in; builds the tiny model if none."""
    if spec.model is not None:
        model = spec.model
        if not Path(model).exists():
            raise ReplicaStartError(f"model path {model} does not exist (models are never downloaded)")
    else:
        target = Path(spec.run_dir).resolve() / "tiny-model"
        say(f"no model given: using the tiny test model at {target} (built on first use)")
        model = str(ensure_tiny_model(target))
        if spec.served_model_name is None:
            spec = spec.model_copy(update={"served_model_name": SERVED_NAME})
    if spec.served_model_name is None:
        spec = spec.model_copy(update={"served_model_name": served_name(spec, model)})
    return model, spec


def _plans(spec: ReplicaSettings, model: str, ports: list[int]) -> list[ReplicaPlan]:
    gpus = spec.gpus if spec.gpus is not None else detect_gpus()
    return plan_replicas(spec, model, ports, gpus, Path(spec.run_dir).resolve(), os.environ)


def _spawn_vllm(spec: ReplicaSettings, ports: list[int]) -> list[ReplicaProcess]:
    model, spec = _model_for(spec)
    children = []
    for plan in _plans(spec, model, ports):
        child = launch(plan, spec.host, preexec=_die_with_parent)
        where = f"GPUs {','.join(map(str, plan.gpus))}" if plan.gpus else "the CPU"
        say(f"{plan.name}: vLLM on {where} serving {spec.served_model_name}; log {child.log}")
        children.append(child)
    return children


def _spawn_gpu_exporter(settings: Settings, log_dir: Path | None) -> ReplicaProcess | None:
    """Start the host's `qvl gpu-exporter` without waiting for it (it answers within a second, and with
    `up 0` where there is no NVML). None when switched off, or when its port is taken: one exporter per
    host, and another `qvl replica` or `qvl up` here already started it (or something else holds the port)."""
    if not settings.up.gpu_exporter:
        return None
    conf = settings.gpu_exporter
    if not port_free(conf.host, conf.port):
        say(f"GPU exporter not started: {conf.host}:{conf.port} is in use (another exporter on this host?)")
        return None
    log = None if log_dir is None else log_dir / f"gpu-exporter-{conf.port}.log"
    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("wb")
    try:
        popen = subprocess.Popen(
            exporter_command(conf, settings.log_level),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        if out is not None:
            out.close()
    url = f"http://{conf.host}:{conf.port}"
    say(f"GPU exporter at {url}/metrics" + (f"; log {log}" if log else ""))
    # Not a replica (the router never sees it), but the same handle: poll, terminate, stop the group.
    return ReplicaProcess(name="gpu-exporter", url=url, popen=popen, log=log)


def _spawn_sim(config: Path, port: int, index: int) -> ReplicaProcess:
    argv = [sys.executable, "-m", "qvl", "sim", "--config", str(config), "--port", str(port)]
    popen = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent)
    return ReplicaProcess(name=f"replica-{index}", url=f"http://127.0.0.1:{port}", popen=popen, log=None)


def _serve_router(settings: Settings, children: list[ReplicaProcess], exporter: ReplicaProcess | None) -> int:
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
            gpu = f"; GPU metrics {exporter.url}/metrics" if exporter is not None else ""
            say(f"ready at {url} (policy {settings.router.policy}; replicas {names}{gpu})")

        async def watch_children() -> None:
            reported: set[str] = set()
            watched = [*children, *([exporter] if exporter is not None else [])]
            while True:
                for child in watched:
                    code = child.popen.poll()
                    if code is not None and child.name not in reported:
                        reported.add(child.name)
                        log.error("%s (%s) exited with status %s", child.name, child.url, code)
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


def _trap_signals(received: list[int]) -> dict[int, Callable[[int, FrameType | None], object] | int | None]:
    def remember(sig: int, frame: FrameType | None) -> None:
        received.append(sig)

    return {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signals(previous: dict[int, Callable[[int, FrameType | None], object] | int | None]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _replica_ports(base: int, count: int) -> list[int]:
    if base:
        return [base + i for i in range(count)]
    return [free_port() for _ in range(count)]


_die_with_parent = die_with_parent(signal.SIGTERM)  # a replica must not outlive a killed launcher


def _stop(children: list[ReplicaProcess], exporter: ReplicaProcess | None = None) -> None:
    everything = [*children, *([exporter] if exporter is not None else [])]
    for child in everything:
        child.terminate()  # all at once: each vLLM replica takes seconds to shut down
    for child in everything:
        child.stop()
    if children:
        say(f"stopped {len(children)} replica(s)" + (" and the GPU exporter" if exporter is not None else ""))
