"""One way to reach Redis: parse a Redis URL, direct or through Sentinel, and build a bounded async client.

The URLs (the settings' `redis_url` type accepts exactly what `parse_redis_url` accepts):
    redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]       rediss://... (TLS)       unix://[[USER]:PASSWORD@]/PATH
    redis+sentinel://[[USER]:PASSWORD@]H1:P1[,H2:P2,...]/SERVICE[/DB]        (DB defaults to 0)

For the Sentinel form the client talks to the primary the sentinels name for SERVICE. It asks them again
whenever a connection to the primary has to be made (after any connection error), so it follows a
failover without a restart. Its credentials are the primary's; the sentinels are asked without any.

Every client is bounded: at most `max_connections` connections to the primary (and as many to each
sentinel), a caller waits at most `pool_timeout_s` for a free one, every connect and read at most the
socket timeouts. No message of this module holds a URL's password; `redacted(url)` shows a URL safely.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

SENTINEL_SCHEME = "redis+sentinel://"
DIRECT_SCHEMES = ("redis://", "rediss://", "unix://")
SENTINEL_FORM = "redis+sentinel://H1:P1,H2:P2,.../SERVICE[/DB]"

_SENTINEL = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9][A-Za-z0-9._-]*)):(?P<port>[0-9]{1,5})")
# Sentinel itself allows any name without spaces; this keeps URLs unambiguous (no '/', '@', ',', '%').
_SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


class RedisUrlError(ValueError):
    """A Redis URL is malformed; the message says what is wrong and never holds the password."""


@dataclass(frozen=True, slots=True)
class DirectUrl:
    """A redis://, rediss:// or unix:// URL, used as redis-py reads it."""

    url: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """The primary that `sentinels` name for `service`, database `db`."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


RedisUrl = DirectUrl | SentinelUrl


def parse_redis_url(url: str) -> RedisUrl:
    """The parsed URL; RedisUrlError (naming the problem, without the password) when it is malformed."""
    if url.startswith(SENTINEL_SCHEME):
        return _parse_sentinel(url[len(SENTINEL_SCHEME) :])
    if url.startswith(DIRECT_SCHEMES):
        try:
            parse_url(url)  # redis-py's own reading, the one the client will use
        except ValueError as exc:
            # Its messages name a bad port or query value, never the credentials.
            raise RedisUrlError(str(exc)) from None
        return DirectUrl(url)
    raise RedisUrlError("not a Redis URL: it must start with redis://, rediss://, unix:// or redis+sentinel://")


def redacted(url: str) -> str:
    """`url` with its password (in the user part or a password= query value) replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        userinfo, at, hosts = authority.rpartition("@")
        if at and ":" in userinfo:
            userinfo = userinfo.partition(":")[0] + ":***"
        url = f"{scheme}://{userinfo}{at}{hosts}{slash}{path}"
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


def redis_client(
    url: str,
    *,
    max_connections: int,
    pool_timeout_s: float,
    socket_timeout_s: float,
    connect_timeout_s: float | None = None,
) -> Redis:
    """A client of the Redis at `url` (any form parse_redis_url accepts); nothing connects until its first command.

    At most `max_connections` connections; a command that finds them all busy waits up to `pool_timeout_s`,
    then fails with ConnectionError. Reads time out after `socket_timeout_s`, connects after
    `connect_timeout_s` (default: the same), to the sentinels too. A command that fails on a connection
    error is retried once at once on a new connection: a pooled connection to a Redis that restarted (or
    to a primary that failed over) fails once on use, and the retry reconnects (asking the sentinels
    where the primary is now). Closing the client closes its sentinel connections too.
    """
    target = parse_redis_url(url)
    kwargs: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": pool_timeout_s,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": socket_timeout_s if connect_timeout_s is None else connect_timeout_s,
        # No CLIENT SETINFO on connect: a round trip less per new connection, which matters when a
        # burst opens dozens of them at once under a budget of a few milliseconds.
        "driver_info": None,
    }
    if isinstance(target, DirectUrl):
        return Redis.from_pool(BlockingConnectionPool.from_url(target.url, retry=Retry(NoBackoff(), 1), **kwargs))
    sentinel = Sentinel([], sentinel_kwargs={})  # type: ignore[no-untyped-call]
    # Sentinel would give each sentinel an unbounded pool; these are bounded and blocking like the primary's.
    sentinel.sentinels = [
        Redis.from_pool(BlockingConnectionPool(host=h, port=p, **kwargs)) for h, p in target.sentinels
    ]
    primary = sentinel.master_for(
        target.service,
        connection_pool_class=BlockingSentinelPool,
        db=target.db,
        username=target.username,
        password=target.password,
        retry=Retry(NoBackoff(), 1),
        **kwargs,
    )
    return cast(Redis, primary)


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """SentinelConnectionPool (connections go to the primary the sentinels name now) bounded as
    BlockingConnectionPool is: at most max_connections, a caller waits up to `timeout` for a free one.
    Closing it also closes the clients of the sentinels, which this pool alone uses."""

    async def get_master_address(self) -> tuple[str, int]:
        address: tuple[str, int] = await self.sentinel_manager.discover_master(self.service_name)
        if address != self.master_address:
            # SentinelConnectionPool drops the idle connections (to the old primary) without the pool's lock:
            # meanwhile another caller can take one and start connecting it, and the drop then closes its
            # socket mid-handshake (a RuntimeError from the event loop, not a Redis error). Under the lock
            # nobody takes an idle connection until they are all dropped.
            async with self._condition:
                self.master_address = address
                idle = list(self._available_connections)
                await asyncio.gather(*(c.disconnect() for c in idle), return_exceptions=True)
        return address

    async def aclose(self) -> None:
        await super().aclose()
        await self.sentinel_manager.aclose()


def _parse_sentinel(rest: str) -> SentinelUrl:
    authority, slash, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    if any(c in path or c in hosts for c in "?#"):
        raise RedisUrlError(f"a Sentinel URL takes no query or fragment: {SENTINEL_FORM}")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels: list[tuple[str, int]] = []
    for part in hosts.split(",") if hosts else []:
        match = _SENTINEL.fullmatch(part)
        if match is None:
            raise RedisUrlError(f"sentinel {part!r} is not HOST:PORT (or [IPV6]:PORT): {SENTINEL_FORM}")
        port = int(match["port"])
        if not 0 < port < 65536:
            raise RedisUrlError(f"sentinel {part!r}: port {port} is out of range 1-65535")
        address = (match["ipv6"] or match["host"], port)
        if address in sentinels:
            raise RedisUrlError(f"sentinel {part!r} is named twice")
        sentinels.append(address)
    if not sentinels:
        raise RedisUrlError(f"a Sentinel URL names at least one sentinel: {SENTINEL_FORM}")
    service, slash, db = path.partition("/")
    if not service:
        raise RedisUrlError(f"a Sentinel URL names the service after the sentinels: {SENTINEL_FORM}")
    if _SERVICE.fullmatch(service) is None:
        raise RedisUrlError(f"service {service!r} may hold only letters, digits and . _ : - ({SENTINEL_FORM})")
    if slash and re.fullmatch(r"[0-9]+", db) is None:
        raise RedisUrlError(f"database {db!r} after the service must be a number (or leave out /DB): {SENTINEL_FORM}")
    return SentinelUrl(tuple(sentinels), service, int(db) if slash else 0, username, password)
