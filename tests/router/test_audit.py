"""The audit log writer: exact JSON lines, nothing dropped, the event loop never blocked, rotation,
back-pressure (a FIFO nobody reads stands in for a stuck disk), write errors retried, files private.
What a line holds is tested in test_audit_record.py."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import orjson
import pytest
from support.polling import wait_for_async

from qvl.settings import AuditSettings
from router.audit import AuditLog, AuditLogError, NullAuditLog, build_audit_log
from router.audit_record import AuditRecord

FIELDS = [
    "time",
    "request_id",
    "key_id",
    "model",
    "image_digests",
    "prompt_digest",
    "cache",
    "replica",
    "status",
    "error_type",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "batch_id",
    "prompt",
    "version",
    "event",
    "detail",
]


def record(request_id: str, prompt: str | None = None) -> AuditRecord:
    return AuditRecord(
        time=1_760_000_000.25,
        request_id=request_id,
        key_id="team-a",
        model="Qwen/Qwen3-VL-8B-Instruct",
        image_digests=("ab" * 32,),
        prompt_digest="cd" * 32,
        cache="miss",
        replica="127.0.0.1:9001",
        status=200,
        error_type="",
        latency_ms=812.5,
        prompt_tokens=1200,
        completion_tokens=37,
        prompt=prompt,
    )


def settings(path: Path, **extra: object) -> AuditSettings:
    return AuditSettings.model_validate({"path": str(path), **extra})


def lines_of(path: Path, backups: int = 0) -> list[dict[str, object]]:
    """Every line of the log and its rotated files, oldest first."""
    files = [path.with_name(f"{path.name}.{n}") for n in range(backups, 0, -1)] + [path]
    return [orjson.loads(line) for f in files if f.exists() for line in f.read_bytes().splitlines()]


def read_fifo(fd: int, pause_s: float = 0.0) -> bytes:
    """Read a FIFO until its writer closes it, optionally slowly."""
    chunks = []
    while chunk := os.read(fd, 16384):
        chunks.append(chunk)
        if pause_s:
            time.sleep(pause_s)
    os.close(fd)
    return b"".join(chunks)


def open_fifo(path: Path) -> int:
    """Make a FIFO at `path` and open its read end (so the log's open does not wait for a reader)."""
    os.mkfifo(path, 0o600)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    os.set_blocking(fd, True)
    return fd


def test_lines_round_trip_with_exact_keys_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    written = [record("r-1"), record("r-2", prompt="naïve ☕ question\nsecond line")]

    async def main() -> AuditLog:
        log = AuditLog(settings(path))
        await log.start()
        for r in written:
            await log.write(r)
        await log.close()
        return log

    log = asyncio.run(main())
    raw = path.read_bytes()
    assert "naïve ☕".encode() in raw  # UTF-8, not \u escapes
    assert raw.count(b"\n") == 2
    docs = lines_of(path)
    assert [list(d) for d in docs] == [FIELDS, FIELDS]
    assert [AuditRecord(**{**d, "image_digests": tuple(d["image_digests"])}) for d in docs] == written  # type: ignore[arg-type]
    assert docs[0]["completion_tokens"] == 37
    assert docs[0]["prompt"] is None
    assert log.lines_written == 2
    assert log.write_errors == 0


def test_ten_thousand_concurrent_writes_all_land_in_order_per_task(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    tasks, per_task = 100, 100

    async def main() -> AuditLog:
        log = AuditLog(settings(path, queue_size=100))  # far fewer slots than writers: they wait their turn
        await log.start()

        async def writer(t: int) -> None:
            for i in range(per_task):
                await log.write(record(f"{t}:{i}"))

        await asyncio.gather(*(writer(t) for t in range(tasks)))
        await log.close()
        return log

    log = asyncio.run(main())
    ids = [str(d["request_id"]) for d in lines_of(path)]
    assert len(ids) == tasks * per_task == log.lines_written
    seen: dict[str, list[int]] = {}
    for rid in ids:
        t, i = rid.split(":")
        seen.setdefault(t, []).append(int(i))
    assert seen == {str(t): list(range(per_task)) for t in range(tasks)}


def test_the_file_is_written_off_the_event_loop_while_a_slow_reader_holds_the_writer_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.log"
    reader = open_fifo(path)
    total, queue_size = 50_000, 1000
    got: list[bytes] = []
    # Which threads write: checked directly, where a wall-clock bound on the loop's pauses would also
    # measure how busy the machine is.
    writers: set[str] = set()
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):  # the audit log; not whatever else writes meanwhile
            writers.add(threading.current_thread().name)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)

    async def main() -> tuple[str, int]:
        log = AuditLog(settings(path, queue_size=queue_size, max_bytes=1 << 40))
        await log.start()
        slow = threading.Thread(target=lambda: got.append(read_fifo(reader, pause_s=0.001)))
        slow.start()
        done = False
        max_pending = 0

        async def sampler() -> None:
            nonlocal max_pending
            while not done:
                await asyncio.sleep(0.001)
                max_pending = max(max_pending, log.pending)

        sampling = asyncio.create_task(sampler())

        async def writer(t: int) -> None:
            for i in range(total // 50):
                await log.write(record(f"{t}:{i}"))

        await asyncio.gather(*(writer(t) for t in range(50)))
        await log.close()
        done = True
        await sampling
        await asyncio.to_thread(slow.join)
        return threading.current_thread().name, max_pending

    loop_thread, max_pending = asyncio.run(main())
    assert got[0].count(b"\n") == total
    assert max_pending > queue_size // 2, "the writer was never the bottleneck: the test proves nothing"
    assert writers == {"qvl-audit-writer"}, f"{loop_thread} wrote to the file: the event loop blocked on it"


def test_rotation_keeps_backups_and_never_splits_a_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    backups = 3

    async def main() -> None:
        log = AuditLog(settings(path, max_bytes=1024, backups=backups))
        await log.start()
        for i in range(100):
            await log.write(record(str(i)))
        await log.close()

    asyncio.run(main())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    for name in names:
        raw = (tmp_path / name).read_bytes()
        assert 0 < len(raw) <= 1024
        assert raw.endswith(b"\n")
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    ids = [int(str(d["request_id"])) for d in lines_of(path, backups)]  # every line parses whole
    assert ids == list(range(100 - len(ids), 100))  # the newest lines, contiguous, oldest files dropped


def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"

    async def main() -> None:
        log = AuditLog(settings(path, max_bytes=1024, backups=5))
        await log.start()
        await log.write(record("small-1"))
        await log.write(record("big", prompt="x" * 3000))
        await log.write(record("small-2"))
        await log.close()

    asyncio.run(main())
    per_file = [[d["request_id"] for d in lines_of(path.with_name(f"audit.log.{n}"))] for n in (2, 1)]
    assert per_file == [["small-1"], ["big"]]
    assert [d["request_id"] for d in lines_of(path)] == ["small-2"]


def test_close_writes_everything_queued(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    total = 20_000
    # A directory where the one rotation must put the first file holds the writer back (it retries), so
    # lines are certainly still queued when close() is called; it is removed while close() waits.
    blocker = tmp_path / "audit.log.1"
    blocker.mkdir()
    (blocker / "keep").write_text("x")

    async def main() -> None:
        log = AuditLog(settings(path, max_bytes=5 << 20, backups=1))  # two files hold them all (one rotation)
        await log.start()
        await asyncio.gather(*(log.write(record(str(i))) for i in range(total)))
        assert log.pending > 1000
        closing = asyncio.create_task(log.close())
        await asyncio.sleep(0.1)
        assert not closing.done()
        shutil.rmtree(blocker)
        await asyncio.wait_for(closing, 20)

    asyncio.run(main())
    assert blocker.is_file()  # the rotation happened once the way was clear
    ids = [d["request_id"] for d in lines_of(path, backups=1)]
    assert len(ids) == total
    assert ids == [str(i) for i in range(total)]


def test_full_queue_makes_writers_wait_until_the_reader_drains(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    reader = open_fifo(path)

    async def main() -> bytes:
        log = AuditLog(settings(path, queue_size=100, max_bytes=1 << 40))
        await log.start()
        # A line bigger than the pipe's buffer: the writer blocks inside it, holding its slot.
        await asyncio.wait_for(log.write(record("0", prompt="x" * 300_000)), 5)
        for i in range(1, 100):
            await asyncio.wait_for(log.write(record(str(i))), 5)
        late = asyncio.create_task(log.write(record("100")))
        await asyncio.sleep(0.3)
        assert not late.done(), "the 101st write did not wait for space"
        draining = asyncio.create_task(asyncio.to_thread(read_fifo, reader))
        await asyncio.wait_for(late, 10)
        await log.close()
        return await draining

    raw = asyncio.run(main())
    assert [orjson.loads(line)["request_id"] for line in raw.splitlines()] == [str(i) for i in range(101)]


def test_write_errors_are_retried_logged_once_and_lose_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    blocker = tmp_path / "audit.log.1"  # a directory where rotation must rename the file: the rename fails
    blocker.mkdir()
    (blocker / "keep").write_text("x")

    fit = 1024 // (len(orjson.dumps(record("0"))) + 1)
    total = fit + 2  # the first line past `fit` needs a rotation

    async def main() -> AuditLog:
        log = AuditLog(settings(path, max_bytes=1024, backups=1))
        await log.start()
        for i in range(total):
            await log.write(record(str(i)))
        await wait_for_async(lambda: log.write_errors >= 3, 10)
        assert log.lines_written == fit
        assert log.pending == 2
        shutil.rmtree(blocker)
        await wait_for_async(lambda: log.lines_written == total, 10)
        await log.close()
        return log

    with caplog.at_level(logging.WARNING, logger="qvl.router.audit"):
        log = asyncio.run(main())
    errors = [r for r in caplog.records if r.name == "qvl.router.audit" and r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "audit.log" in errors[0].getMessage()
    assert any("writable again" in r.getMessage() for r in caplog.records)
    assert [d["request_id"] for d in lines_of(path, backups=1)] == [str(i) for i in range(total)]
    assert log.write_errors >= 3


def test_file_is_private_and_its_directory_created(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "audit.log"
    existing = tmp_path / "old.log"
    existing.write_text("")
    existing.chmod(0o644)

    async def main() -> None:
        for p in (path, existing):
            log = AuditLog(settings(p))
            await log.start()
            await log.write(record("r"))
            await log.close()

    old_umask = os.umask(0)
    try:
        asyncio.run(main())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600


def test_lifecycle_errors(tmp_path: Path) -> None:
    async def main() -> None:
        log = AuditLog(settings(tmp_path / "audit.log"))
        with pytest.raises(AuditLogError, match="not started"):
            await log.write(record("early"))
        await log.start()
        with pytest.raises(AuditLogError, match="already started"):
            await log.start()
        await log.write(record("r"))
        await log.close()
        await log.close()
        with pytest.raises(AuditLogError, match="closed"):
            await log.write(record("late"))

        unopenable = AuditLog(settings(tmp_path))  # a directory
        with pytest.raises(IsADirectoryError):
            await unopenable.start()
        with pytest.raises(AuditLogError, match="failed"):
            await unopenable.write(record("r"))

    asyncio.run(main())
    assert [d["request_id"] for d in lines_of(tmp_path / "audit.log")] == ["r"]


def test_no_path_gives_a_log_that_keeps_nothing(tmp_path: Path) -> None:
    sink = build_audit_log(AuditSettings())
    assert isinstance(sink, NullAuditLog)
    assert isinstance(build_audit_log(settings(tmp_path / "audit.log")), AuditLog)
    with pytest.raises(ValueError, match=r"audit\.path"):
        AuditLog(AuditSettings())

    async def main() -> None:
        await sink.start()
        await sink.write(record("r"))
        await sink.close()
        with pytest.raises(AuditLogError):
            await sink.write(record("late"))

    asyncio.run(main())
    assert (sink.lines_written, sink.write_errors, sink.pending, sink.include_prompts) == (0, 0, 0, False)
    assert list(tmp_path.iterdir()) == []
