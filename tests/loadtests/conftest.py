from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.loadtests import sim_cluster
from support.servers import Proc


@pytest.fixture(scope="package")
def sim_router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """One simulated cluster for every load-test test (support/loadtests.py: keys, renice, 2 ms ITL)."""
    with sim_cluster(tmp_path_factory.mktemp("up")) as up:
        yield up
