"""The audit log writer: one JSON line per request (router/audit_record.py says what a line holds).

Writing happens off the event loop, in one writer thread:

- **Back-pressure, nothing dropped.** `write()` serialises the record on the loop (a caller's bad
  value raises there, not in the thread), waits for a free slot, and puts the line on an unbounded
  `queue.SimpleQueue`, whose `put` never blocks. The bound is the slot count (`queue_size`), kept on
  the loop by `_Slots`, a FIFO counter: the writer gives slots back with `loop.call_soon_threadsafe`
  once their lines are written, so a full queue makes writers wait (in arrival order) rather than
  block the loop or drop lines. `asyncio.Semaphore` would do, but giving back a batch of n slots to
  many waiters costs it O(n * waiters) on the loop.
- **Batching and rotation.** The thread takes what is queued (up to 1024 lines or 1 MiB), appends it
  with one `os.write` per file it goes to, and rotates when the next line would take the file past
  `max_bytes`: audit.log -> audit.log.1 -> ... -> audit.log.N (`backups`), the oldest dropped. A line is never
  split across files; a line longer than `max_bytes` gets a file of its own. Files are created 0600
  (tightened to 0600 if they already exist), directories 0700. Lines reach the OS when written;
  they are fsynced when a file is rotated and on `close()`.
- **Write errors** (disk full, permissions, a failed rename) never drop a line and never end the
  thread: the batch is kept and retried with backoff (0.05 s doubling to 2 s); its slots stay taken,
  so lines held in memory never exceed `queue_size` and new requests wait. Each distinct error is
  logged at ERROR once per outage; recovery is logged at WARNING. `write_errors` counts failed
  attempts and `lines_written` lines handed to the OS, for the metrics.
- **Shutdown.** `close()` takes a slot like any writer, so every write that was already waiting is
  queued before it, then queues the stop mark and waits (without blocking the loop) for the thread
  to write everything, fsync and exit. Writes after `close()` raise AuditLogError. To bound shutdown,
  wrap `close()` in `asyncio.wait_for`; lines not yet written then are lost when the process exits
  (logged at CRITICAL with their number).

The log rotates itself: do not point logrotate at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import orjson

from qvl.settings import AuditSettings
from router.audit_record import AuditRecord

log = logging.getLogger("qvl.router.audit")

_MAX_BATCH_LINES = 1024
_MAX_BATCH_BYTES = 1 << 20
_FIRST_RETRY_S = 0.05
_LAST_RETRY_S = 2.0


class AuditLogError(RuntimeError):
    """The audit log takes no lines: not started, closed, or its writer thread failed."""


class AuditSink(Protocol):
    """What the router calls; `build_audit_log` gives a file-backed log or, with no path, a no-op."""

    @property
    def include_prompts(self) -> bool: ...
    @property
    def lines_written(self) -> int: ...
    @property
    def write_errors(self) -> int: ...
    @property
    def pending(self) -> int: ...
    async def start(self) -> None: ...
    async def write(self, record: AuditRecord) -> None: ...
    async def close(self) -> None: ...


def build_audit_log(settings: AuditSettings) -> AuditSink:
    """An `AuditLog` when `settings.path` is set, else a `NullAuditLog`."""
    return AuditLog(settings) if settings.path else NullAuditLog()


class NullAuditLog:
    """The audit log when none is configured: accepts records and keeps nothing."""

    include_prompts = False
    lines_written = 0
    write_errors = 0
    pending = 0

    def __init__(self) -> None:
        self._closed = False

    async def start(self) -> None:
        pass

    async def write(self, record: AuditRecord) -> None:
        if self._closed:
            raise AuditLogError("audit log is closed")

    async def close(self) -> None:
        self._closed = True


class AuditLog:
    """The audit log file. `await start()` opens it (raising OSError if it cannot be opened), then
    `await write(record)` per request and `await close()` once; see the module docstring."""

    def __init__(self, settings: AuditSettings) -> None:
        if not settings.path:
            raise ValueError("AuditLog needs audit.path; use build_audit_log for an optional one")
        self._settings = settings
        self._path = Path(settings.path)
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._slots = _Slots(settings.queue_size)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._finished: asyncio.Future[None] | None = None
        self._closed = False
        self._failure: BaseException | None = None
        self._shutdown: asyncio.Future[None] | None = None
        self._accepted = 0
        # Written by the writer thread only; read anywhere (int reads are atomic under the GIL).
        self._lines_written = 0
        self._write_errors = 0
        self._fd: int | None = None
        self._size = 0
        self._errors_seen: set[tuple[str, int | None, str | None]] = set()
        self._retry_s = _FIRST_RETRY_S

    @property
    def include_prompts(self) -> bool:
        return self._settings.include_prompts

    @property
    def lines_written(self) -> int:
        """Lines handed to the OS since start."""
        return self._lines_written

    @property
    def write_errors(self) -> int:
        """Failed attempts to write, rotate or open the file (each retry counts)."""
        return self._write_errors

    @property
    def pending(self) -> int:
        """Lines accepted by `write()` and not yet written."""
        return self._accepted - self._lines_written

    async def start(self) -> None:
        """Open the file (creating its directory) and start the writer thread; raises OSError on failure."""
        if self._thread is not None:
            raise AuditLogError("audit log already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        opened: asyncio.Future[None] = loop.create_future()
        self._finished = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(opened,), name="qvl-audit-writer", daemon=True)
        self._thread.start()
        await opened

    async def write(self, record: AuditRecord) -> None:
        """Queue one line; waits while `queue_size` lines are unwritten. Raises AuditLogError once closed."""
        if self._closed or self._thread is None:
            raise AuditLogError("audit log is closed" if self._closed else "audit log is not started")
        if self._failure is not None:
            raise AuditLogError("audit log writer failed") from self._failure
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        await self._slots.take()
        if self._failure is not None:
            self._slots.give(1)  # wake the next waiter, which fails the same way
            raise AuditLogError("audit log writer failed") from self._failure
        self._accepted += 1
        self._queue.put(line)

    async def close(self) -> None:
        """Write every accepted line, fsync, and stop the thread; idempotent. Raises AuditLogError if the
        writer failed. Cancelling it (`asyncio.wait_for`) leaves the writer going while the process lives."""
        self._closed = True
        if self._thread is None:
            return
        if self._shutdown is None:
            self._shutdown = asyncio.ensure_future(self._stop())
        try:
            await asyncio.shield(self._shutdown)
        except asyncio.CancelledError:
            log.critical("audit log close interrupted with %d lines unwritten", self.pending)
            raise

    async def _stop(self) -> None:
        assert self._thread is not None and self._finished is not None
        # FIFO slots: every write already waiting is queued before the stop mark.
        await self._slots.take()
        if self._failure is None:
            self._queue.put(None)
        await self._finished
        self._thread.join()
        if self._failure is not None:
            raise AuditLogError(f"audit log writer failed; {self.pending} lines unwritten") from self._failure

    # The writer thread.

    def _run(self, opened: asyncio.Future[None]) -> None:
        failure: BaseException | None = None
        try:
            try:
                self._open()
            except OSError as exc:
                failure = exc  # start() raises it
                return
            self._call(_resolve, opened, None)
            stop = False
            while not stop:
                lines, stop = self._take()
                self._write_lines(lines)
            self._close_last()
        except BaseException as exc:
            failure = exc
            log.critical("audit log writer failed; %d lines unwritten", self.pending, exc_info=True)
        finally:
            self._call(self._thread_done, opened, failure)

    def _thread_done(self, opened: asyncio.Future[None], failure: BaseException | None) -> None:
        if failure is not None:
            self._failure = failure
            self._slots.give(1)  # waiting writers wake one another and raise
        _resolve(opened, failure)
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    def _close_last(self) -> None:
        try:
            self._close_file()
        except OSError as exc:  # every line was written; only the fsync is in doubt
            self._write_errors += 1
            log.error("audit log %s: sync on close failed: %s", self._path, exc)

    def _take(self) -> tuple[list[bytes], bool]:
        """Block for the next line, then take what else is queued; True once the stop mark is reached."""
        lines: list[bytes] = []
        size = 0
        item = self._queue.get()
        while item is not None:
            lines.append(item)
            size += len(item)
            if len(lines) >= _MAX_BATCH_LINES or size >= _MAX_BATCH_BYTES:
                return lines, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return lines, False
        return lines, True

    def _write_lines(self, lines: list[bytes]) -> None:
        """Append `lines`, rotating between lines as needed; retries until every line is written."""
        done = 0
        chunk: memoryview | None = None
        count = 0
        while done < len(lines):
            try:
                fd = self._fd if self._fd is not None else self._open()
                if chunk is None:
                    count = self._fitting(lines, done)
                    if count == 0:
                        self._rotate()
                        continue
                    chunk = memoryview(b"".join(lines[done : done + count]))
                while len(chunk):
                    # A partial write leaves the rest in `chunk`: a retry finishes the line, never repeats it.
                    written = os.write(fd, chunk)
                    self._size += written
                    chunk = chunk[written:]
            except OSError as exc:
                self._failed(exc)
                continue
            chunk = None
            done += count
            self._lines_written += count
            self._call(self._slots.give, count)
            if self._errors_seen:
                log.warning("audit log %s is writable again", self._path)
                self._errors_seen.clear()
                self._retry_s = _FIRST_RETRY_S

    def _fitting(self, lines: list[bytes], start: int) -> int:
        """How many lines from `start` fit in the current file (at least one when the file is empty)."""
        room = self._settings.max_bytes - self._size
        count = 0
        for line in lines[start:]:
            if len(line) > room:
                break
            room -= len(line)
            count += 1
        return 1 if count == 0 and self._size == 0 else count

    def _open(self) -> int:
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_mode & 0o077:
            try:
                os.fchmod(fd, 0o600)
            except OSError as exc:
                log.warning("audit log %s: cannot make it private (mode 0600): %s", self._path, exc)
        self._fd, self._size = fd, info.st_size
        return fd

    def _rotate(self) -> None:
        self._close_file()
        # Oldest first, so each rename lands on a free (or dropped) name.
        for n in range(self._settings.backups - 1, 0, -1):
            older = self._backup(n)
            if older.exists():
                os.replace(older, self._backup(n + 1))
        os.replace(self._path, self._backup(1))

    def _backup(self, n: int) -> Path:
        return self._path.with_name(f"{self._path.name}.{n}")

    def _close_file(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            _fsync(fd)
        finally:
            os.close(fd)

    def _failed(self, exc: OSError) -> None:
        self._write_errors += 1
        if self._fd is not None:
            # Reopened on retry: a stale handle (NFS, a replaced file) heals; O_APPEND makes it harmless.
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        key = (type(exc).__name__, exc.errno, exc.strerror)
        if key not in self._errors_seen:
            self._errors_seen.add(key)
            log.error("audit log %s: %s; %d lines held, retrying", self._path, exc, self.pending)
        time.sleep(self._retry_s)
        self._retry_s = min(self._retry_s * 2, _LAST_RETRY_S)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(callback, *args)


class _Slots:
    """Free places in the writer's queue, counted on the event loop; waiters are served in arrival order."""

    def __init__(self, free: int) -> None:
        self._free = free
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def take(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            else:  # granted, then cancelled before it ran: pass the slot on
                self.give(1)
            raise

    def give(self, count: int) -> None:
        self._free += count
        while self._free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._free -= 1


def _resolve(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # a pipe or FIFO: nothing to sync
            raise
