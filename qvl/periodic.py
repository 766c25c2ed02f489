"""Run a background job forever at a fixed period: one shared loop for the router's health checks, load
scrapes and rollout polls."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable


async def every(interval_s: float, job: Callable[[], Awaitable[None]], log: logging.Logger, what: str) -> None:
    """Await `job` every `interval_s` (measured start to start) until cancelled. A round that raises is
    logged with its traceback as `what` failed, and the next round runs: a bug in one round must not stop
    the job for good."""
    while True:
        started = time.monotonic()
        try:
            await job()
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
