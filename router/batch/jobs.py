"""Batch job state: each batch object, each line's result, and which router runs the job (a lease).

Two stores with one protocol: `RedisJobs` (shared by every router: jobs survive restarts, and a job whose
router died is resumed by another once its lease lapses) and `MemoryJobs` (this router only, for a single
machine). A line's result is recorded only if none is recorded yet for its custom_id (HSETNX), so however
often a line runs (a router killed after the answer but before recording it), it is in the output once.
Status changes are compare-and-set: a cancel and the runner's finalizing never overwrite each other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

import orjson

from qvl.redis_client import redis_client
from qvl.redis_errors import redis_unavailable
from router.errors import BatchStoreUnavailable

Job = dict[str, Any]
"""A batch object as stored: OpenAI's fields (counts aside) plus `owner`, `total` and `invalid`."""
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("completed", "failed", "expired", "cancelled")


class JobStore(Protocol):
    async def create(self, job: Job) -> None: ...
    async def get(self, batch_id: str) -> Job | None: ...
    async def change(self, batch_id: str, expect: Iterable[str], changes: dict[str, Any]) -> Job | None:
        """Apply `changes` when the job's status is one of `expect`; the job after, or None when it was not."""
        ...

    async def page(self, owner: str, after: str | None, limit: int) -> tuple[list[Job], bool]:
        """The owner's jobs, newest first, after the job `after`; and whether there are more."""
        ...

    async def active(self) -> list[str]: ...
    async def claim(self, batch_id: str, holder: str, lease_s: float) -> bool:
        """Take or renew the job's lease for `holder`; False when another holder's lease has not lapsed."""
        ...

    async def release(self, batch_id: str, holder: str) -> None: ...
    async def record(self, batch_id: str, custom_id: str, ok: bool, line: bytes) -> bool:
        """Record a line's result unless one exists; True when this call recorded it."""
        ...

    async def counts(self, batch_id: str) -> tuple[int, int]:
        """(completed, failed) lines recorded so far."""
        ...

    async def finished(self, batch_id: str) -> set[str]: ...
    async def results(self, batch_id: str) -> dict[str, tuple[bool, bytes]]: ...
    async def close(self) -> None: ...


class MemoryJobs:
    """Job state in this process: lost when the router stops, invisible to other routers."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._results: dict[str, dict[str, tuple[bool, bytes]]] = {}
        self._leases: dict[str, tuple[str, float]] = {}

    async def create(self, job: Job) -> None:
        self._jobs[job["id"]] = dict(job)
        self._results[job["id"]] = {}

    async def get(self, batch_id: str) -> Job | None:
        job = self._jobs.get(batch_id)
        return dict(job) if job is not None else None

    async def change(self, batch_id: str, expect: Iterable[str], changes: dict[str, Any]) -> Job | None:
        job = self._jobs.get(batch_id)
        if job is None or job["status"] not in set(expect):
            return None
        job.update(changes)
        return dict(job)

    async def page(self, owner: str, after: str | None, limit: int) -> tuple[list[Job], bool]:
        mine = sorted((j for j in self._jobs.values() if j["owner"] == owner), key=_newest_first)
        chosen = _after([j["id"] for j in mine], after)[: limit + 1]
        return [dict(self._jobs[i]) for i in chosen[:limit]], len(chosen) > limit

    async def active(self) -> list[str]:
        return [i for i, j in self._jobs.items() if j["status"] in ACTIVE]

    async def claim(self, batch_id: str, holder: str, lease_s: float) -> bool:
        now = time.monotonic()
        current = self._leases.get(batch_id)
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._leases[batch_id] = (holder, now + lease_s)
        return True

    async def release(self, batch_id: str, holder: str) -> None:
        if self._leases.get(batch_id, ("", 0.0))[0] == holder:
            del self._leases[batch_id]

    async def record(self, batch_id: str, custom_id: str, ok: bool, line: bytes) -> bool:
        results = self._results.setdefault(batch_id, {})
        if custom_id in results:
            return False
        results[custom_id] = (ok, line)
        return True

    async def counts(self, batch_id: str) -> tuple[int, int]:
        results = self._results.get(batch_id, {}).values()
        ok = sum(1 for good, _ in results if good)
        return ok, len(results) - ok

    async def finished(self, batch_id: str) -> set[str]:
        return set(self._results.get(batch_id, {}))

    async def results(self, batch_id: str) -> dict[str, tuple[bool, bytes]]:
        return dict(self._results.get(batch_id, {}))

    async def close(self) -> None:
        return None


# KEYS: job hash. ARGV: new doc JSON, new status, expected statuses... Sets both when the status matches.
_CHANGE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
for i = 3, #ARGV do
  if status == ARGV[i] then
    redis.call('HSET', KEYS[1], 'doc', ARGV[1], 'status', ARGV[2])
    return 1
  end
end
return 0
"""
# KEYS: results hash, counts hash. ARGV: custom_id, line, counter field (completed or failed).
_RECORD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
  return 1
