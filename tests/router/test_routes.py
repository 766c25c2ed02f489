"""Routes: weighted, sticky assignment as a pure function, and the table's choices."""

from __future__ import annotations

from collections import Counter

import pytest

from qvl.settings import PoolSettings, RouteSettings
from router.routes import Choice, Route, RouteTable, assign, conversation_key, settings_routes, shadow_of, sticky_key


def test_the_split_follows_the_weights_within_a_point() -> None:
    route = Route("m", (("v2", 5.0), ("v1", 95.0)))
    counts = Counter(assign(route, f"session-{i}".encode()) for i in range(20_000))
    assert abs(counts["v2"] / 20_000 - 0.05) < 0.01


def test_assignment_is_the_same_for_the_same_key_and_the_same_in_every_table() -> None:
    route = Route("m", (("v2", 30.0), ("v1", 70.0)))
    other = Route.from_doc(route.to_doc())
    for i in range(500):
        key = f"s{i}".encode()
        assert assign(route, key) == assign(route, key) == assign(other, key)


def test_growing_the_new_version_keeps_the_clients_it_had() -> None:
    keys = [f"s{i}".encode() for i in range(5000)]
    small = Route("m", (("v2", 5.0), ("v1", 95.0)))
    large = Route("m", (("v2", 25.0), ("v1", 75.0)))
    had = {k for k in keys if assign(small, k) == "v2"}
    assert had and all(assign(large, k) == "v2" for k in had)


def test_an_aborted_version_gets_nobody() -> None:
    route = Route("m", (("v2", 0.0), ("v1", 100.0)))
    assert {assign(route, f"s{i}".encode()) for i in range(2000)} == {"v1"}


def test_shadow_takes_its_share_and_never_the_answering_version() -> None:
    route = Route("m", (("v1", 100.0),), shadow=(("v2", 0.1),))
    mirrored = sum(shadow_of(route, "v1", f"s{i}".encode()) == "v2" for i in range(10_000))
    assert 800 < mirrored < 1200
    assert all(shadow_of(route, "v2", f"s{i}".encode()) is None for i in range(100))


def test_sticky_keys_prefer_the_session_then_the_conversation_then_the_key() -> None:
    by_session = Route("m", (("v1", 1.0),), sticky="session")
    by_key = Route("m", (("v1", 1.0),), sticky="key")
    assert sticky_key(by_session, "abc", "k1", b"conv") == b"s\x1fabc"
    assert sticky_key(by_session, None, "k1", b"conv") == b"c\x1fk1\x1fconv"
    assert sticky_key(by_key, "abc", "k1", b"conv") == b"k\x1fk1"
    assert sticky_key(by_key, "abc", "", b"conv") == b"s\x1fabc"


def test_a_conversation_keeps_its_key_as_it_grows() -> None:
    first = {"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": "image_url"}]}
    one = {"messages": [first]}
    three = {"messages": [first, {"role": "assistant", "content": "a shoe"}, {"role": "user", "content": "size?"}]}
    assert conversation_key(one, ["d1"]) == conversation_key(three, ["d1", "d2"]) != b""
    assert conversation_key(one, ["d1"]) != conversation_key(one, ["d9"])


def test_the_table_pins_a_version_by_name_and_routes_the_rest() -> None:
    pools = [PoolSettings(name="a", model="m", version="v1"), PoolSettings(name="b", model="m", version="v2")]
    table = RouteTable(settings_routes({}, pools))
    assert table.choose("m@v2", None, "", {}, ()).target == "m@v2"
    # A label no version could have pins nothing (it would go into the x-qvl-model-version header).
    for label in ("\x1f", "", "v 2", "-v2", "v2\r\nx: y"):
        assert table.choose(f"m@{label}", None, "", {}, ()) == Choice("", f"m@{label}")
    chosen = table.choose("m", "s", "", {}, ())
    assert (chosen.version, chosen.target) == ("v1", "m@v1")  # the first pool's version alone
    assert table.choose("other", "s", "", {}, ()).version == ""
    split = settings_routes({"m": RouteSettings(versions={"v1": 50, "v2": 50})}, pools)
    table = RouteTable(split)
    seen = {table.choose("m", f"s{i}", "", {}, ()).version for i in range(200)}
    assert seen == {"v1", "v2"}


def test_stored_routes_override_the_configured_ones_and_report_what_changed() -> None:
    table = RouteTable({"m": Route("m", (("v1", 100.0),))})
    changed = table.apply({"m": Route("m", (("v2", 5.0), ("v1", 95.0)), rollout="r:0")}, "3")
    assert changed == ["m"] and table.revision == "3"
    assert table.apply({"m": Route("m", (("v2", 5.0), ("v1", 95.0)), rollout="r:0")}, "4") == []
    assert table.apply({}, "5") == ["m"] and table.routes["m"].versions == (("v1", 100.0),)


@pytest.mark.parametrize("weights", [{}, {"v1": -1.0}, {"v1": 0.0}])
def test_a_route_needs_positive_weights(weights: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RouteSettings(versions=weights)
