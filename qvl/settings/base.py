"""What every part of the settings tree shares: the section base type, the Redis-URL type, the engine names."""

from __future__ import annotations

from typing import Literal

from pydantic import AfterValidator, BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

from qvl.redis_client import RedisUrlError, parse_redis_url, redacted

EngineName = Literal["sim", "vllm"]
"""Engines a replica can run (serving/engines.py registers one launcher for each)."""

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")
REDIS_URL_ERROR = "redis_url"
"""The error type of a malformed Redis URL setting; its message shows the URL with the password left out."""


class SettingsError(ValueError):
    """A settings value is missing, malformed or out of range; the message names the field."""


class Section(BaseModel):
    """A part of the settings tree: unknown fields are errors, values never change after start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def redis_url(*keywords: str) -> object:
    """The type of a setting holding a Redis URL or one of `keywords` (such as memory, off, or "" for none);
    used as `Annotated[str, redis_url(...)]`. The URL forms are qvl/redis_client.py's: redis://HOST:PORT/DB,
    rediss://... (TLS), unix://PATH, or redis+sentinel://H1:P1,H2:P2,.../SERVICE[/DB] for the primary that
    Sentinel names. A malformed URL fails start-up with what is wrong, never showing its password."""
    shown = [repr(k) if k == "" else k for k in keywords]
    allowed = ", ".join([*shown, "a Redis URL (redis://HOST:PORT/DB or redis+sentinel://H1:P1,H2:P2/SERVICE)"])

    def check(value: str) -> str:
        if value in keywords:
            return value
        if not value.startswith(REDIS_SCHEMES):
            raise PydanticCustomError(REDIS_URL_ERROR, f"must be {allowed}, got {redacted(value)!r}")
        try:
            parse_redis_url(value)
        except RedisUrlError as exc:
            # A custom error type: the settings' error message leaves out the raw value, which may hold a password.
            raise PydanticCustomError(REDIS_URL_ERROR, f"{exc} (got {redacted(value)!r})") from None
        return value

    return AfterValidator(check)


def is_redis_url(value: str) -> bool:
    """Whether `value` names a Redis server (as opposed to a keyword such as memory or off)."""
    return value.startswith(REDIS_SCHEMES)
