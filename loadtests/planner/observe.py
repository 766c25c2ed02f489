"""Read calibration (and validation) run folders into what the fit needs: one Observation per answered,
streamed request, on one timeline, and the engine facts the metrics show (mm-cache hits, the most
requests seen running while others waited).

Levels run one after another against the same replicas, so their caches carry over: the timeline puts
each level after the previous one (with an idle gap), and an image's digest is what makes its bytes
(workload seed, image id, size bucket, format; loadtests/schedule.py renders from exactly these).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtests.planner.fit import Observation
from loadtests.records import Record
from loadtests.runfolder import RunFolder, Scrape
from loadtests.schedule import ImageRef, PlannedRequest, build_schedule
from loadtests.workload import Workload, load_workload
from qvl.images import DEFAULT_MAX_PIXELS, tokens_for_size
from serving.sim.core import CoreImage
from serving.sim.profile import Tokens

LEVEL_GAP_S = 1000.0  # idle time put between levels: longer than any request, so no busy period spans two


@dataclass(frozen=True)
class EngineFacts:
    """What the replicas' own metrics said during the runs."""

    mm_queries: int
    mm_hits: int
    most_running: int
    """The most requests one replica ran at once (a scrape's vllm:num_requests_running)."""
    most_running_while_waiting: int | None
    """The most running at a scrape where requests also waited."""

    @property
    def running_cap(self) -> int | None:
        """The running cap, when the runs reached it: requests waited while the most ever seen ran.
        (Requests also wait for a moment between steps with free places, so waiting alone says nothing.)"""
        if self.most_running_while_waiting is not None and self.most_running_while_waiting == self.most_running:
            return self.most_running
        return None


def image_digest(workload: Workload, ref: ImageRef) -> bytes:
    """What makes an image's bytes: the same digest means the same image to every cache."""
    return f"{workload.seed}:{ref.id}:{ref.bucket}:{ref.format}".encode()


@dataclass(frozen=True)
class Level:
    """One measured level, read once: its workload (as run), planned requests and records."""

    workload: Workload
    plans: list[PlannedRequest]
    records: list[Record]


def read_levels(folders: Sequence[Path]) -> list[Level]:
    """The run folders' workloads, schedules and records, in the order given (lightest level first)."""
    levels = []
    for path in folders:
        folder = RunFolder(path)
        workload = load_workload(folder.file("workload.yaml"))
        levels.append(Level(workload, build_schedule(workload), folder.records()))
    return levels


def observations(levels: Sequence[Level], counting: Tokens) -> list[Observation]:
    """Every answered streamed request of `levels`, on one timeline, priced with `counting`."""
    found: list[Observation] = []
    offset = 0.0
    for number, level in enumerate(levels):
        workload = level.workload
        tokens = {b.name: counting.image_tokens(b.width, b.height) for b in workload.images.buckets}
        texts = {t.name: counting.text_tokens(t.prompt) for t in workload.tasks}
        end = 0.0
        for record in level.records:
            end = max(end, record.sent_s + record.e2e_ms / 1000)
            if (
                record.status != 200
                or not record.stream
                or record.ttft_ms is None
                or record.replica is None
                or not record.output_tokens
                or record.prompt_tokens is None
            ):
                continue
            plan = level.plans[record.index]
            images = tuple(CoreImage(image_digest(workload, ref), tokens[ref.bucket]) for ref in plan.images)
            found.append(
                Observation(
                    replica=record.replica,
                    sent_s=offset + record.sent_s,
                    ttft_s=record.ttft_ms / 1000,
                    e2e_s=record.e2e_ms / 1000,
                    output_tokens=record.output_tokens,
                    text_tokens=texts[record.task],
                    images=images,
                    level=number,
                )
            )
        offset += end + LEVEL_GAP_S
    return found


def engine_facts(folders: Sequence[Path]) -> EngineFacts:
    """mm-cache counters (growth over each run, summed over replicas) and the running counts seen."""
    queries = hits = 0
    most = 0
    most_waiting: int | None = None
    for path in folders:
        by_source: dict[str, list[Scrape]] = {}
        for scrape in RunFolder(path).scrapes():
            if scrape.ok and scrape.source.startswith("replica"):
                by_source.setdefault(scrape.source, []).append(scrape)
        for scrapes in by_source.values():
            queries += _growth(scrapes, "vllm:mm_cache_queries_total")
            hits += _growth(scrapes, "vllm:mm_cache_hits_total")
            for scrape in scrapes:
                running = scrape.value("vllm:num_requests_running")
                waiting = scrape.value("vllm:num_requests_waiting")
                if running is None:
                    continue
                most = max(most, int(running))
                if waiting and waiting > 0:
                    most_waiting = max(most_waiting or 0, int(running))
    return EngineFacts(queries, hits, most, most_waiting)


