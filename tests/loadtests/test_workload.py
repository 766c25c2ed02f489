"""Workload files: the shipped ones load, bad ones fail naming the field, buckets count image tokens
by the router's rules, and the schedule is reproducible from the seed alone."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml
from support import ROOT

from loadtests.popularity import describe
from loadtests.schedule import ImageStore, api_key, build_body, build_schedule, schedule_digest
from loadtests.workload import WorkloadError, load_workload, parse_workload
from qvl.images import image_size, sniff_format, tokens_for_size

WORKLOADS = sorted((ROOT / "loadtests" / "workloads").glob("*.yaml"))


def small(**changes: object) -> dict[str, object]:
    """A small valid workload document; top-level keys replaced by `changes`."""
    doc: dict[str, object] = {
        "version": 1,
        "name": "small",
        "seed": 7,
        "images": {
            "buckets": [
                {"name": "thumbnail", "width": 256, "height": 256, "share": 1},
                {"name": "zoom", "width": 2048, "height": 1536, "share": 1},
            ],
            "formats": {"jpeg": 1, "png": 1, "webp": 1},
        },
        "popularity": {"catalogue": 50, "alpha": 1.0, "upload_share": 0.1},
        "tasks": [
            {"name": "attrs", "prompt": "JSON please", "output": {"kind": "fixed", "tokens": 64}, "share": 2},
            {
                "name": "ask",
                "prompt": "Is it blue?",
                "output": {"kind": "lognormal", "median": 50, "sigma": 0.5, "max": 200},
                "temperature": 0.7,
                "stream": True,
                "share": 1,
            },
        ],
        "arrivals": {"process": "poisson", "rate": 10, "duration_s": 60},
        "tenants": [{"id": "a", "key": "k-a", "share": 3}, {"id": "b", "key_env": "KEY_B", "share": 1}],
    }
    doc.update(changes)
    return doc


@pytest.mark.parametrize("path", WORKLOADS, ids=lambda p: p.name)
def test_shipped_workloads_load_and_describe(path: Path) -> None:
    workload = load_workload(path)
    assert workload.name == path.stem
    assert build_schedule(workload)
    assert "expected answer-cache hit ratio" in describe(workload)


def test_the_three_workloads_ship() -> None:
    assert {p.stem for p in WORKLOADS} >= {"storefront", "catalogue", "flash_sale"}


def test_bad_file_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = tmp_path / "storefront.yaml"
    path.write_text(yaml.safe_dump(small(arrivals={"process": "gamma", "rate": 5, "cv": 0, "duration_s": 10})))
    with pytest.raises(WorkloadError) as caught:
        load_workload(path)
    assert str(caught.value) == "workload storefront.yaml: arrivals.cv: Input should be greater than 0"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"version": 2}, "version"),
        ({"seed": "x"}, "seed"),
        ({"surprise": 1}, "surprise"),
        ({"tenants": [{"id": "a", "share": 1}]}, "tenants.0"),
        (
            {
                "arrivals": {
                    "process": "spike",
                    "base_rate": 1,
                    "multiplier": 0.5,
                    "start_s": 0,
                    "length_s": 1,
                    "duration_s": 5,
                }
            },
            "arrivals.multiplier",
        ),
    ],
)
def test_bad_values_name_their_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(WorkloadError, match=rf"^workload <memory>: {field}: "):
        parse_workload(small(**changes))


@pytest.mark.parametrize("path", WORKLOADS, ids=lambda p: p.name)
def test_bucket_tokens_follow_the_router_rules(path: Path) -> None:
    for bucket in load_workload(path).images.buckets:
        assert bucket.tokens == tokens_for_size(bucket.width, bucket.height)


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    first = schedule_digest(build_schedule(parse_workload(small())))
    again = schedule_digest(build_schedule(parse_workload(small())))
    other = schedule_digest(build_schedule(parse_workload(small(seed=8))))
    assert first == again
    assert first != other


def test_changing_one_choice_leaves_the_other_streams_alone() -> None:
    base = build_schedule(parse_workload(small()))
    # New task shares: the tasks stream changes, send times, tenants and images must not.
    tasks = small()["tasks"]
    assert isinstance(tasks, list)
    reshared = build_schedule(parse_workload(small(tasks=[{**tasks[0], "share": 1}, {**tasks[1], "share": 5}])))
    assert [p.task for p in base] != [p.task for p in reshared]
    for a, b in zip(base, reshared, strict=True):
        assert (a.send_at, a.tenant, a.images) == (b.send_at, b.tenant, b.images)


def test_bodies_carry_deterministic_images_of_the_planned_size_and_format() -> None:
    workload = parse_workload(small())
    plans = build_schedule(workload)
    sizes = {b.name: (b.width, b.height) for b in workload.images.buckets}
    store, fresh = ImageStore(workload), ImageStore(workload)
    for plan in plans[:40]:
        body = build_body(plan, workload, "qwen3-vl", store)
        assert body["max_tokens"] == plan.max_tokens and body["stream"] == plan.stream
        assert ("stream_options" in body) == plan.stream
        messages = body["messages"]
        assert isinstance(messages, list)
        (text, image), ref = messages[0]["content"], plan.images[0]
        assert text["text"] == next(t.prompt for t in workload.tasks if t.name == plan.task)
        prefix, encoded = image["image_url"]["url"].split(",", 1)
        assert prefix == f"data:image/{ref.format};base64"
        data = base64.b64decode(encoded)
        assert sniff_format(data) == ref.format
        assert image_size(data) == sizes[ref.bucket]
        assert data == fresh.get(ref)  # another store renders the same bytes
        assert store.get(ref) is store.get(ref)  # rendered once per image


def test_api_keys_from_the_file_or_the_environment() -> None:
    workload = parse_workload(small())
    given, from_env = workload.tenants
    assert api_key(given, {}) == "k-a"
    assert api_key(from_env, {"KEY_B": "k-b"}) == "k-b"
    with pytest.raises(KeyError):
        api_key(from_env, {})


def test_output_lengths_stay_within_their_bounds() -> None:
    plans = build_schedule(parse_workload(small()))
    assert {p.max_tokens for p in plans if p.task == "attrs"} == {64}
    asked = [p.max_tokens for p in plans if p.task == "ask"]
    assert asked and all(1 <= n <= 200 for n in asked)
    assert all(p.stream and p.temperature == 0.7 for p in plans if p.task == "ask")
