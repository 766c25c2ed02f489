"""The answer cache's part of the settings tree (read by cache/ and the router)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from qvl.settings.base import Section, redis_url


class CacheSettings(Section):
    """The answer cache (`cache/`): keyed by image content and the request's meaning."""

    backend: Annotated[str, redis_url("memory", "off")] = Field(
        "memory",
        description="memory (in-process LRU), off, or a Redis URL shared by every router: redis://HOST:PORT/DB, "
        "or redis+sentinel://H1:P1,H2:P2,.../SERVICE/DB to follow Sentinel's primary through failovers.",
    )
    ttl_s: float = Field(3600.0, gt=0, description="Seconds an answer stays cached.")
    max_entry_bytes: int = Field(1024 * 1024, ge=1024, description="Answers larger than this are not stored.")
    memory_max_entries: int = Field(10000, ge=1, description="memory: most answers kept (least recently used go).")
    memory_max_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="memory: most bytes of answers kept.")
    redis_timeout_s: float = Field(
        0.02, gt=0, description="redis: seconds one cache operation may take before the cache is bypassed."
    )
    redis_pool_size: int = Field(
        64,
        ge=1,
        description="redis: connections per router for cache operations (followers waiting on another "
        "router's answer hold connections of a second pool of the same size).",
    )
    lock_ttl_s: float = Field(
        30.0, gt=0, description="redis: how long a leader's single-flight lock holds followers on other routers."
    )
    deterministic_only: bool = Field(
        True, description="Cache only requests with temperature 0 or a fixed seed (others could legitimately differ)."
    )
    model_revisions: dict[str, str] = Field(
        default_factory=dict, description="Revision per served model, part of every key: change it when weights change."
    )
    key_prefix: str = Field("qvl:", description="redis: prefix of every key this cluster writes.")
