"""A Redis primary, its replica and three sentinels watching them, on free ports: what a Sentinel URL
(`redis+sentinel://H1:P1,H2:P2,H3:P3/SERVICE/0`) names. The `redis_sentinels` fixture in conftest.py
starts one and stops it afterwards; a test kills the primary and waits for the replica's promotion."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from qvl.procs import Child, free_port, spawn
from support.polling import wait_for
from support.servers import RedisServer

SERVICE = "qvl-primary"
DOWN_AFTER_MS = 1000
"""How long the primary must be silent before a sentinel deems it down (Sentinel's default is 30 s)."""
FAILOVER_TIMEOUT_MS = 5000


@dataclass
class SentinelGroup:
    """One primary, one replica (`replicaof`), three sentinels (`sentinel monitor SERVICE ... 2`)."""

    workdir: Path
    primary: RedisServer = field(init=False)
    replica: RedisServer = field(init=False)
    sentinels: list[Child] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.primary = RedisServer(port=free_port(), workdir=self.workdir)
        replica_of = ("--replicaof", "127.0.0.1", str(self.primary.port))
        self.replica = RedisServer(port=free_port(), workdir=self.workdir, args=replica_of)

    @property
    def url(self) -> str:
        """The Sentinel URL of the service's primary, database 0."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self, timeout: float = 20.0) -> None:
        """Start all five; return once the replica is in sync and every sentinel knows the replica and the
        other two sentinels (before that a failover could not happen)."""
        self.primary.start()
        self.replica.start()
        _wait(lambda: _info(self.replica.port).get("master_link_status") == "up", timeout, "replica in sync")
        binary = shutil.which("redis-sentinel")
        argv_tail = [] if binary is not None else ["--sentinel"]
        binary = binary or shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-sentinel is not on PATH; `make install` installs it (apt-get install redis-sentinel)")
        for n in range(3):
            port = free_port()
            conf = self.workdir / f"sentinel-{n}.conf"
            # Sentinel rewrites its config file (what it learns of replicas and peers): one file each.
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.workdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            )
            log = self.workdir / f"sentinel-{port}.log"
            self.sentinels.append(spawn("redis-sentinel", [binary, str(conf), *argv_tail], log=log))
            self.sentinel_ports.append(port)
        for port in self.sentinel_ports:
            _wait(lambda port=port: _sentinel_ready(port), timeout, f"sentinel {port} knowing replica and peers")

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers names it (None if none answers)."""
        for port in self.sentinel_ports:
            try:
                with redis.Redis(port=port, socket_timeout=1) as client:
                    address = client.sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def promoted(self) -> bool:
        """Whether the sentinels now name the former replica as the primary, and it takes writes."""
        return self.primary_port() == self.replica.port and _info(self.replica.port).get("role") == "master"

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.terminate()
        for sentinel in self.sentinels:
            sentinel.stop(grace_s=5)
        self.replica.kill()
        self.primary.kill()


def _info(port: int) -> dict[str, object]:
    """INFO replication of the server on `port` ({} when it does not answer)."""
    try:
        with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as client:
            return dict(client.info("replication"))
    except redis.RedisError:
        return {}


def _sentinel_ready(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as client:
            state = client.sentinel_master(SERVICE)
    except redis.RedisError:
        return False
    return int(state.get("num-slaves", 0)) >= 1 and int(state.get("num-other-sentinels", 0)) >= 2


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        wait_for(condition, timeout, interval=0.1)
    except AssertionError:
        pytest.fail(f"Sentinel group not ready within {timeout:.0f}s: {what}")
