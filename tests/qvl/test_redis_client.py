"""Redis URLs (direct and Sentinel) as parsed, validated in the settings, and turned into bounded clients."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import BlockingConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError

from qvl.redis_client import (
    BlockingSentinelPool,
    DirectUrl,
    RedisUrlError,
    SentinelUrl,
    parse_redis_url,
    redacted,
    redis_client,
)
from qvl.settings import SettingsError, load_settings

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", f"rediss://user:{SECRET}@redis.internal:6380/2", "unix:///run/redis.sock"]
)
def test_direct_urls_are_kept_as_redis_py_reads_them(url: str) -> None:
    assert parse_redis_url(url) == DirectUrl(url)


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_db() -> None:
    parsed = parse_redis_url(f"redis+sentinel://app:{SECRET}@h1:26379,10.0.0.2:26380,[::1]:26381/qvl-primary/3")
    assert parsed == SentinelUrl((("h1", 26379), ("10.0.0.2", 26380), ("::1", 26381)), "qvl-primary", 3, "app", SECRET)
    assert SECRET not in repr(parsed)
    assert parse_redis_url("redis+sentinel://h1:26379/qvl-primary") == SentinelUrl((("h1", 26379),), "qvl-primary")
    assert parse_redis_url(f"redis+sentinel://:{SECRET}@h1:1/s").password == SECRET  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://", "at least one sentinel"),
        ("redis+sentinel:///qvl-primary/0", "at least one sentinel"),
        ("redis+sentinel://h1:26379", "names the service"),
        ("redis+sentinel://h1:26379/", "names the service"),
        ("redis+sentinel://h1/qvl-primary", "'h1' is not HOST:PORT"),
        ("redis+sentinel://h1:26379,,h2:26379/qvl-primary", "'' is not HOST:PORT"),
        ("redis+sentinel://h1:99999/qvl-primary", "out of range"),
        ("redis+sentinel://h1:0/qvl-primary", "out of range"),
        ("redis+sentinel://h1:26379,h1:26379/qvl-primary", "named twice"),
        ("redis+sentinel://h1:26379/qvl primary", "service 'qvl primary'"),
        ("redis+sentinel://h1:26379/qvl-primary/x", "database 'x'"),
        ("redis+sentinel://h1:26379/qvl-primary/", "database ''"),
        ("redis+sentinel://h1:26379/qvl-primary/0/1", "database '0/1'"),
        ("redis+sentinel://h1:26379/qvl-primary/0?ssl=1", "no query"),
        ("redis://h1:port/0", "Port could not be cast"),
        ("http://h1:6379", "not a Redis URL"),
    ],
)
def test_a_malformed_url_says_what_is_wrong_without_the_password(url: str, message: str) -> None:
    url = url.replace("://", f"://user:{SECRET}@", 1)
    with pytest.raises(RedisUrlError, match=message.replace("?", r"\?")) as caught:
        parse_redis_url(url)
    assert SECRET not in str(caught.value)


def test_redacted_hides_the_password_only() -> None:
    assert redacted(f"redis+sentinel://app:{SECRET}@h1:1,h2:2/svc/0") == "redis+sentinel://app:***@h1:1,h2:2/svc/0"
    assert redacted(f"unix:///run/redis.sock?db=1&password={SECRET}") == "unix:///run/redis.sock?db=1&password=***"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"
    assert redacted(f"redis://user@h:6379/0#{SECRET}@") == f"redis://user@h:6379/0#{SECRET}@"  # no credentials


@pytest.mark.parametrize(
    ("setting", "overrides"),
    [
        ("cache.backend", {"cache": {"backend": "URL"}}),
        ("router.quota.backend", {"router": {"quota": {"backend": "URL"}}}),
        ("registry.url", {"registry": {"url": "URL"}}),
    ],
)
def test_a_malformed_sentinel_url_fails_start_up_naming_the_setting(setting: str, overrides: dict[str, object]) -> None:
    def with_url(url: str) -> dict[str, object]:
        return {k: with_url_in(v, url) for k, v in overrides.items()}

    def with_url_in(value: object, url: str) -> object:
        return {k: with_url_in(v, url) for k, v in value.items()} if isinstance(value, dict) else url

    bad = f"redis+sentinel://:{SECRET}@h1:26379,h2/qvl-primary/0"
    with pytest.raises(SettingsError, match=rf"setting {setting}: sentinel 'h2' is not HOST:PORT") as caught:
        load_settings(overrides=with_url(bad))
    assert SECRET not in str(caught.value) and ":***@h1:26379,h2/qvl-primary/0" in str(caught.value)
    good = load_settings(overrides=with_url("redis+sentinel://h1:26379,h2:26379,h3:26379/qvl-primary/0"))
    assert "qvl-primary" in good.model_dump_json()


def test_a_sentinel_client_is_bounded_like_a_direct_one() -> None:
    direct = redis_client("redis://127.0.0.1:1/0", max_connections=5, pool_timeout_s=0.2, socket_timeout_s=0.1)
    assert isinstance(direct.connection_pool, BlockingConnectionPool)
    assert (direct.connection_pool.max_connections, direct.connection_pool.timeout) == (5, 0.2)

    client = redis_client(
        "redis+sentinel://127.0.0.1:1,127.0.0.1:2/qvl-primary/4",
        max_connections=7,
        pool_timeout_s=0.3,
        socket_timeout_s=0.1,
        connect_timeout_s=0.05,
    )
    pool = client.connection_pool
    assert isinstance(pool, BlockingSentinelPool) and isinstance(pool, BlockingConnectionPool)
    assert (pool.max_connections, pool.timeout, pool.service_name) == (7, 0.3, "qvl-primary")
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (4, 0.1, 0.05)
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [1, 2]
    for sentinel in sentinels:
        assert isinstance(sentinel.connection_pool, BlockingConnectionPool)
        assert sentinel.connection_pool.max_connections == 7
        assert sentinel.connection_pool.connection_kwargs["socket_timeout"] == 0.1

    async def unreachable() -> None:
        # Nobody listens: the sentinels are asked (bounded by their timeouts) and none names a primary.
        with pytest.raises(RedisConnectionError, match="No master found for 'qvl-primary'"):
            await client.ping()
        await client.aclose()
        await direct.aclose()

    asyncio.run(unreachable())
