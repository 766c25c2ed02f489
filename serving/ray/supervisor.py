"""The Ray actor that runs one replica's server on the node Ray placed it on, and keeps it running.

`ReplicaSupervisor` is an async Ray actor, created in bundle 0 of the replica's placement group
(serving/ray/cluster.py). It learns its GPUs from Ray (its own bundle's, plus one probe task per
other bundle), starts its engine's server (serving/engines.py) with exactly those GPUs, announces the
replica in the registry while it is healthy, and restarts the server when it exits or stops answering,
with exponential backoff and at most `cluster.max_restarts` restarts per `cluster.restart_window_s`.

Every blocking step (process stop, health checks, building the tiny model) runs in a thread: the
actor's event loop only waits, so `info()` answers while a replica is starting. Only the fork itself
stays on the loop's thread (see `_launch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qvl.engine_metrics import engine_busy
from qvl.procs import Child, answers, die_with_parent, free_port, port_free, spawn
from qvl.settings import PoolSettings, Settings, load_settings
from serving.engines import ENGINES, ReplicaCommand
from serving.registry import Member, Registry, RegistryUnavailable

log = logging.getLogger("qvl.cluster.replica")
State = Literal["starting", "healthy", "unhealthy", "restarting", "failed", "draining", "stopped"]
# A replica that answers no health check this many times in a row is restarted (a hung server).
_HUNG_AFTER_FAILED_CHECKS = 3


@dataclass(frozen=True)
class Placement:
    """Where Ray put a replica: its node and the GPU ids of every bundle."""

    node_id: str
    node_ip: str
    gpus: tuple[int, ...]


def _gpu_ids() -> list[int]:
    return [int(g) for g in ray.get_gpu_ids()]


# One GPU of a bundle, held just long enough to read which one it is.
_bundle_gpus = ray.remote(num_gpus=1, num_cpus=0)(_gpu_ids)


class ReplicaSupervisor:
    """One replica: placement facts, the server process, its registry announcement."""

    def __init__(
        self,
        replica_id: str,
        settings: dict[str, Any],
        placement_group: PlacementGroup,
        pool: dict[str, Any] | None = None,
    ) -> None:
        # The driver's settings, passed whole (a pool's replica: already the pool's): flags beat the
        # actor's environment.
        self._settings: Settings = load_settings(None, settings)
        self._pool = PoolSettings.model_validate(pool) if pool is not None else None
        self._id = replica_id
        self._pg = placement_group
        self._state: State = "starting"
        self._engine = ENGINES[self._settings.cluster.engine]
        self._server: Child | None = None
        self._placement: Placement | None = None
        self._port = 0
        self._started_at = 0.0
        self._restarts: deque[float] = deque()
        self._restarts_total = 0
        self._last_exit: str | None = None
        self._workdir = Path(self._settings.replica.run_dir).resolve() / "cluster" / replica_id
        reg = self._settings.registry
        self._registry = (
            Registry(reg.url, ttl_s=reg.ttl_s, timeout_s=reg.timeout_s, key_prefix=reg.key_prefix) if reg.url else None
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> dict[str, Any]:
        """Start the server and wait until it is healthy; then supervise it. Returns `info()`.
        Raises RuntimeError (its log's tail in the message) when the first start fails."""
        self._placement = await self._place()
        self._port = free_port(self._host())
        await self._launch()
        if not await self._wait_healthy():
            tail = self._server.log_tail() if self._server is not None else "(not started)"
            message = f"{self._id} did not become healthy: {self._last_exit}\n{tail}"
            await self.stop()
            raise RuntimeError(message)
        self._tasks = [asyncio.create_task(self._supervise()), asyncio.create_task(self._heartbeat())]
        await self._announce()
        return self.info()

    def info(self) -> dict[str, Any]:
        """What `qvl cluster status` shows, as JSON-able values."""
        p = self._placement
        return {
            "replica": self._id,
            "node_id": p.node_id if p else "",
            "node_ip": p.node_ip if p else "",
            "gpus": list(p.gpus) if p else [],
            "url": self.url if self._port else "",
            "state": self._state,
            "healthy": self._state == "healthy",
            "started_at": self._started_at,
            "restarts": self._restarts_total,
            "pid": self._server.pid if self._server is not None else None,
            "supervisor_pid": os.getpid(),
            "last_exit": self._last_exit,
            "engine": self._settings.cluster.engine,
            "model": self._engine.served_model(self._settings),
            "pool": self._pool.name if self._pool is not None else "",
            "version": self._pool.version if self._pool is not None else "",
            "settings": self._settings.model_dump(mode="json", exclude={"api_keys"}),
        }

    @property
    def url(self) -> str:
        return f"http://{self._host()}:{self._port}"

    async def drain(self, settle_s: float, timeout_s: float) -> dict[str, Any]:
        """Leave the registry, wait `settle_s` for every router to have read it (no new requests come after),
        then until the engine has no request running or waiting, at most `timeout_s` in all; then stop.
        Returns {"drained": whether it emptied in time, "waited_s", "left": requests still there}. The
        server is not restarted meanwhile (supervision stops first)."""
        began = time.monotonic()
        self._state = "draining"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._registry is not None:
            with contextlib.suppress(RegistryUnavailable):
                await self._registry.withdraw(self._id)
        await asyncio.sleep(settle_s)
        left = await asyncio.to_thread(self._busy)
        while left and time.monotonic() - began < timeout_s:
            await asyncio.sleep(0.5)
            left = await asyncio.to_thread(self._busy)
        waited = time.monotonic() - began
        log.info("%s: drained in %.1fs (%d request(s) left)", self._id, waited, left)
        await self.stop()
        return {"drained": left == 0, "waited_s": waited, "left": left}

    def _busy(self) -> int:
        """Requests running or waiting on the engine (0 once it no longer answers: nothing left to wait for)."""
        try:
            text = httpx.get(self.url + "/metrics", timeout=5).text
        except httpx.HTTPError:
            return 0
        return engine_busy(text)

    async def stop(self) -> None:
        """Withdraw from the registry and stop the server (SIGTERM, then SIGKILL after 20 s)."""
        self._state = "stopped"
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._registry is not None:
            with contextlib.suppress(RegistryUnavailable):
                await self._registry.withdraw(self._id)
            await self._registry.close()
        await asyncio.to_thread(self._kill)

    # -- placement and process ------------------------------------------------------------------

    async def _place(self) -> Placement:
        context = ray.get_runtime_context()
        gpus = _gpu_ids()
        bundles = len(self._pg.bundle_specs)
        if gpus:
            for index in range(1, bundles):
                strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=index)
                gpus += await _bundle_gpus.options(scheduling_strategy=strategy).remote()
        return Placement(context.get_node_id(), ray.util.get_node_ip_address(), tuple(gpus))

    def _host(self) -> str:
        assert self._placement is not None
        return self._settings.cluster.replica_host or self._placement.node_ip

    async def _launch(self) -> None:
        self._state = "starting"
        command = await asyncio.to_thread(self._prepare)
        # Forked from the event loop's thread, which lives as long as the actor: PR_SET_PDEATHSIG
        # fires when the forking *thread* ends, so a worker thread of to_thread could kill the server.
        self._server = spawn(
            self._id,
            command.argv,
            url=self.url,
            log=self._workdir / "server.log",
            append=True,
            env=command.env,
            preexec=_die_with_parent,
        )
        self._started_at = time.time()
        log.info("%s: %s started (pid %d) at %s", self._id, command.summary, self._server.pid, self.url)

    def _prepare(self) -> ReplicaCommand:
        """The server's command (blocking: the vllm engine builds the tiny model on this node if no model is set)."""
        assert self._placement is not None
        return self._engine.command(self._settings, self._host(), self._port, self._placement.gpus, self._workdir)

    def _kill(self) -> None:
        if self._server is not None:
            self._server.stop()

    async def _wait_healthy(self) -> bool:
        """Until /health answers 200 (True), or the process exits or startup_timeout_s passes (False)."""
        timeout = self._settings.replica.startup_timeout_s
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._exited():
                return False
            if await asyncio.to_thread(answers, self.url + "/health"):
                self._state = "healthy"
                return True
            await asyncio.sleep(0.5)
        self._last_exit = f"no answer on {self.url}/health within {timeout:.0f}s"
        await asyncio.to_thread(self._kill)
        return False

    def _exited(self) -> bool:
        assert self._server is not None
        code = self._server.poll()
        if code is None:
            return False
        self._last_exit = f"server exited with status {code} at {time.strftime('%H:%M:%S')}"
        return True

    # -- supervision -----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        conf = self._settings.cluster
        failed_checks = 0
        while True:
            await asyncio.sleep(conf.health_interval_s)
            if self._exited():
                log.warning("%s: %s", self._id, self._last_exit)
            elif await asyncio.to_thread(answers, self.url + "/health"):
                failed_checks = 0
                self._state = "healthy"
                continue
            else:
                failed_checks += 1
                self._state = "unhealthy"
                if failed_checks < _HUNG_AFTER_FAILED_CHECKS:
                    continue
                self._last_exit = f"no answer to {failed_checks} health checks in a row"
                log.warning("%s: %s; restarting it", self._id, self._last_exit)
                await asyncio.to_thread(self._kill)
            failed_checks = 0
            if not await self._restart():
                return

    async def _restart(self) -> bool:
        """Withdraw, back off, start again; False when the restart budget is spent (state failed)."""
        conf = self._settings.cluster
        self._state = "restarting"
        if self._registry is not None:
            with contextlib.suppress(RegistryUnavailable):
                await self._registry.withdraw(self._id)
        while True:
            now = time.monotonic()
            while self._restarts and now - self._restarts[0] > conf.restart_window_s:
                self._restarts.popleft()
            if len(self._restarts) >= conf.max_restarts:
                self._state = "failed"
                log.error(
                    "%s: %d restarts within %.0fs; giving up (%s)",
                    self._id,
                    len(self._restarts),
                    conf.restart_window_s,
                    self._last_exit,
                )
                return False
            delay = min(conf.restart_backoff_s * 2 ** len(self._restarts), conf.restart_backoff_max_s)
            self._restarts.append(now)
            self._restarts_total += 1
            log.info("%s: restart %d in %.1fs", self._id, self._restarts_total, delay)
            await asyncio.sleep(delay)
            if not port_free(self._host(), self._port):
                self._port = free_port(self._host())
            await self._launch()
            if await self._wait_healthy():
                await self._announce()
                return True
            self._state = "restarting"

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self._settings.registry.ttl_s / 3)
            if self._state == "healthy":
                await self._announce()

    async def _announce(self) -> None:
        if self._registry is None or self._placement is None:
            return
        member = Member(
            replica_id=self._id,
            model=self._engine.served_model(self._settings),
            url=self.url,
            tensor_parallel_size=max(1, len(self._placement.gpus)),
            node=self._placement.node_ip,
            started_at=self._started_at,
            pool=self._pool.name if self._pool is not None else "",
            version=self._pool.version if self._pool is not None else "",
        )
        try:
            await self._registry.announce(member)
        except RegistryUnavailable as exc:
            log.warning("%s: cannot announce to the registry: %s", self._id, exc)


# Forked from the event loop's thread (see _launch): the server must not outlive its supervisor,
# with it gone nobody would withdraw or restart it.
_die_with_parent = die_with_parent(signal.SIGKILL)
