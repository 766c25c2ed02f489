"""Factory fixtures that start real servers on free ports and kill them afterwards: `cluster` (`qvl`
processes), `redis_server` (a redis-server the test can kill, pause and restart) and `redis_sentinels`
(a primary, its replica and three sentinels), and `vllm_pair` (two real vLLM replicas of the tiny model,
once per session); `openai_client` makes official clients that are closed when the test ends. The servers
themselves are in tests/support/servers.py and tests/support/sentinel.py; tests import them from there,
never from this file."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from support.batch import OpenAIClient
from support.sentinel import SentinelGroup
from support.servers import Cluster, RedisServer
from support.vllm import VllmPair
from support.vllm import vllm_pair as start_vllm_pair

from qvl.procs import free_port


@pytest.fixture(autouse=True, scope="module")
def _collect_garbage_per_module() -> Iterator[None]:
    """Collect garbage after each test module: something a test left unclosed (a client's sockets, a file)
    then warns, and fails, at the end of its own module, not in whichever later test the collector
    happens to run in (CI once failed test_layers on a socket some earlier test had left open)."""
    yield
    gc.collect()


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


@pytest.fixture
def openai_client() -> Iterator[OpenAIClient]:
    """`openai_client(url, key)`: the official client for the server at `url` (no retries), closed when the
    test ends, not left with its pooled sockets to the garbage collector (an unclosed socket's
    ResourceWarning fails whichever test is running when it is collected: the suite turns warnings into
    errors)."""
    made: list[openai.OpenAI] = []

    def make(url: str, key: str = "unused") -> openai.OpenAI:
        made.append(openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0))
        return made[-1]

    try:
        yield make
    finally:
        for client in made:
            client.close()
