"""Single-flight inside one router, over the memory store: one leader, everyone else coalesced."""

from __future__ import annotations

import asyncio

import orjson

from cache.flight import AnswerCache
from cache.memory import MemoryStore
from qvl.settings import CacheSettings
from router.edge import parse_chat_request

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a red mug"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
)


class Counts:
    def __init__(self) -> None:
        self.results: list[str] = []
        self.stored = 0

    def record_cache_result(self, result: str) -> None:
        self.results.append(result)

    def record_cache_operation(self, op: str, store: str, seconds: float) -> None:
        pass

    def record_cache_stored(self, store: str) -> None:
        self.stored += 1


def request(temperature: float | None = 0.0):
    doc: dict = {"model": "m", "messages": [{"role": "user", "content": "what is it?"}]}
    if temperature is not None:
        doc["temperature"] = temperature
    return parse_chat_request(orjson.dumps(doc))


def cache(counts: Counts) -> AnswerCache:
    return AnswerCache(MemoryStore(max_entries=100, max_bytes=1 << 20), CacheSettings(), counts)


def test_ten_identical_requests_make_one_leader() -> None:
    async def main() -> list[str]:
        counts = Counts()
        answers = cache(counts)
        upstream_calls = 0

        async def one() -> str:
            nonlocal upstream_calls
            lookup = await answers.begin(request(), None)
            if lookup.flight is not None:
                upstream_calls += 1
                await asyncio.sleep(0.05)  # the replica works
                await lookup.flight.finish(ANSWER)
            return lookup.result

        results = await asyncio.gather(*(one() for _ in range(10)))
        assert upstream_calls == 1 and counts.stored == 1
        assert (await answers.begin(request(), None)).entry == ANSWER
        return list(results)

    results = asyncio.run(main())
    assert results.count("miss") == 1 and results.count("coalesced") == 9


def test_a_failed_leader_sends_followers_upstream_themselves() -> None:
    async def main() -> list[str]:
        answers = cache(Counts())
        leader = await answers.begin(request(), None)
        assert leader.result == "miss" and leader.flight is not None
        followers = [asyncio.create_task(answers.begin(request(), None)) for _ in range(3)]
        await asyncio.sleep(0.01)
        await leader.flight.finish(None)  # the replica failed: nothing to share
        return [f.result for f in await asyncio.gather(*followers)]

    assert asyncio.run(main()) == ["miss", "miss", "miss"]


def test_nondeterministic_requests_bypass() -> None:
    async def main() -> str:
        return (await cache(Counts()).begin(request(temperature=None), None)).result

    assert asyncio.run(main()) == "bypass"
