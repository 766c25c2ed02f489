"""The operations page's autoscaling panel: what `qvl cluster autoscale` last reported for each pool.

The autoscaler writes its status as one JSON document, `{registry.key_prefix}autoscale:status`, to the
registry's Redis every interval, with a TTL. The router only reads it, through one small client made at
start-up (`AutoscalerStatus`), once per request of the operations JSON. Three outcomes besides rows:
no registry or no key (a `note`, no error: nothing is wrong, there is just no autoscaler), Redis not
answering (`error`, code autoscaler_status_unavailable), a document that does not parse (`error`, code
autoscaler_status_invalid). A document older than 3 intervals + 30 s is shown, marked stale: the
autoscaler stopped writing, and the key's TTL has not yet run out.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qvl.redis_client import redis_client
from qvl.redis_errors import redis_unavailable
from qvl.settings import RegistrySettings

STATUS_KEY = "autoscale:status"
"""After registry.key_prefix; the autoscaler writes it."""
STALE_INTERVALS = 3
STALE_GRACE_S = 30.0
NO_REGISTRY = "the autoscaler reports through the replica registry, and this router has none (registry.url)"
NO_REPORT = "no autoscaler has reported (qvl cluster autoscale)"


class AutoscalerStatusUnavailable(Exception):
    """Redis did not answer the read of the status."""

    code = "autoscaler_status_unavailable"


class AutoscalerStatusInvalid(Exception):
    """The status document is not in the shape the autoscaler writes."""

    code = "autoscaler_status_invalid"


class _Part(BaseModel):
    # Fields the page does not show may come and go with the autoscaler's versions.
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class Capacity(_Part):
    prefill_tokens_s: float
    decode_tokens_s: float
    source: Literal["profile", "settings", "learned", "unknown"]


class LastDecision(_Part):
    at: float
    direction: Literal["up", "down", "hold"]
    reason: str
    from_: int = Field(alias="from")
    to: int
    applied: bool
    """False in dry-run: decided and logged, not done."""


class Sample(_Part):
    at: float
    desired: int
    actual: int
    serving: int
    needed: float | None
    """None where the policy's signal had no value (no data yet)."""
    prefill_tokens_s: float
    decode_tokens_s: float


class PoolStatus(_Part):
    pool: str
    min: int
    max: int
    desired: int
    starting: int
    serving: int
    draining: int
    needed: float | None
    prefill_tokens_s: float
    decode_tokens_s: float
    batch_tokens_s: float = 0.0
    in_flight: float = 0.0
    capacity: Capacity
    startup_s: float
    last: LastDecision | None = None
    history: list[Sample] = []


class StatusDoc(_Part):
    updated_at: float
    interval_s: float = Field(gt=0)
    dry_run: bool
    policy: str
    pools: list[PoolStatus]


class AutoscalerStatus:
    """Reads the autoscaler's status document from the registry's Redis (one bounded client, made once)."""

    def __init__(self, url: str, *, key_prefix: str, timeout_s: float) -> None:
        self.key = key_prefix + STATUS_KEY
        self._timeout_s = timeout_s
        self._client = redis_client(url, max_connections=2, pool_timeout_s=timeout_s, socket_timeout_s=timeout_s)

    @classmethod
    def from_settings(cls, registry: RegistrySettings) -> AutoscalerStatus | None:
        """A reader of the registry's Redis; None without a registry (nothing connects until the first read)."""
        if not registry.url:
            return None
        return cls(registry.url, key_prefix=registry.key_prefix, timeout_s=registry.timeout_s)

    async def read(self) -> StatusDoc | None:
        """The document, None when the key is absent. Raises AutoscalerStatusUnavailable, AutoscalerStatusInvalid."""
        with redis_unavailable(AutoscalerStatusUnavailable):
            async with asyncio.timeout(self._timeout_s):
                raw: bytes | str | None = await self._client.get(self.key)
        if raw is None:
            return None
        try:
            return StatusDoc.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the document"
            raise AutoscalerStatusInvalid(f"the autoscaler's status does not parse: {where}: {first['msg']}") from None

    async def close(self) -> None:
        await self._client.aclose()


async def autoscaling_panel(status: AutoscalerStatus | None, now: float | None = None) -> dict[str, Any]:
    """{"data": one row per pool, "error": None, "note": None}; without rows, a `note` saying why, or the
    `error` {code, message} of a read that failed."""
    if status is None:
        return {"data": [], "error": None, "note": NO_REGISTRY}
    try:
        doc = await status.read()
    except (AutoscalerStatusUnavailable, AutoscalerStatusInvalid) as exc:
        return {"data": [], "error": {"code": exc.code, "message": str(exc)}, "note": None}
    if doc is None:
        return {"data": [], "error": None, "note": NO_REPORT}
    now = time.time() if now is None else now
    rows = [pool_row(doc, pool, now) for pool in doc.pools]
    return {"data": rows, "error": None, "note": None if rows else "the autoscaler reports no pool"}


def stale_after_s(interval_s: float) -> float:
    """Age past which a status is shown as stale: the autoscaler missed three writes, and some slack."""
    return STALE_INTERVALS * interval_s + STALE_GRACE_S


def pool_row(doc: StatusDoc, pool: PoolStatus, now: float) -> dict[str, Any]:
    """One pool as the page shows it."""
    age = max(0.0, now - doc.updated_at)
    last = pool.last
    return {
        "pool": pool.pool,
        "min": pool.min,
        "max": pool.max,
        "desired": pool.desired,
        "starting": pool.starting,
        "serving": pool.serving,
        "draining": pool.draining,
        "needed": None if pool.needed is None else round(pool.needed, 2),
        "load": {
            "prefill_tokens_s": round(pool.prefill_tokens_s, 1),
            "decode_tokens_s": round(pool.decode_tokens_s, 1),
            "batch_tokens_s": round(pool.batch_tokens_s, 1),
            "in_flight": round(pool.in_flight, 1),
        },
        "capacity": pool.capacity.model_dump(),
        "startup_s": pool.startup_s,
        "last": None
        if last is None
        else {
            "at": last.at,
            "age_s": round(max(0.0, now - last.at), 1),
            "direction": last.direction,
            "reason": last.reason,
            "from": last.from_,
            "to": last.to,
            "applied": last.applied,
            "outcome": "applied" if last.applied else "dry_run" if doc.dry_run else "not_applied",
        },
        "history": [sample.model_dump() for sample in pool.history],
        "policy": doc.policy,
        "dry_run": doc.dry_run,
        "interval_s": doc.interval_s,
        "updated_at": doc.updated_at,
        "age_s": round(age, 1),
        "stale": age > stale_after_s(doc.interval_s),
    }
