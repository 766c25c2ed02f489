"""The largest batch file the router takes, and how long it takes to check it.

One `qvl sim` replica and one `qvl router` (batch files in a temp dir, the router's default limits). The file
has `--lines` lines (default: `router.batch.max_lines`, 50,000), each a chat request with one product
photo as a JPEG data URL (`--image-px` square, noisy so that it does not compress away) and a question;
every line's image differs by a few bytes, so every line is checked in full. The benchmark uploads it
with the official `openai` client (`files.create`), creates the batch, times the `validating` status
(polled every 0.1 s) until the job runs, then cancels the batch: running 50,000 lines is not what is
measured here. The router's peak resident memory is read from /proc while it validates.

    python -m benchmarks.batch_validation [--lines 50000] [--image-px 48]

Writes benchmarks/results/batch_validation.json and .md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

import openai
import psutil
from openai.types import BatchRequestCounts
from PIL import Image

from benchmarks.common import MODEL, RESULTS, start_qvl
from qvl.procs import free_port
from qvl.settings import BatchSettings


def photo(px: int, seed: int) -> bytes:
    """A noisy `px` x `px` JPEG: about the bytes of a real thumbnail, unlike a flat colour."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (px, px), bytes(rng.getrandbits(8) for _ in range(px * px * 3)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def batch_file(lines: int, base: bytes) -> bytes:
    """`lines` JSONL lines, each with its own image (the `base` JPEG with the line number in a JPEG comment)."""
    out = io.BytesIO()
    for i in range(lines):
        # A COM segment right after SOI: a valid JPEG whose bytes (and digest) differ per line.
        comment = f"line {i}".encode()
        jpeg = base[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + base[2:]
        url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
        body = {
            "model": MODEL,
            "max_tokens": 16,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": f"Tag product {i}: category, colour, material."},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
        }
        line = {"custom_id": f"sku-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        out.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")
    return out.getvalue()


def peak_rss(pid: int, stop: threading.Event, peak: list[int]) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], process.memory_info().rss)
        except psutil.Error:
            return
        time.sleep(0.05)


def measure(
    url: str, pid: int, data: bytes
) -> tuple[tuple[float, float, float, float], str, BatchRequestCounts | None, int, int]:
    """Upload `data`, create the batch, wait out `validating`, cancel: (the four moments, the status after
    validation, its counts, the router's resident bytes before, and at its peak)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    idle_rss = psutil.Process(pid).memory_info().rss
    stop, peak = threading.Event(), [idle_rss]
    watcher = threading.Thread(target=peak_rss, args=(pid, stop, peak), daemon=True)
    watcher.start()
    started = time.monotonic()
    upload = client.files.create(file=("catalogue.jsonl", data), purpose="batch")
    uploaded = time.monotonic()
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    created = time.monotonic()
    while (batch := client.batches.retrieve(batch.id)).status == "validating":
        time.sleep(0.1)
    validated = time.monotonic()
    stop.set()
    watcher.join()
    client.batches.cancel(batch.id)
    return (started, uploaded, created, validated), batch.status, batch.request_counts, idle_rss, peak[0]


def run(args: argparse.Namespace) -> dict[str, object]:
    base = photo(args.image_px, 7)
    data = batch_file(args.lines, base)
    limit = BatchSettings().max_file_bytes
    if len(data) > limit:
        raise SystemExit(
            f"the file is {len(data):,} bytes, over router.batch.max_file_bytes ({limit:,}): use fewer "
            "--lines or a smaller --image-px"
        )
    # The router's file store holds the whole upload: a temporary directory, removed afterwards.
    with tempfile.TemporaryDirectory(prefix="qvl-batch-validation-") as tmp:
        config = Path(tmp) / "router.yaml"
        config.write_text(json.dumps({"router": {"batch": {"files_dir": str(Path(tmp) / "files")}}}))  # JSON is YAML
        sim = start_qvl(["sim", "--model", MODEL, "--zero-delay"], free_port(), "/health")
        try:
            router = start_qvl(
                ["router", "--no-auth", "--cache", "off", "--config", str(config), "--replica", sim.url],
                free_port(),
                "/ready",
            )
            try:
                timings, status, counts, idle_rss, peak_rss_bytes = measure(router.url, router.pid, data)
            finally:
                router.stop(10)
        finally:
            sim.stop(10)
    started, uploaded, created, validated = timings
    validation_s = validated - created
    return {
        "benchmark": "batch_validation",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
        "lines": args.lines,
        "bytes": len(data),
        "image_bytes": len(base),
        "image_px": args.image_px,
        "upload_s": round(uploaded - started, 2),
        "validation_s": round(validation_s, 2),
        "lines_per_s": round(args.lines / validation_s, 1),
        "mb_per_s": round(len(data) / 1e6 / validation_s, 1),
        "status_after_validation": status,
        "total_after_validation": counts.total if counts is not None else None,
        "router_rss_idle_mb": round(idle_rss / 2**20, 1),
        "router_rss_peak_mb": round(peak_rss_bytes / 2**20, 1),
    }


def write(result: dict[str, object], out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# The largest batch file, and how long it takes to check",
        "",
        f"{result['date']}, {result['machine']['cpus']} CPUs (shared). One `qvl router` (default limits), "  # type: ignore[index]
        "one `qvl sim --zero-delay`.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| lines | {result['lines']:,} |",
        f"| file bytes | {result['bytes']:,} |",
        f"| image per line | {result['image_px']} x {result['image_px']} JPEG, {result['image_bytes']:,} bytes |",
        f"| upload (files.create) | {result['upload_s']} s |",
        f"| validation (status `validating` until the job runs) | {result['validation_s']} s |",
        f"| validation rate | {result['lines_per_s']:,} lines/s, {result['mb_per_s']} MB/s |",
        f"| status after validation, lines counted | {result['status_after_validation']}, "
        f"{result['total_after_validation']} |",
        f"| router resident memory, idle / peak | {result['router_rss_idle_mb']} / "
        f"{result['router_rss_peak_mb']} MiB |",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=BatchSettings().max_lines, help="lines in the file")
    parser.add_argument(
        "--image-px",
        type=int,
        default=48,
        help="side of each line's JPEG, in pixels (48: 50,000 lines are about 165 MiB)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "batch_validation", help="report path (no suffix)")
    args = parser.parse_args()
    write(run(args), args.out)


if __name__ == "__main__":
    main()