def fit_tokens(workload: Workload, records: Sequence[Record]) -> Tokens:
    """How the measured engine counted prompts, from the prompt sizes it reported.

    The model's processor decides (the tiny test model caps images at 448x448 pixels, Qwen3-VL at
    4096x4096) and its tokenizer and chat template decide the text, so the client's counts by Qwen3-VL's
    rules can be wrong. Every request of a task has the same text, so prompt tokens = text tokens of the
    task + image tokens of the bucket. The smallest bucket is taken at the rules' count (a thumbnail is
    inside every Qwen3-VL processor's bounds), which gives each task's text tokens; those give every other
    bucket's tokens, and a bucket counted below the rules gives the processor's pixel cap. Text tokens are
    template + characters / chars_per_token, fitted over the tasks (4 characters a token, no template, when
    there is a single task).
    """
    default = Tokens()
    # Each with its prompt size, which the filter has made an int.
    answered = [(r, r.prompt_tokens) for r in records if r.prompt_tokens and len(r.image_buckets) == 1]
    if workload.images.per_request != 1 or not answered:
        return default
    buckets = {b.name: b for b in workload.images.buckets}
    smallest = min(buckets.values(), key=lambda b: b.width * b.height)
    text: dict[str, float] = {}
    for task in {r.task for r, _ in answered}:
        sizes = [
            prompt - smallest.tokens for r, prompt in answered if r.task == task and r.image_buckets[0] == smallest.name
        ]
        if sizes:
            text[task] = statistics.median(sizes)
    chars = {t.name: len(t.prompt) for t in workload.tasks if t.name in text}
    if len(chars) >= 2 and len(set(chars.values())) >= 2:
        slope, intercept = statistics.linear_regression([chars[t] for t in chars], [text[t] for t in chars])
        per_token = 1 / slope if slope > 0 else default.chars_per_token
        template = max(round(intercept), 0)
    elif chars:
        task = next(iter(chars))
        per_token, template = default.chars_per_token, max(round(text[task] - chars[task] / 4), 0)
    else:
        return default
    seen = {}
    for bucket in buckets.values():
        bucket_sizes = [
            prompt - text[r.task] for r, prompt in answered if r.image_buckets[0] == bucket.name and r.task in text
        ]
        if bucket_sizes:
            seen[bucket.name] = round(statistics.median(bucket_sizes))
    capped = [b for b in buckets.values() if b.name in seen and seen[b.name] < b.tokens - 1]
    cap = default.image_max_pixels
    if capped:
        # Each capped bucket names the largest cap that still counts it as seen; the one that counts
        # every bucket best wins.
        candidates = [_pixel_cap(b.width, b.height, seen[b.name]) for b in capped]
        cap = min(
            candidates,
            key=lambda c: sum(abs(tokens_for_size(b.width, b.height, max_pixels=c) - seen[b.name]) for b in capped),
        )
    return Tokens(
        chars_per_token=round(per_token, 4),
        template_tokens=template,
        image_max_pixels=cap,
    )


def natural_output_tokens(levels: Sequence[Level]) -> int | None:
    """Where the measured model stopped on its own: the one answer length every request cut short of its
    max_tokens had (the simulated engine stops at its `output_tokens`); None when answers ran to max_tokens
    (the tiny model's random answers do) or stopped at lengths that vary (a real model's do: then the
    workload's max_tokens distribution stands for the answer lengths)."""
    short: set[int] = set()
    for level in levels:
        for record in level.records:
            cap = level.plans[record.index].max_tokens
            if record.status == 200 and record.output_tokens and record.output_tokens < cap:
                short.add(record.output_tokens)
    return short.pop() if len(short) == 1 else None


def _pixel_cap(width: int, height: int, tokens: int) -> int:
    """The largest max_pixels at which a width x height image costs at most `tokens` tokens."""
    lo, hi = 1024, DEFAULT_MAX_PIXELS
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tokens_for_size(width, height, max_pixels=mid) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _growth(scrapes: Sequence[Scrape], name: str) -> int:
    values = [v for v in (s.value(name) for s in scrapes) if v is not None]
    return int(values[-1] - values[0]) if len(values) >= 2 else 0
