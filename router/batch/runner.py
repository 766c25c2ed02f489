"""The batch runner: every router runs one. It takes jobs (a lease in the job store, renewed while it runs
them; a job whose router died is taken by another once the lease lapses), validates each job's lines, and
sends lines through the chat handler at batch priority while replicas have room.

Dispatch: every `_TICK_S` the runner finds the replicas with room (router/classes.py's `batch_room`), one
new line each at most every `start_interval_s`, and hands those lines out round-robin over the owners of its
jobs, then over each owner's jobs, so tenants share spare capacity evenly; each line goes to the replica it
was counted on. When a replica stops having room (requests wait in its engine, or its KV cache is nearly
full), each scrape that shows it takes back as many of its lines as requests wait, newest first, down to
one, and puts them back in the job's queue: batch backs off within a scrape interval or two. A job with no
line finished for `aging_after_s` may run one line at a time on a busy replica (the aging floor), unless
`strict`.

A line's result is recorded once (router/batch/jobs.py); a line that a router ran but did not record before
dying runs again elsewhere, and only one result is kept. Results become the output and error files when
the last line is recorded (or the job is cancelled or expires).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import orjson
from starlette.types import ASGIApp

from qvl.settings import RouterSettings
from router.auth import ApiKey, KeyRing
from router.batch.files import FileStore
from router.batch.jobs import ACTIVE, Job, JobStore
from router.batch.line import BatchLine, call_chat
from router.batch.lines import FileError, Line, LineError, read_lines, validate
from router.classes import batch_room, spare
from router.edge import BatchTicket
from router.errors import RouterError
from router.metrics import RouterMetrics
from router.replicas import EngineGauges, Replica

log = logging.getLogger("qvl.router.batch")
_TICK_S = 0.05
_STATUS_EVERY_S = 0.5
_RETRY_LATER = {"queue_full", "queue_timeout", "no_healthy_replica", "quota_exceeded", "quota_unavailable"}
"""Answers after which a line waits and goes again, without counting as an attempt: the cluster or the key's
quota is short for now, the line itself is fine."""


def output_id(batch_id: str, kind: str) -> str:
    """The id of a job's output or error file: fixed, so a job finalized twice writes the same files."""
    return f"file-{batch_id.removeprefix('batch_')}-{kind}"


@dataclass(eq=False, slots=True)
class Running:
    """A job this router holds: its lines still to run and those in flight."""

    job: Job
    line: BatchLine
    order: list[str] = field(default_factory=list)
    """custom_ids (or `line:<n>` for a line without one) in input order: the output's order."""
    pending: collections.deque[Line] = field(default_factory=collections.deque)
    flying: dict[asyncio.Task[None], tuple[Line, BatchTicket]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)
    not_before: float = 0.0
    """monotonic time before which no line is sent (a quota or an outage said to wait)."""
    last_done: float = field(default_factory=time.monotonic)
    stopping: bool = False
    expired: bool = False
    task: asyncio.Task[None] | None = None


