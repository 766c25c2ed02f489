"""The operations page's batch panel: every active batch (on any router sharing the job store) and the ones
that ended in the last hour, with progress, rate and an ETA; operators may cancel a batch from the page."""

from __future__ import annotations

import time

from router.batch.api import batch_object
from router.batch.jobs import ACTIVE
from router.batch.service import Batches

RECENT_S = 3600.0


async def batch_panel(batches: Batches, now: float | None = None) -> list[dict[str, object]]:
    """Active batches, newest first: id, owner, status, counts, lines per second since it started, ETA."""
    now = time.time() if now is None else now
    rows = []
    for batch_id in await batches.jobs.active():
        job = await batches.jobs.get(batch_id)
        if job is None:
            continue
        shown = await batch_object(batches.jobs, job)
        counts = shown["request_counts"]
        done = counts["completed"] + counts["failed"]
        started = job.get("in_progress_at")
        rate = done / (now - started) if started and now > started and done else None
        remaining = max(0, counts["total"] - done)
        rows.append(
            {
                "id": job["id"],
                "owner": job["owner"],
                "status": job["status"],
                "model": job.get("model"),
                "total": counts["total"],
                "completed": counts["completed"],
                "failed": counts["failed"],
                "lines_per_s": rate,
                "eta_s": remaining / rate if rate and job["status"] == "in_progress" else None,
                "created_at": job["created_at"],
                "cancellable": job["status"] in ACTIVE and job["status"] != "cancelling",
            }
        )
    return sorted(rows, key=lambda r: -int(str(r["created_at"])))
