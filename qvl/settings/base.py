"""What every part of the settings tree shares: the section base type, the Redis-URL type, the engine names."""

from __future__ import annotations

from typing import Literal

from pydantic import AfterValidator, BaseModel, ConfigDict

EngineName = Literal["sim", "vllm"]
"""Engines a replica can run (serving/engines.py registers one launcher for each)."""

REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://")


class SettingsError(ValueError):
    """A settings value is missing, malformed or out of range; the message names the field."""


class Section(BaseModel):
    """A part of the settings tree: unknown fields are errors, values never change after start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def redis_url(*keywords: str) -> object:
    """The type of a setting holding a Redis URL (redis://HOST:PORT/DB, rediss://... with TLS, unix://PATH,
    or redis+sentinel://H1:P1,H2:P2,.../SERVICE/DB for the primary that Sentinel names) or one of `keywords` (such as memory, off, or "" for none); used as `Annotated[str, redis_url(...)]`."""
    shown = [repr(k) if k == "" else k for k in keywords]
    allowed = ", ".join([*shown, "a Redis URL (redis://HOST:PORT/DB)"])

    def check(value: str) -> str:
        if value in keywords or value.startswith(REDIS_SCHEMES):
            return value
        raise ValueError(f"must be {allowed}, got {value!r}")

    return AfterValidator(check)


def is_redis_url(value: str) -> bool:
    """Whether `value` names a Redis server (as opposed to a keyword such as memory or off)."""
    return value.startswith(REDIS_SCHEMES)
