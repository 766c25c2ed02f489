"""Policies over real Replica objects whose load fields are set directly: pure, in-process."""

import collections
import random
from collections.abc import Callable

import pytest

from qvl.settings import RouterSettings
from router.edge import ChatRequest, SamplingParams
from router.hashring import HashRing, digest_point, key_point
from router.policies import POLICIES, ImageAffinity, LeastLoaded, RoundRobin, Session, build_policy
from router.replicas import Replica, parse_engine_metrics, replica_name


def replicas(n: int) -> list[Replica]:
    return [Replica(url=f"http://127.0.0.1:{9000 + i}", name=f"127.0.0.1:{9000 + i}") for i in range(n)]


def members(rs: list[Replica]) -> Callable[[], frozenset[str]]:
    names = frozenset(r.name for r in rs)
    return lambda: names


def request(*digests: str, session: str | None = None) -> ChatRequest:
    return ChatRequest("m", False, SamplingParams(), tuple(digests), session, b"{}")


def digest(i: int) -> str:
    import hashlib

    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def test_registry_names_every_policy() -> None:
    assert set(POLICIES) == {"round-robin", "least-loaded", "session", "image-affinity"}
    rs = replicas(3)
    for name in POLICIES:
        policy = build_policy(RouterSettings(policy=name), members(rs))  # type: ignore[arg-type]
        chosen = policy.choose(rs, request(digest(1), session="s"))
        assert any(chosen is r for r in rs)


def test_round_robin_cycles() -> None:
    rs = replicas(3)
    policy = RoundRobin()
    assert [policy.choose(rs, request()).name for _ in range(6)] == [r.name for r in rs] * 2


def test_least_loaded_prefers_lower_load() -> None:
    rs = replicas(2)
    rs[0].in_flight = 5
    rs[1].in_flight = 1
    policy = LeastLoaded(random.Random(1))
    assert {policy.choose(rs, request()).name for _ in range(20)} == {rs[1].name}
    rs[1].waiting = 10  # the engine queue counts too
    assert {policy.choose(rs, request()).name for _ in range(20)} == {rs[0].name}


def test_ring_walk_gives_every_name_once_starting_with_owner() -> None:
    ring = HashRing(["a", "b", "c"], 50)
    order = list(ring.walk(key_point("k")))
    assert sorted(order) == ["a", "b", "c"]
    assert list(HashRing([], 10).walk(1)) == []


def test_ring_is_consistent_when_a_name_leaves() -> None:
    full = HashRing(["a", "b", "c", "d"], 100)
    less = HashRing(["a", "b", "c"], 100)
    moved = 0
    for i in range(2000):
        p = digest_point(digest(i))
        before = next(full.walk(p))
        after = next(less.walk(p))
        if before != "d":
            assert before == after
        else:
            moved += 1
    assert 300 < moved < 700  # about a quarter of the keys belonged to d


def test_affinity_same_image_same_replica_and_spread_across_images() -> None:
    rs = replicas(4)
    policy = ImageAffinity(1.25, 160, members(rs), LeastLoaded())
    for i in range(50):
        first = policy.choose(rs, request(digest(i)))
        assert all(policy.choose(rs, request(digest(i))) is first for _ in range(3))
    owners = collections.Counter(policy.choose(rs, request(digest(i))).name for i in range(400))
    assert len(owners) == 4 and min(owners.values()) > 50


