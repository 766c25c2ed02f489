"""The one mapping of Redis failures to a caller's own exception."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from qvl.redis_errors import redis_unavailable


class Down(Exception):
    pass


@pytest.mark.parametrize(
    "failure",
    [
        RedisConnectionError("Error 111 connecting to 10.1.2.3:6379"),
        ResponseError("ERR"),
        OSError(104),
        TimeoutError(),
        # uvloop, on a connection Redis closed mid-call (seen in a Sentinel failover as a 500 at the router)
        RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed"),
    ],
)
def test_every_redis_failure_becomes_the_callers_exception_naming_only_its_type(failure: Exception) -> None:
    with pytest.raises(Down) as info, redis_unavailable(Down):
        raise failure
    assert str(info.value) == f"redis: {type(failure).__name__}"
    assert "10.1.2.3" not in str(info.value)
    assert info.value.__cause__ is failure


def test_a_given_message_and_an_asyncio_timeout_inside() -> None:
    async def slow() -> None:
        with redis_unavailable(Down, "the store did not answer"):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)

    with pytest.raises(Down, match=r"^the store did not answer$"):
        asyncio.run(slow())


def test_other_exceptions_pass_through() -> None:
    with pytest.raises(KeyError), redis_unavailable(Down):
        raise KeyError("not redis")
