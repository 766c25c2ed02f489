"""Waiting for a condition: the one polling helper, so tests state what they wait for and how long at most,
and never a bare sleep that is too short on a slow, shared machine."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds until `condition()` held, polling every `interval`; fails the test after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(interval)
    return time.monotonic() - started
