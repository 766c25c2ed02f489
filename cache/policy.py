"""Whether one request may read from and write to the answer cache."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CacheDecision:
    """What the cache may do for one request; `reason` is a short stable string, fit for a metric label."""

    read: bool
    write: bool
    reason: str


def decide(doc: Mapping[str, Any], cache_control: str | None, deterministic_only: bool) -> CacheDecision:
    """Decide from the body and the request's Cache-Control header.

    Reasons: "nondeterministic" (read and write off, when `deterministic_only` and the request
    samples freely; this wins over the header), "no-cache" (no read, still write), "no-store" (read,
    no write), "no-cache,no-store" (neither), otherwise "deterministic" or, when `deterministic_only`
    is off, "nondeterministic" with both read and write on.
    """
    deterministic = is_deterministic(doc)
    if deterministic_only and not deterministic:
        return CacheDecision(read=False, write=False, reason="nondeterministic")
    directives = cache_directives(cache_control)
    no_cache = "no-cache" in directives
    no_store = "no-store" in directives
    if no_cache and no_store:
        return CacheDecision(read=False, write=False, reason="no-cache,no-store")
    if no_cache:
        return CacheDecision(read=False, write=True, reason="no-cache")
    if no_store:
        return CacheDecision(read=True, write=False, reason="no-store")
    return CacheDecision(read=True, write=True, reason="deterministic" if deterministic else "nondeterministic")


def is_deterministic(doc: Mapping[str, Any]) -> bool:
    """True when the same request gives the same answer: temperature explicitly 0, or a seed is given."""
    temperature = doc.get("temperature")
    # bool is an int in Python; `"temperature": false` is not a temperature of 0.
    zero_temperature = isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    return zero_temperature or doc.get("seed") is not None


def cache_directives(header: str | None) -> frozenset[str]:
    """The directive names of a Cache-Control header, lower-cased, arguments (`=...`) dropped."""
    if not header:
        return frozenset()
    names = (part.partition("=")[0].strip().lower() for part in header.split(","))
    return frozenset(name for name in names if name)