def test_affinity_bounded_load_spills_to_next_replica() -> None:
    rs = replicas(2)
    policy = ImageAffinity(1.25, 160, members(rs), LeastLoaded())
    hot = request(digest(7))
    home = policy.choose(rs, hot)
    other = next(r for r in rs if r is not home)
    placed = []
    for _ in range(8):  # requests stay in flight: nothing completes
        r = policy.choose(rs, hot)
        r.in_flight += 1
        placed.append(r)
        total = sum(x.in_flight for x in rs)
        assert r.in_flight <= policy.capacity(rs) or total == 1
    assert placed[0] is home
    assert other in placed
    bound = -(-1.25 * 8 // 2)  # ceil(1.25 * total / n) with all 8 placed
    assert home.in_flight <= bound


def test_affinity_skips_ejected_owner_and_returns_after() -> None:
    rs = replicas(3)
    policy = ImageAffinity(1.25, 160, members(rs), LeastLoaded())
    req = request(digest(3))
    home = policy.choose(rs, req)
    rest = [r for r in rs if r is not home]
    fallback = policy.choose(rest, req)
    assert fallback is not home
    assert policy.choose(rs, req) is home


def test_affinity_text_only_goes_least_loaded() -> None:
    rs = replicas(2)
    rs[0].in_flight = 9
    policy = ImageAffinity(1.25, 160, members(rs), LeastLoaded())
    assert {policy.choose(rs, request()).name for _ in range(10)} == {rs[1].name}


def test_session_sticks_and_spreads() -> None:
    rs = replicas(3)
    policy = Session(160, members(rs), LeastLoaded())
    seen = collections.Counter()
    for i in range(300):
        first = policy.choose(rs, request(session=f"user-{i}"))
        assert policy.choose(rs, request(session=f"user-{i}")) is first
        seen[first.name] += 1
    assert len(seen) == 3


def test_affinity_agrees_across_routers_whatever_order_replicas_arrived_in() -> None:
    # Two routers with the same membership: one saw the replicas become healthy in one order, the other
    # in reverse and with one still ejected. Wherever both can route, they pick the same replica.
    rs = replicas(5)
    first = ImageAffinity(1.25, 160, members(rs), LeastLoaded())
    second = ImageAffinity(1.25, 160, members(rs), LeastLoaded())
    for i in range(200):
        req = request(digest(i))
        a = first.choose(rs, req)
        b = second.choose(list(reversed(rs)), req)
        assert a is b
        if a is not rs[4]:
            assert second.choose(list(reversed(rs[:4])), req) is a


@pytest.mark.parametrize(("url", "name"), [("http://10.0.0.5:8001", "10.0.0.5:8001"), ("http://h", "h:80")])
def test_replica_name(url: str, name: str) -> None:
    assert replica_name(url) == name


def test_parse_engine_metrics_sums_label_sets() -> None:
    text = (
        "# HELP vllm:num_requests_waiting x\n"
        'vllm:num_requests_waiting{model_name="a"} 3.0\n'
        'vllm:num_requests_waiting{model_name="b"} 2.0\n'
        'vllm:num_requests_running{model_name="a"} 7.0\n'
        "vllm:num_requests_running_other 100\n"
        'vllm:kv_cache_usage_perc{engine="0"} 0.25\n'
        'vllm:kv_cache_usage_perc{engine="1"} 0.5\n'
        'vllm:mm_cache_queries_total{engine="0"} 10.0\n'
        'vllm:mm_cache_hits_total{engine="0"} 4.0\n'
        'vllm:mm_cache_hits_created{engine="0"} 1.7e9\n'
    )
    gauges = parse_engine_metrics(text)
    assert gauges.waiting == 5.0
    assert gauges.running == 7.0
    assert gauges.kv_cache_usage == 0.5  # the fullest engine
    assert (gauges.mm_cache_queries, gauges.mm_cache_hits) == (10.0, 4.0)


def test_parse_engine_metrics_leaves_out_what_the_page_lacks() -> None:
    gauges = parse_engine_metrics('vllm:num_requests_running{model_name="a"} 1.0\n')
    assert (gauges.kv_cache_usage, gauges.mm_cache_queries, gauges.mm_cache_hits) == (None, None, None)


def test_pool_sync_adds_and_drops_registry_members_but_keeps_static_ones() -> None:
    from router.replicas import ReplicaPool
    from router.upstream import UpstreamClient

    static = "http://10.0.0.1:8000"
    pool = ReplicaPool([static], RouterSettings(replicas=[static]), UpstreamClient(connect_timeout_s=1))
    added = pool.sync({"http://10.0.0.2:8000", "http://10.0.0.3:8000"})
    assert [r.name for r in added] == ["10.0.0.2:8000", "10.0.0.3:8000"]
    assert not any(r.healthy for r in added)  # admitted only after a health check passes
    assert pool.membership == {"10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"}
    kept = pool.replicas[1]
    assert pool.sync({"http://10.0.0.2:8000", "http://10.0.0.3:8000"}) == []
    assert pool.replicas[1] is kept  # an unchanged member keeps its state (health, in-flight counts)
    pool.sync({"http://10.0.0.3:8000"})
    assert pool.membership == {"10.0.0.1:8000", "10.0.0.3:8000"}
    pool.sync(set())  # the static replica stays whatever the registry says
    assert [r.url for r in pool.replicas] == [static]
