"""The reproducible schedule of a workload: planned requests, and the chat-completions bodies they become.

Every random choice draws from its own sub-stream, `random.Random(f"{seed}:{name}")` (seeded through
SHA-512, stable across runs and platforms), so the same file and seed give the same schedule byte for
byte, and a new kind of choice added later gets a new stream instead of reshuffling the others.

A catalogue photo is one file: its size bucket and format are drawn once per catalogue index (so the
bucket and format shares hold over the catalogue and over uploads, not weighted by popularity). Each
upload draws its own.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

from loadtests.arrivals import send_times
from loadtests.popularity import ImagePicker
from loadtests.workload import ClosedLoop, FixedLength, ImageFormat, Tenant, UniformLength, Workload


@dataclass(frozen=True)
class ImageRef:
    """One image of a request: a catalogue index or "upload-N", with its size bucket and format."""

    id: int | str
    bucket: str
    format: ImageFormat


@dataclass(frozen=True)
class PlannedRequest:
    """Everything needed to send one request later; `send_at` is None in a closed loop, `user` otherwise."""

    index: int
    send_at: float | None
    user: int | None
    tenant: str
    task: str
    images: tuple[ImageRef, ...]
    max_tokens: int
    temperature: float
    stream: bool


def substream(seed: int, name: str) -> random.Random:
    """The independent random stream `name` of a workload seeded with `seed`."""
    return random.Random(f"{seed}:{name}")


def build_schedule(workload: Workload) -> list[PlannedRequest]:
    """The planned requests of a workload, in send order; deterministic in the file and its seed."""
    seed = workload.seed
    arrivals = workload.arrivals
    times = send_times(arrivals, substream(seed, "arrivals"))
    closed = arrivals if isinstance(arrivals, ClosedLoop) else None
    count = closed.requests if closed is not None else len(times or [])
    tenants, tasks = workload.tenants, workload.tasks
    bucket_names = [b.name for b in workload.images.buckets]
    bucket_weights = [b.share for b in workload.images.buckets]
    formats: list[ImageFormat] = list(workload.images.formats)
    format_weights = list(workload.images.formats.values())

    catalogue_rng = substream(seed, "catalogue")
    catalogue = [
        (catalogue_rng.choices(bucket_names, bucket_weights)[0], catalogue_rng.choices(formats, format_weights)[0])
        for _ in range(workload.popularity.catalogue)
    ]
    tenant_rng, task_rng, output_rng = (substream(seed, s) for s in ("tenants", "tasks", "output"))
    upload_rng = substream(seed, "uploads")
    picker = ImagePicker(workload, substream(seed, "images"))

    plans = []
    for i in range(count):
        tenant = tenant_rng.choices(tenants, [t.share for t in tenants])[0]
        task = task_rng.choices(tasks, [t.share for t in tasks])[0]
        refs = []
        for _ in range(workload.images.per_request):
            image = picker.pick()
            if isinstance(image, int):
                bucket, fmt = catalogue[image]
            else:
                bucket = upload_rng.choices(bucket_names, bucket_weights)[0]
                fmt = upload_rng.choices(formats, format_weights)[0]
            refs.append(ImageRef(image, bucket, fmt))
        out = task.output
        if isinstance(out, FixedLength):
            max_tokens = out.tokens
        elif isinstance(out, UniformLength):
            max_tokens = output_rng.randint(out.min, out.max)
        else:
            drawn = round(output_rng.lognormvariate(math.log(out.median), out.sigma))
            max_tokens = min(out.max, max(out.min, drawn))
        plans.append(
            PlannedRequest(
                index=i,
                send_at=None if times is None else times[i],
                user=None if closed is None else i % closed.users,
                tenant=tenant.id,
                task=task.name,
                images=tuple(refs),
                max_tokens=max_tokens,
                temperature=task.temperature,
                stream=task.stream,
            )
        )
    return plans


def schedule_bytes(plans: Sequence[PlannedRequest]) -> bytes:
    """The schedule as JSON lines with sorted keys: what "identical schedule" is checked against."""
    return b"".join(json.dumps(asdict(p), sort_keys=True).encode() + b"\n" for p in plans)


def schedule_digest(plans: Sequence[PlannedRequest]) -> str:
    """SHA-256 of `schedule_bytes`, hex: a schedule's fingerprint for run records."""
    return hashlib.sha256(schedule_bytes(plans)).hexdigest()


def api_key(tenant: Tenant, environ: Mapping[str, str] | None = None) -> str:
    """The tenant's API key: given in the file, or read from its environment variable (KeyError if unset)."""
    if tenant.key is not None:
        return tenant.key
    env = os.environ if environ is None else environ
    assert tenant.key_env is not None  # the schema requires one of them
    return env[tenant.key_env]


class ImageStore:
    """Image bytes per (id, bucket, format), generated once: the same image is byte-identical every time it
    is sent, as a product photo is, so the caches can recognise it."""

    def __init__(self, workload: Workload, seed: int | None = None) -> None:
        """`seed` (default: the workload's) renders other pixels for the same schedule: a cache that saw
        one store's photos has not seen another's."""
        self._sizes = {b.name: (b.width, b.height) for b in workload.images.buckets}
        self._seed = workload.seed if seed is None else seed
        self._bytes: dict[ImageRef, bytes] = {}

    def get(self, ref: ImageRef) -> bytes:
        """The encoded image; deterministic in the workload seed, the image id, its bucket and format."""
        data = self._bytes.get(ref)
        if data is None:
            data = self._bytes[ref] = render_image(ref, self._sizes[ref.bucket], self._seed)
        return data


def render_image(ref: ImageRef, size: tuple[int, int], seed: int) -> bytes:
    """A product-like picture: a coloured shape and a few stripes on white, encoded in `ref.format`."""
    rng = substream(seed, f"image:{ref.id}")
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
    box = (width // 5, height // 5, width * 4 // 5, height * 4 // 5)
    if rng.random() < 0.5:
        draw.rectangle(box, fill=colour)
    else:
        draw.ellipse(box, fill=colour)
    for _ in range(3):
        y = rng.randrange(height)
        draw.line((0, y, width, y), fill=(rng.randrange(256), rng.randrange(256), rng.randrange(256)), width=3)
    buf = io.BytesIO()
    image.save(buf, format=ref.format.upper())
    return buf.getvalue()


def build_body(plan: PlannedRequest, workload: Workload, model: str, images: ImageStore) -> dict[str, object]:
    """The OpenAI chat-completions JSON body of a planned request, images inline as data URLs."""
    prompt = next(t.prompt for t in workload.tasks if t.name == plan.task)
    content: list[dict[str, object]] = [{"type": "text", "text": prompt}]
    for ref in plan.images:
        url = f"data:image/{ref.format};base64," + base64.b64encode(images.get(ref)).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": plan.max_tokens,
        "temperature": plan.temperature,
        "stream": plan.stream,
    }
    if plan.stream:
        body["stream_options"] = {"include_usage": True}
    return body


def count_by_window(plans: Sequence[PlannedRequest], window_s: float) -> list[int]:
    """Requests per window of `window_s` seconds from 0 (open-loop schedules): the shape of the rate."""
    times = [p.send_at for p in plans if p.send_at is not None]
    if not times:
        return []
    counts = [0] * (int(max(times) // window_s) + 1)
    for key, group in itertools.groupby(times, key=lambda t: int(t // window_s)):
        counts[key] += sum(1 for _ in group)
    return counts
