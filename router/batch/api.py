"""The OpenAI files and batches endpoints: `POST /v1/files`, `GET /v1/files/{id}`, `GET /v1/files/{id}/content`,
`DELETE /v1/files/{id}`, `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches` (paged with `after`
and `limit`), `POST /v1/batches/{id}/cancel`. The shapes are OpenAI's, so the official client works as is.
Files and batches belong to the API key that created them: any other key gets 404, as for a missing one.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from router.auth import ApiKey
from router.batch.files import StoredFile
from router.batch.jobs import ACTIVE, Job, JobStore
from router.batch.lines import ENDPOINT
from router.batch.service import Batches
from router.errors import InvalidRequest, NotFound, RequestTooLarge
from router.state import state_of

WINDOWS = {"24h": 24 * 3600}
"""completion_window values accepted, as OpenAI has them, in seconds."""
_MAX_METADATA = 16


def mount_batches(app: FastAPI) -> None:
    routes = APIRouter()

    @routes.post("/v1/files")
    async def create_file(request: Request) -> JSONResponse:
        """Upload a batch input file (multipart/form-data: `file`, `purpose` = batch)."""
        key, batches, settings = _caller(request)
        limit = settings.router.batch.max_file_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit + 64 * 1024:
            raise RequestTooLarge(
                f"the file is over {limit} bytes (router.batch.max_file_bytes)", code="file_too_large"
            )
        form = await request.form(max_files=1, max_fields=8, max_part_size=limit + 1)
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose != "batch":
            raise InvalidRequest("purpose must be 'batch'", code="invalid_purpose", param="purpose")
        if upload is None or isinstance(upload, str):
            raise InvalidRequest("send the file as the multipart field `file`", code="invalid_file", param="file")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise RequestTooLarge(
                f"the file is over {limit} bytes (router.batch.max_file_bytes)", code="file_too_large"
            )
        stored = await batches.files.put(data, owner=key.id, filename=upload.filename or "", purpose="batch")
        return JSONResponse(stored.to_json())

    @routes.get("/v1/files/{file_id}")
    async def get_file(file_id: str, request: Request) -> JSONResponse:
        key, batches, _ = _caller(request)
        return JSONResponse((await _file(batches, file_id, key)).to_json())

    @routes.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request) -> Response:
        key, batches, _ = _caller(request)
        stored = await _file(batches, file_id, key)
        return Response(await batches.files.content(stored), media_type="application/jsonl")

    @routes.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request) -> JSONResponse:
        key, batches, _ = _caller(request)
        stored = await _file(batches, file_id, key)
        await batches.files.delete(stored)
        return JSONResponse({"id": stored.id, "object": "file", "deleted": True})

    @routes.post("/v1/batches")
    async def create_batch(request: Request) -> JSONResponse:
        """Create a batch from an uploaded file: `input_file_id`, `endpoint`, `completion_window`, `metadata`."""
        key, batches, _ = _caller(request)
        try:
            doc = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise InvalidRequest("the body must be a JSON object", code="invalid_json") from None
        if not isinstance(doc, dict):
            raise InvalidRequest("the body must be a JSON object", code="invalid_json")
        if doc.get("endpoint") != ENDPOINT:
            raise InvalidRequest(f"endpoint must be {ENDPOINT}", code="invalid_batch", param="endpoint")
        window = doc.get("completion_window")
        if window not in WINDOWS:
            raise InvalidRequest("completion_window must be 24h", code="invalid_batch", param="completion_window")
        metadata = doc.get("metadata")
        if metadata is not None and not _metadata_ok(metadata):
            raise InvalidRequest(
                "metadata must map at most 16 keys of up to 64 characters to strings of up to 512",
                code="invalid_batch",
                param="metadata",
            )
        input_id = doc.get("input_file_id")
        stored = await batches.files.get(input_id, key.id) if isinstance(input_id, str) else None
        if stored is None or stored.purpose != "batch":
            raise NotFound(f"no batch input file '{str(input_id)[:80]}'", code="file_not_found", param="input_file_id")
        now = int(time.time())
        job: Job = {
            "id": "batch_" + secrets.token_hex(12),
            "object": "batch",
            "endpoint": ENDPOINT,
            "errors": None,
            "input_file_id": stored.id,
            "completion_window": window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + WINDOWS[str(window)],
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "metadata": metadata,
            "model": None,
            "owner": key.id,
            "total": 0,
            # Pinned now: a rollout that starts later never changes the version a job's lines run on.
            "versions": state_of(request).rollouts.table.current_versions(),
        }
        await batches.jobs.create(job)
        state_of(request).metrics.record_batch("created")
        return JSONResponse(await batch_object(batches.jobs, job))

    @routes.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request) -> JSONResponse:
        key, batches, _ = _caller(request)
        return JSONResponse(await batch_object(batches.jobs, await _job(batches, batch_id, key)))

    @routes.get("/v1/batches")
    async def list_batches(
        request: Request,
        after: str | None = Query(None, max_length=128, description="List after this batch id (paging)."),
        limit: int = Query(20, ge=1, le=100, description="Batches per page."),
    ) -> JSONResponse:
        key, batches, _ = _caller(request)
        jobs, more = await batches.jobs.page(key.id, after, limit)
        data = [await batch_object(batches.jobs, job) for job in jobs]
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": more,
            }
        )

    @routes.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> JSONResponse:
        key, batches, _ = _caller(request)
        job = await _job(batches, batch_id, key)
        changed = await cancel(batches, job)
        return JSONResponse(await batch_object(batches.jobs, changed))

    app.include_router(routes)


async def cancel(batches: Batches, job: Job) -> Job:
    """Move a job to cancelling; the runner stops its new lines and finishes it as cancelled.
    Raises InvalidRequest (batch_not_cancellable) when it has already ended."""
    if job["status"] in ("cancelling", "cancelled"):
        return job
    changed = await batches.jobs.change(
        job["id"], [s for s in ACTIVE if s != "cancelling"], {"status": "cancelling", "cancelling_at": int(time.time())}
    )
    if changed is None:
        latest = await batches.jobs.get(job["id"]) or job
        if latest["status"] in ("cancelling", "cancelled"):
            return latest
        raise InvalidRequest(
            f"batch {job['id']} is {latest['status']} and cannot be cancelled", code="batch_not_cancellable"
        )
    return changed


async def batch_object(jobs: JobStore, job: Job) -> dict[str, Any]:
    """The OpenAI batch object of a stored job, with its current counts."""
    completed, failed = await jobs.counts(job["id"])
    shown = {k: v for k, v in job.items() if k not in ("owner", "total", "versions")}
    shown["request_counts"] = {"total": job["total"], "completed": completed, "failed": failed}
    return shown


def _caller(request: Request) -> tuple[ApiKey, Batches, Any]:
    state = state_of(request)
    key = state.keys.authenticate(request.headers.get("authorization", "").encode("latin-1") or None)
    assert state.batches is not None  # the routes exist only when batches are on
    return key, state.batches, state.settings


async def _file(batches: Batches, file_id: str, key: ApiKey) -> StoredFile:
    stored = await batches.files.get(file_id, key.id)
    if stored is None:
        raise NotFound(f"no file '{file_id[:80]}'", code="file_not_found")
    return stored


async def _job(batches: Batches, batch_id: str, key: ApiKey) -> Job:
    job = await batches.jobs.get(batch_id) if len(batch_id) <= 128 else None
    if job is None or job["owner"] != key.id:
        raise NotFound(f"no batch '{batch_id[:80]}'", code="batch_not_found")
    return job


def _metadata_ok(metadata: object) -> bool:
    return (
        isinstance(metadata, dict)
        and len(metadata) <= _MAX_METADATA
        and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items()
        )
    )