class Runner:
    def __init__(
        self,
        chat: ASGIApp,
        store: JobStore,
        files: FileStore,
        keys: KeyRing,
        replicas: Callable[[], Iterable[Replica]],
        settings: RouterSettings,
        metrics: RouterMetrics,
    ) -> None:
        self._chat = chat
        self._store = store
        self._files = files
        self._keys = keys
        self._replicas = replicas
        self._settings = settings
        self._batch = settings.batch
        self._metrics = metrics
        self.holder = secrets.token_hex(8)
        self.jobs: dict[str, Running] = {}
        self._turn = 0
        self._started: dict[str, float] = {}  # replica -> when this router last sent it a line (pacing)
        self._acted_on: dict[str, EngineGauges] = {}  # replica -> the scrape its last back-off answered

    async def run(self) -> None:
        """Take jobs and dispatch their lines until cancelled."""
        dispatcher = asyncio.create_task(self._dispatch_forever(), name="batch-dispatch")
        try:
            while True:
                try:
                    await self._take_jobs()
                except RouterError as exc:
                    log.warning("batch job store: %s", exc.message)
                except Exception:
                    log.exception("batch runner round failed")
                await asyncio.sleep(self._batch.poll_interval_s)
        finally:
            dispatcher.cancel()
            for running in list(self.jobs.values()):
                if running.task is not None:
                    running.task.cancel()
            await asyncio.gather(
                dispatcher, *(r.task for r in self.jobs.values() if r.task is not None), return_exceptions=True
            )

    async def _take_jobs(self) -> None:
        lease = self._batch.lease_s
        for batch_id, running in list(self.jobs.items()):
            if not await self._store.claim(batch_id, self.holder, lease):
                log.warning("lost the lease of batch %s; another router runs it now", batch_id)
                running.stopping = True
                if running.task is not None:
                    running.task.cancel()
        for batch_id in await self._store.active():
            if batch_id in self.jobs or not await self._store.claim(batch_id, self.holder, lease):
                continue
            job = await self._store.get(batch_id)
            if job is None or job["status"] not in ACTIVE:
                await self._store.release(batch_id, self.holder)
                continue
            key = self._keys.by_id(job["owner"])
            # A key removed from the keys file: the job fails; the placeholder may use no model.
            owner = key or ApiKey(id=job["owner"], models=frozenset())
            running = Running(job, BatchLine(owner, batch_id, versions=dict(job.get("versions") or {})))
            self.jobs[batch_id] = running
            running.task = asyncio.create_task(self._run_job(running, key is not None), name=f"batch-{batch_id}")
            log.info("running batch %s (%s)", batch_id, job["status"])

    async def _run_job(self, running: Running, key_known: bool) -> None:
        batch_id = running.job["id"]
        try:
            if not key_known:
                await self._fail(running, "key_gone", "the API key that created this batch no longer exists")
                return
            if running.job["status"] == "validating" and not await self._validate(running):
                return
            if not await self._load(running):
                return
            await self._until_done(running)
            await self._finalize(running)
        except asyncio.CancelledError:
            for task in running.flying:
                task.cancel()
            raise
        except RouterError as exc:
            # The store is down: drop the job; the lease lapses and a router (this one, later) resumes it.
            log.warning("batch %s paused: %s", batch_id, exc.message)
        except Exception:
            log.exception("batch %s failed in the runner", batch_id)
        finally:
            self.jobs.pop(batch_id, None)
            for task in running.flying:
                task.cancel()
            with contextlib.suppress(RouterError):
                await self._store.release(batch_id, self.holder)

    async def _validate(self, running: Running) -> bool:
        """Check every line; record the refused ones as failed. False when the job failed as a whole."""
        job = running.job
        key = running.line.key
        stored = await self._files.get(job["input_file_id"], job["owner"])
        if stored is None:
            await self._fail(running, "input_file_gone", "the input file was deleted before the batch started")
            return False
        data = await self._files.content(stored)
        try:
            good, bad = await validate(data, key, self._settings.limits, self._settings.fetch, self._batch.max_lines)
        except FileError as exc:
            await self._fail(running, "invalid_file", exc.message, exc.line)
            return False
        for error in bad:
            await self._store.record(job["id"], _line_key(error.custom_id, error.number), False, _refused(error))
        total = len(good) + len(bad)
        model = orjson.loads(good[0].body).get("model") if good else None
        now = int(time.time())
        changed = await self._store.change(
            job["id"], ["validating"], {"status": "in_progress", "in_progress_at": now, "total": total, "model": model}
        )
        if changed is None:  # cancelled while validating
            latest = await self._store.get(job["id"])
            running.job = latest if latest is not None else job
            return running.job["status"] in ACTIVE
        running.job = changed
        self._metrics.record_batch("in_progress")
        return True

    async def _load(self, running: Running) -> bool:
        """The lines still to run: every line of the input with no recorded result. False (the job failed)
        when the input file is gone."""
        job = running.job
        stored = await self._files.get(job["input_file_id"], job["owner"])
        if stored is None:
            await self._fail(running, "input_file_gone", "the input file was deleted while the batch ran")
            return False
        done = await self._store.finished(job["id"])
        items = list(read_lines(await self._files.content(stored), self._batch.max_lines))  # valid: it was checked
        for item in items:
            line_key = _line_key(item.custom_id, item.number)
            running.order.append(line_key)
            if isinstance(item, Line) and line_key not in done:
                running.pending.append(item)
        return True

    async def _until_done(self, running: Running) -> None:
        last_status = 0.0
        while running.pending or running.flying:
            now = time.monotonic()
            if now - last_status >= _STATUS_EVERY_S:
                last_status = now
                latest = await self._store.get(running.job["id"])
                if latest is not None:
                    running.job = latest
                if running.job["status"] == "cancelling":
                    running.pending.clear()  # lines in flight finish; no new one starts
                elif running.job.get("expires_at") and time.time() > running.job["expires_at"]:
                    await self._expire(running)
            await asyncio.sleep(_TICK_S)

    async def _expire(self, running: Running) -> None:
        for line in running.pending:
            error = LineError(line.number, line.custom_id, "batch_expired", "the batch expired before this line ran")
            await self._store.record(running.job["id"], line.custom_id, False, _refused(error))
        running.pending.clear()
        running.expired = True

    # ---- dispatch -------------------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            try:
                self._back_off()
                self._dispatch()
            except Exception:
                log.exception("batch dispatch failed")
            await asyncio.sleep(_TICK_S)

    def make_room(self, replica: Replica) -> None:
        """Abort this router's newest batch line on `replica` (called by the proxy when an interactive
        request finds the engine full: aborting frees its slot at once); the line runs again later."""
        for task, ticket in self._newest_first(replica)[:1]:
            ticket.aborted = True
            task.cancel()

    def _back_off(self) -> None:
        """Once per scrape of a replica that no longer has room, abort as many of this router's batch lines
        on it as requests wait in its engine (all but one when its KV cache is what is short), newest first:
        the oldest lines are nearest their end, and the lines left run on while the freed slots serve the
        queue. A scrape that still shows a queue takes more back, down to one line."""
        for replica in self._replicas():
            if replica.batch_in_flight <= 1 or spare(replica, self._batch):
                continue
            if self._acted_on.get(replica.name) is replica.engine:
                continue  # this scrape was answered already
            self._acted_on[replica.name] = replica.engine
            excess = replica.batch_in_flight - 1
            if replica.waiting > 0:
                excess = min(excess, math.ceil(replica.waiting))
            for task, ticket in self._newest_first(replica)[:excess]:
                ticket.aborted = True
                task.cancel()

    def _newest_first(self, replica: Replica) -> list[tuple[asyncio.Task[None], BatchTicket]]:
        """This router's lines on `replica` that may be taken back, the most recently started first. A line
        under the aging floor is never taken back: that would starve it again."""
        mine = [
            (task, ticket)
            for running in self.jobs.values()
            for task, (_, ticket) in running.flying.items()
            if ticket.replica == replica.name and not ticket.aborted and not ticket.floor
        ]
        return sorted(mine, key=lambda pair: pair[1].started, reverse=True)

    def _dispatch(self) -> None:
        # At most one new line per replica every `start_interval_s`: batch prefills spread over the engine's
        # steps instead of arriving together and stretching one that interactive requests wait on. Each line
        # is meant for the replica whose room it was counted on (the proxy sends it there).
        now = time.monotonic()
        interval = self._batch.start_interval_s
        free: list[str] = []
        for r in self._replicas():
            if r.healthy and batch_room(r, self._batch, now=now) and now - self._started.get(r.name, 0.0) >= interval:
                free.append(r.name)
        ready = [r for r in self.jobs.values() if r.pending and not r.stopping and r.not_before <= now]
        if not ready:
            return
        if not free:
            if not self._batch.strict:
                self._floor(ready, now)
            return
        by_owner: dict[str, list[Running]] = collections.defaultdict(list)
        for running in ready:
            by_owner[running.job["owner"]].append(running)
        owners = sorted(by_owner)
        while free and any(r.pending for r in ready):
            self._turn += 1
            jobs = by_owner[owners[self._turn % len(owners)]]
            running = jobs[(self._turn // len(owners)) % len(jobs)]
            if running.pending:
                replica = free.pop()
                self._started[replica] = now
                self._start(running, running.pending.popleft(), floor=False, wanted=replica)

    def _floor(self, ready: list[Running], now: float) -> None:
        """The aging floor: a job starved for aging_after_s sends one line, if it has none in flight."""
        for running in ready:
            starved = not running.flying and now - running.last_done >= self._batch.aging_after_s
            if starved and any(r.healthy and batch_room(r, self._batch, floor=True) for r in self._replicas()):
                self._start(running, running.pending.popleft(), floor=True)

    def _start(self, running: Running, line: Line, floor: bool, wanted: str = "") -> None:
        ticket = BatchTicket(floor=floor, wanted=wanted, started=time.monotonic())
        task = asyncio.create_task(self._run_line(running, line, ticket), name=f"batch-line-{line.custom_id[:32]}")
        running.flying[task] = (line, ticket)

    async def _run_line(self, running: Running, line: Line, ticket: BatchTicket) -> None:
        batch_id = running.job["id"]
        request_id = f"{batch_id}-{secrets.token_hex(6)}"
        try:
            batch_line = BatchLine(running.line.key, batch_id, ticket, running.line.versions)
            answer = await call_chat(self._chat, batch_line, line.body, request_id)
        except asyncio.CancelledError:
            running.flying.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            if ticket.aborted and not running.stopping:
                running.pending.appendleft(line)  # backed off: it runs again when there is room
                self._metrics.record_admission("batch", "aborted")
                return
            raise
        running.flying.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        error = _error_of(answer.body) if answer.status != 200 else None
        code = (error or {}).get("code")
        if error is not None and code in _RETRY_LATER:
            running.pending.appendleft(line)
            wait = float(answer.headers.get("retry-after", "1"))
            running.not_before = max(running.not_before, time.monotonic() + min(wait, 30.0))
            self._metrics.record_admission("batch", "deferred")
            return
        if answer.status >= 500:
            attempts = running.attempts.get(line.custom_id, 0) + 1
            running.attempts[line.custom_id] = attempts
            if attempts < self._batch.line_attempts:
                running.pending.append(line)
                return
        ok = answer.status == 200
        body = orjson.loads(answer.body) if answer.body else None
        record = {
            "id": "batch_req_" + secrets.token_hex(12),
            "custom_id": line.custom_id,
            "response": {
                "status_code": answer.status,
                "request_id": answer.headers.get("x-request-id", request_id),
                "body": body,
            },
            "error": None,
        }
        if await self._store.record(batch_id, line.custom_id, ok, orjson.dumps(record)):
            self._metrics.record_batch_line("completed" if ok else "failed")
        running.last_done = time.monotonic()

    # ---- the end of a job -----------------------------------------------------------------------------

    async def _finalize(self, running: Running) -> None:
        job = running.job
        batch_id = job["id"]
        latest = await self._store.get(batch_id)
        status = latest["status"] if latest is not None else job["status"]
        final = "cancelled" if status == "cancelling" else "expired" if running.expired else "completed"
        now = int(time.time())
        if status == "in_progress":
            if (
                await self._store.change(batch_id, ["in_progress"], {"status": "finalizing", "finalizing_at": now})
                is None
            ):
                return await self._finalize(running)  # cancelled meanwhile: finish as cancelled
            status = "finalizing"
        results = await self._store.results(batch_id)
        out: list[bytes] = []
        err: list[bytes] = []
        for line_key in running.order:
            found = results.get(line_key)
            if found is not None:
                (out if found[0] else err).append(found[1])
        changes: dict[str, object] = {"status": final, f"{final}_at": now}
        # The output file always exists for a completed batch; the error file only when a line failed.
        for kind, lines, wanted in (("output", out, bool(out) or final == "completed"), ("error", err, bool(err))):
            if wanted:
                stored = await self._files.put(
                    b"".join(line + b"\n" for line in lines),
                    owner=job["owner"],
                    filename=f"{batch_id}_{kind}.jsonl",
                    purpose="batch_output",
                    file_id=output_id(batch_id, kind),
                )
                changes[f"{kind}_file_id"] = stored.id
        if await self._store.change(batch_id, [status], changes) is not None:
            self._metrics.record_batch(final)
            log.info("batch %s %s: %d lines answered, %d failed", batch_id, final, len(out), len(err))

    async def _fail(self, running: Running, code: str, message: str, line: int | None = None) -> None:
        errors = {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": line}]}
        now = int(time.time())
        if await self._store.change(
            running.job["id"], ACTIVE, {"status": "failed", "failed_at": now, "errors": errors}
        ):
            self._metrics.record_batch("failed")


def _line_key(custom_id: str, number: int) -> str:
    return custom_id or f"line:{number}"


def _refused(error: LineError) -> bytes:
    """The error-file line of a line that never ran."""
    return orjson.dumps(
        {
            "id": "batch_req_" + secrets.token_hex(12),
            "custom_id": error.custom_id or None,
            "response": None,
            "error": {"code": error.code, "message": error.message, "line": error.number},
        }
    )


def _error_of(body: bytes) -> dict[str, object] | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, dict) else None
