"""Local launchers: `qvl up` (replicas and a router as one foreground process tree) and `qvl replica`.

Replicas die with their launcher: SIGINT/SIGTERM stops the router, then every replica's process
group; a launcher killed outright takes its replicas along through PR_SET_PDEATHSIG. Beside vLLM
replicas (not simulated ones) the launcher also starts this host's GPU exporter, the same way.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from qvl.procs import Child, StartError, die_with_parent, free_port, port_free, spawn
from qvl.settings import Settings
from router.auth import AuthConfigError, KeyRing
from router.server import uvicorn_config
from serving.engines import ENGINES, Engine
from serving.gpu_exporter import exporter_command
from serving.vllm_replica import PlacementError

log = logging.getLogger("qvl.up")


def run_up(settings: Settings) -> int:
    """Start replicas, wait until each is healthy, serve the router until a signal; returns exit status."""
    engine = ENGINES[settings.up.engine]
    if settings.up.model is not None:
        settings = engine.with_model(settings, settings.up.model)
    stop_requested: list[int] = []
    previous = _trap_signals(stop_requested)
    children: list[Child] = []
    exporter: Child | None = None
    try:
        # The router's keys are checked before any replica starts: a bad keys file fails in a second.
        KeyRing.from_settings(settings)
        with tempfile.TemporaryDirectory(prefix="qvl-up-") as tmp:
            pools = _pool_settings(engine, settings)
            ports = _replica_ports(settings.up.replica_base_port, len(pools))
            say(f"starting {len(ports)} {settings.up.engine} replica(s) on ports {', '.join(map(str, ports))}")
            local = engine.local(settings, len(ports))
            run_dir = Path(settings.replica.run_dir).resolve()
            if local.gpu_exporter:
                exporter = _spawn_gpu_exporter(settings, log_dir=run_dir)
            for port, gpus, cpus, own in zip(ports, local.gpus, local.cpus, pools, strict=True):
                workdir = (run_dir if local.log_name else Path(tmp)) / f"replica-{port}"
                log_file = workdir / local.log_name if local.log_name else None
                children.append(_spawn_replica(engine, own, local.host, port, gpus, cpus, workdir, log_file))
            for child in children:
                seconds = child.wait_ready(
                    local.startup_timeout_s, progress=say, cancelled=lambda: bool(stop_requested)
                )
                say(f"{child.name} healthy at {child.url} after {seconds:.1f}s")
            router = settings.router.model_copy(update={"replicas": [c.url for c in children]})
            if exporter is not None and exporter.url not in router.console.gpu_exporters:
                # The console's operations page shows this host's GPUs from the exporter started here.
                console = router.console.model_copy(
                    update={"gpu_exporters": [*router.console.gpu_exporters, exporter.url]}
                )
                router = router.model_copy(update={"console": console})
            return _serve_router(settings.model_copy(update={"router": router}), children, exporter)
    except (StartError, PlacementError, AuthConfigError) as exc:
        print(f"qvl: {exc}", file=sys.stderr)
        return 1
    finally:
        _stop(children, exporter)
        _restore_signals(previous)


def run_replica(settings: Settings) -> int:
    """`qvl replica`: one vLLM server in the foreground (its log on this terminal) until a signal."""
    stop_requested: list[int] = []
    previous = _trap_signals(stop_requested)
    replica: Child | None = None
    exporter: Child | None = None
    try:
        engine, spec = ENGINES["vllm"], settings.replica
        exporter = _spawn_gpu_exporter(settings, log_dir=None)
        local = engine.local(settings, 1)
        workdir = Path(spec.run_dir).resolve() / f"replica-{spec.port}"
        command = engine.command(settings, spec.host, spec.port, local.gpus[0], workdir, local.cpus[0])
        replica = spawn(f"replica-{spec.port}", command.argv, url=f"http://{spec.host}:{spec.port}", env=command.env)
        seconds = replica.wait_ready(spec.startup_timeout_s, progress=say, cancelled=lambda: bool(stop_requested))
        say(f"ready at {replica.url} serving {engine.served_model(settings)} ({command.summary}) after {seconds:.1f}s")
        while replica.poll() is None and not stop_requested:
            time.sleep(0.5)
        return 0 if stop_requested else int(replica.popen.returncode or 0)
    except (StartError, PlacementError) as exc:
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


def _pool_settings(engine: Engine, settings: Settings) -> list[Settings]:
    """The settings of each replica to start: up.replicas of the engine's model, or every pool's replicas
    in the order of `pools` (they share the host's GPUs or cores, split as replica.* says)."""
    if not settings.pools:
        return [settings] * settings.up.replicas
    own: list[Settings] = []
    for pool in settings.pools:
        if pool.tensor_parallel_size not in (None, settings.replica.tensor_parallel_size):
            raise StartError(
                f"pool {pool.name}: qvl up places every replica with replica.tensor_parallel_size "
                f"({settings.replica.tensor_parallel_size}); use qvl cluster up for pools that differ"
            )
        pool_settings = engine.for_pool(settings, pool)
        own += [pool_settings] * pool.replicas
        say(f"pool {pool.name}: {pool.replicas} replica(s) of {pool.model} version {pool.version}")
    return own


def say(message: str) -> None:
    print(f"qvl: {message}", flush=True)


def _spawn_replica(
    engine: Engine,
    settings: Settings,
    host: str,
    port: int,
    gpus: tuple[int, ...],
    cpus: tuple[int, ...],
    workdir: Path,
    log: Path | None,
) -> Child:
    command = engine.command(settings, host, port, gpus, workdir, cpus)
    name = f"replica-{port}"
    child = spawn(name, command.argv, url=f"http://{host}:{port}", log=log, env=command.env, preexec=_die_with_parent)
    note = f"; log {log}" if log is not None else ""
    say(f"{name}: {command.summary} serving {engine.served_model(settings)}{note}")
    return child


def _spawn_gpu_exporter(settings: Settings, log_dir: Path | None) -> Child | None:
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
    url = f"http://{conf.host}:{conf.port}"
    command = exporter_command(conf, settings.log_level)
    exporter = spawn("gpu-exporter", command, url=url, log=log, preexec=_die_with_parent)
    say(f"GPU exporter at {url}/metrics" + (f"; log {log}" if log else ""))
    return exporter


def _serve_router(settings: Settings, children: list[Child], exporter: Child | None) -> int:
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
            console = f"; console {url}/console" if settings.router.console.enabled else ""
            say(f"ready at {url} (policy {settings.router.policy}; replicas {names}{gpu}{console})")

        async def watch_children() -> None:
            reported: set[str] = set()
            watched = [*children, *([exporter] if exporter is not None else [])]
            while True:
                for child in watched:
                    code = child.poll()
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


def _stop(children: list[Child], exporter: Child | None = None) -> None:
    everything = [*children, *([exporter] if exporter is not None else [])]
    for child in everything:
        child.terminate()  # all at once: each vLLM replica takes seconds to shut down
    for child in everything:
        child.stop()
    if children:
        say(f"stopped {len(children)} replica(s)" + (" and the GPU exporter" if exporter is not None else ""))
