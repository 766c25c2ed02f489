"""`qvl batch submit | status | cancel`: batch jobs for operators without the SDK (the OpenAI Batch API).

    qvl batch submit catalogue.jsonl --wait          # upload, create, show progress, download the results
    qvl batch status batch_...                       # the batch as JSON
    qvl batch cancel batch_...

A client of the router (`--url`, default http://127.0.0.1:8000; the key from --api-key, QVL_API_KEY or
OPENAI_API_KEY). Exit status: 0 the batch completed with every line answered, 3 it completed with failed
lines (see the error file), 1 it failed, expired or was cancelled, or the router refused, 2 bad input,
130 interrupted while waiting (the batch goes on: `qvl batch status ID`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import openai
from openai.types import Batch

_END = ("completed", "failed", "expired", "cancelled")


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    batch = sub.add_parser(
        "batch",
        help="Batch jobs: submit a JSONL file of chat requests and fetch the answers.",
        description="Batch jobs through the router's OpenAI Batch API: `qvl batch submit`, `status`, `cancel`.",
    )
    actions = batch.add_subparsers(dest="batch_action", required=True, metavar="ACTION")
    submit = actions.add_parser(
        "submit",
        help="Upload FILE, create a batch from it, and with --wait follow it and download the results.",
        description="Upload FILE (JSON lines of {custom_id, method: POST, url: /v1/chat/completions, body}) and "
        "create a batch from it (completion window 24h).",
    )
    submit.add_argument("file", type=Path, help="the batch input file (JSONL)")
    submit.add_argument("--wait", action="store_true", help="follow the batch to its end, then download results")
    submit.add_argument(
        "--out", type=Path, default=None, help="folder for FILE.output.jsonl and FILE.errors.jsonl (default: FILE's)"
    )
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="batch metadata (repeat)")
    submit.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="seconds between progress lines")
    status = actions.add_parser("status", help="Print a batch as JSON.", description="Print a batch as JSON.")
    status.add_argument("batch_id", help="the batch id (batch_...)")
    cancel = actions.add_parser(
        "cancel", help="Cancel a batch: no new line starts; finished lines are kept.", description="Cancel a batch."
    )
    cancel.add_argument("batch_id", help="the batch id (batch_...)")
    for p in (submit, status, cancel):
        p.add_argument("--url", default="http://127.0.0.1:8000", help="the router's base URL")
        p.add_argument(
            "--api-key", default=None, help="API key (default: $QVL_API_KEY, else $OPENAI_API_KEY, else none)"
        )
        p.set_defaults(standalone=run)


def run(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("QVL_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"
    client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=key, max_retries=2)
    try:
        if args.batch_action == "submit":
            return _submit(client, args)
        if args.batch_action == "status":
            print(client.batches.retrieve(args.batch_id).model_dump_json(indent=2))
            return 0
        batch = client.batches.cancel(args.batch_id)
        print(f"{batch.id}: {batch.status}")
        return 0
    except openai.APIStatusError as exc:
        print(f"qvl: the router refused: {exc.status_code} {_message(exc)}", file=sys.stderr)
        return 1
    except openai.APIConnectionError:
        print(f"qvl: cannot reach the router at {args.url}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _submit(client: openai.OpenAI, args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        print(f"qvl: no such file: {path}", file=sys.stderr)
        return 2
    metadata: dict[str, str] = {}
    for pair in args.metadata:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            print(f"qvl: --metadata takes KEY=VALUE, got {pair!r}", file=sys.stderr)
            return 2
        metadata[name] = value
    upload = client.files.create(file=(path.name, path.read_bytes()), purpose="batch")
    batch = client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata or None,
    )
    print(f"qvl: batch {batch.id} created from {path} ({upload.bytes} bytes, file {upload.id})", flush=True)
    if not args.wait:
        return 0
    try:
        batch = _follow(client, batch, args.interval)
    except KeyboardInterrupt:
        print(f"\nqvl: still running; follow it with `qvl batch status {batch.id}`", file=sys.stderr)
        return 130
    out = args.out or path.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = path.name.removesuffix(".jsonl")
    for file_id, suffix in ((batch.output_file_id, "output"), (batch.error_file_id, "errors")):
        if file_id:
            target = out / f"{stem}.{suffix}.jsonl"
            target.write_bytes(client.files.content(file_id).read())
            print(f"qvl: {suffix} written to {target}")
    if batch.status != "completed":
        detail = json.dumps(batch.errors.model_dump()["data"]) if batch.errors else ""
        print(f"qvl: batch {batch.id} {batch.status} {detail}".rstrip(), file=sys.stderr)
        return 1
    failed = batch.request_counts.failed if batch.request_counts else 0
    return 3 if failed else 0


def _follow(client: openai.OpenAI, batch: Batch, interval: float) -> Batch:
    """Poll until the batch ends, printing progress: done/total, failed, lines per second and an ETA."""
    started = time.monotonic()
    first_done: tuple[float, int] | None = None
    while batch.status not in _END:
        time.sleep(interval)
        batch = client.batches.retrieve(batch.id)
        counts = batch.request_counts
        done = (counts.completed + counts.failed) if counts else 0
        total = counts.total if counts else 0
        now = time.monotonic()
        if first_done is None and batch.status == "in_progress":
            first_done = (now, done)
        rate = (done - first_done[1]) / (now - first_done[0]) if first_done and now > first_done[0] else 0.0
        eta = f", ETA {_duration((total - done) / rate)}" if rate > 0 and total > done else ""
        failed = counts.failed if counts else 0
        print(
            f"qvl: {batch.id} {batch.status}: {done}/{total} lines ({failed} failed), {rate:.1f} lines/s{eta}, "
            f"{_duration(now - started)} so far",
            flush=True,
        )
    return batch


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    return str(error.get("message", exc.message)) if isinstance(error, dict) else exc.message
