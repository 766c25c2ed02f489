"""Factory fixtures that start real servers on free ports and kill them afterwards: `cluster` (`qvl`
processes), `redis_server` (a redis-server the test can kill, pause and restart) and `redis_sentinels`
(a primary, its replica and three sentinels), and `vllm_pair` (two real vLLM replicas of the tiny model,
once per session). The servers themselves are in tests/support/servers.py and
tests/support/sentinel.py; tests import them from there, never from this file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.sentinel import SentinelGroup
from support.servers import Cluster, RedisServer
from support.vllm import VllmPair
from support.vllm import vllm_pair as start_vllm_pair

from qvl.procs import free_port


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(tmp_path / "sentinel")
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="session")
def vllm_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmPair]:
    with start_vllm_pair(tmp_path_factory.mktemp("vllm")) as pair:
        yield pair
