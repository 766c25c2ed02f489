"""Waiting for a condition: the one polling helper (and its twin for async tests, which must not block
the event loop), so that a test states what it waits for and how long at most, and never relies on a
bare sleep being long enough on a slow, shared machine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Seconds until `condition()` held, polling every `interval`; fails the test after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(interval)
    return time.monotonic() - started


async def wait_for_async(condition: Callable[[], bool], timeout_s: float, interval: float = 0.01) -> float:
    """`wait_for` inside an event loop: polls with `asyncio.sleep`, so the loop keeps running meanwhile."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        await asyncio.sleep(interval)
    return time.monotonic() - started