end
return 0
"""
# KEYS: lease. ARGV: holder, milliseconds. Takes a free lease or renews one's own.
_CLAIM = """
local current = redis.call('GET', KEYS[1])
if (not current) or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisJobs:
    """Job state in Redis, shared by every router. Keys (under `prefix`): `job:<id>` (hash: doc, status),
    `results:<id>` (custom_id -> 1 byte ok flag + the output line), `counts:<id>`, `lease:<id>`,
    `owner:<key id>` (sorted set by creation time) and `active` (set of job ids)."""

    def __init__(self, url: str, prefix: str, timeout_s: float = 2.0) -> None:
        self._client = redis_client(url, max_connections=16, pool_timeout_s=timeout_s, socket_timeout_s=timeout_s)
        self._p = prefix
        self._change = self._client.register_script(_CHANGE)
        self._record = self._client.register_script(_RECORD)
        self._claim = self._client.register_script(_CLAIM)
        self._release = self._client.register_script(_RELEASE)

    def _unavailable(self) -> Any:
        return redis_unavailable(
            lambda m: BatchStoreUnavailable(
                "the batch job store (Redis) did not answer; retry shortly",
                code="batch_store_unavailable",
                retry_after_s=2,
            )
        )

    async def create(self, job: Job) -> None:
        with self._unavailable():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(f"{self._p}job:{job['id']}", mapping={"doc": orjson.dumps(job), "status": job["status"]})
                pipe.zadd(f"{self._p}owner:{job['owner']}", {job["id"]: job["created_at"]})
                pipe.sadd(f"{self._p}active", job["id"])
                await pipe.execute()

    async def get(self, batch_id: str) -> Job | None:
        with self._unavailable():
            doc = await self._client.hget(f"{self._p}job:{batch_id}", "doc")
        return orjson.loads(doc) if doc is not None else None

    async def change(self, batch_id: str, expect: Iterable[str], changes: dict[str, Any]) -> Job | None:
        job = await self.get(batch_id)
        if job is None:
            return None
        expected = list(expect)
        if job["status"] not in expected:
            return None
        job.update(changes)
        with self._unavailable():
            done = await self._change(
                keys=[f"{self._p}job:{batch_id}"], args=[orjson.dumps(job), job["status"], *expected]
            )
            if done and job["status"] in TERMINAL:
                await self._client.srem(f"{self._p}active", batch_id)
        return job if done else None

    async def page(self, owner: str, after: str | None, limit: int) -> tuple[list[Job], bool]:
        with self._unavailable():
            ids = [_text(i) for i in await self._client.zrevrange(f"{self._p}owner:{owner}", 0, -1)]
            chosen = _after(ids, after)[: limit + 1]
            docs = [await self._client.hget(f"{self._p}job:{i}", "doc") for i in chosen[:limit]]
        return [orjson.loads(d) for d in docs if d is not None], len(chosen) > limit

    async def active(self) -> list[str]:
        with self._unavailable():
            return sorted(_text(i) for i in await self._client.smembers(f"{self._p}active"))

    async def claim(self, batch_id: str, holder: str, lease_s: float) -> bool:
        with self._unavailable():
            return bool(await self._claim(keys=[f"{self._p}lease:{batch_id}"], args=[holder, int(lease_s * 1000)]))

    async def release(self, batch_id: str, holder: str) -> None:
        with self._unavailable():
            await self._release(keys=[f"{self._p}lease:{batch_id}"], args=[holder])

    async def record(self, batch_id: str, custom_id: str, ok: bool, line: bytes) -> bool:
        with self._unavailable():
            return bool(
                await self._record(
                    keys=[f"{self._p}results:{batch_id}", f"{self._p}counts:{batch_id}"],
                    args=[custom_id, (b"1" if ok else b"0") + line, "completed" if ok else "failed"],
                )
            )

    async def counts(self, batch_id: str) -> tuple[int, int]:
        with self._unavailable():
            values = await self._client.hmget(f"{self._p}counts:{batch_id}", ["completed", "failed"])
        return int(values[0] or 0), int(values[1] or 0)

    async def finished(self, batch_id: str) -> set[str]:
        with self._unavailable():
            return {_text(k) for k in await self._client.hkeys(f"{self._p}results:{batch_id}")}

    async def results(self, batch_id: str) -> dict[str, tuple[bool, bytes]]:
        with self._unavailable():
            raw = await self._client.hgetall(f"{self._p}results:{batch_id}")
        return {_text(k): (_raw(v)[:1] == b"1", _raw(v)[1:]) for k, v in raw.items()}

    async def close(self) -> None:
        await self._client.aclose()


def build_job_store(state: str, prefix: str) -> JobStore:
    return MemoryJobs() if state == "memory" else RedisJobs(state, prefix)


def _newest_first(job: Job) -> tuple[int, str]:
    return (-int(job["created_at"]), job["id"])


def _after(ids: list[str], after: str | None) -> list[str]:
    """The ids that follow `after` (all of them when None; none when `after` is unknown)."""
    if after is None:
        return ids
    return ids[ids.index(after) + 1 :] if after in ids else []


def _text(value: object) -> str:
    """A Redis reply (bytes: the client does not decode) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
