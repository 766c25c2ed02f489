from __future__ import annotations

import pytest

from cache.policy import CacheDecision, cache_directives, decide, is_deterministic

GREEDY = {"model": "m", "messages": [], "temperature": 0}


@pytest.mark.parametrize(
    ("doc", "deterministic"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"temperature": 0.7, "seed": 3}, True),
        ({"seed": 0}, True),
        ({}, False),  # the server's default temperature samples
        ({"temperature": 0.7}, False),
        ({"temperature": 0.7, "seed": None}, False),
        ({"temperature": False}, False),
        ({"temperature": None}, False),
    ],
)
def test_deterministic_means_temperature_zero_or_a_seed(doc: dict, deterministic: bool) -> None:
    assert is_deterministic(doc) is deterministic


def test_deterministic_request_reads_and_writes() -> None:
    assert decide(GREEDY, None, deterministic_only=True) == CacheDecision(read=True, write=True, reason="deterministic")


def test_nondeterministic_request_bypasses_when_deterministic_only() -> None:
    decision = decide({"temperature": 1.0}, None, deterministic_only=True)
    assert decision == CacheDecision(read=False, write=False, reason="nondeterministic")
    # The header cannot turn caching back on.
    assert decide({"temperature": 1.0}, "no-store", deterministic_only=True).reason == "nondeterministic"


def test_nondeterministic_request_is_cached_when_allowed() -> None:
    decision = decide({"temperature": 1.0}, None, deterministic_only=False)
    assert decision == CacheDecision(read=True, write=True, reason="nondeterministic")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("no-cache", CacheDecision(read=False, write=True, reason="no-cache")),
        ("No-Cache", CacheDecision(read=False, write=True, reason="no-cache")),
        ("max-age=0, no-cache", CacheDecision(read=False, write=True, reason="no-cache")),
        ("no-store", CacheDecision(read=True, write=False, reason="no-store")),
        (" NO-STORE ", CacheDecision(read=True, write=False, reason="no-store")),
        ("no-cache, no-store", CacheDecision(read=False, write=False, reason="no-cache,no-store")),
        ("no-store,no-cache,private", CacheDecision(read=False, write=False, reason="no-cache,no-store")),
        ("", CacheDecision(read=True, write=True, reason="deterministic")),
        ("max-age=60", CacheDecision(read=True, write=True, reason="deterministic")),
        ("no-cached", CacheDecision(read=True, write=True, reason="deterministic")),
    ],
)
def test_cache_control_directives(header: str, expected: CacheDecision) -> None:
    assert decide(GREEDY, header, deterministic_only=True) == expected


def test_directive_parsing_drops_arguments_and_blanks() -> None:
    assert cache_directives('no-cache="x", , Max-Age=5') == {"no-cache", "max-age"}
    assert cache_directives(None) == frozenset()


def test_reasons_are_a_small_fixed_set() -> None:
    reasons = {
        decide(doc, header, only).reason
        for doc in (GREEDY, {"temperature": 1})
        for header in (None, "no-cache", "no-store", "no-cache, no-store")
        for only in (True, False)
    }
    assert reasons == {"deterministic", "nondeterministic", "no-cache", "no-store", "no-cache,no-store"}
