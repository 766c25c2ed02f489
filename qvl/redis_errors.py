"""One mapping of "Redis did not answer" to the caller's own Unavailable exception.

The answer cache (cache/redis_store.py), the quota buckets (router/quota.py) and the replica registry
(serving/registry.py) each turn every failure of Redis (an error reply, a refused or reset connection,
an exhausted pool, a timeout) into one exception of their own, so that their callers catch one type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from redis.exceptions import RedisError

REDIS_FAILURES = (RedisError, OSError, TimeoutError, RuntimeError)
"""What a Redis call raises when Redis is slow, down or refuses (TimeoutError: `asyncio.timeout`;
RuntimeError: uvloop's answer to a read or write on a connection Redis has just closed, in a failover
or a kill, which redis-py lets through unwrapped). Only Redis calls run inside `redis_unavailable`, so
a RuntimeError there is the connection's, not a bug elsewhere."""


@contextmanager
def redis_unavailable(error: Callable[[str], Exception], message: str | None = None) -> Iterator[None]:
    """Inside the block, any of REDIS_FAILURES is raised as `error(message)`, chained to the original.

    `message` defaults to `redis: <exception type>`: the type only, since the exception's own text may
    carry the server's address. Wrap `asyncio.timeout` inside it, so that the timeout is mapped too.
    """
    try:
        yield
    except REDIS_FAILURES as exc:
        raise error(message if message is not None else f"redis: {type(exc).__name__}") from exc
