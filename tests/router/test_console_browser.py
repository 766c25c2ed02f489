"""The console in a real browser: Playwright for Python driving Debian's Chromium (installed by `make install`,
never downloaded by Playwright), against `qvl up --engine sim` with two replicas, the audit log on, and a GPU
exporter reading the substitute NVML module (tests/serving/fake_nvml). The autoscaling panel is checked on a
router of its own, whose registry is a real redis-server holding the autoscaler's status.

Every wait is on page state (Playwright's expect and wait_for), never a fixed sleep. Screenshots of both pages
and the pages' weight go to test-artifacts/console/ (QVL_TEST_ARTIFACTS overrides the folder).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, Playwright, Request, Response, expect, sync_playwright
from redis import Redis
from support.autoscaler import status_doc
from support.batch import OpenAIClient, batch_lines, wait_batch
from support.console import OPERATOR, VIEWER, console_keys
from support.nvml import fake_gpu, start_fake_exporter
from support.polling import wait_for
from support.servers import Cluster, Proc, RedisServer, sim_pid

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MODEL = "Qwen/Qwen3-VL-4B-Instruct"
MAX_PIXELS = 1_000_000
GPUS = [
    fake_gpu("GPU-console-0", 73, 31, 48, 61, 255, 350, name="NVIDIA L40S"),
    fake_gpu("GPU-console-1", 12, 9, 48, 44, 98, 350, name="NVIDIA L40S"),
]
GPU_HOST = "gpu-node-a"
NO_VALUE = "\u2013"  # what the page shows for a value not known yet


@dataclass
class Console:
    router: Proc
    exporter: Proc
    audit: Path
    artifacts: Path


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("QVL_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "console"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    cluster = Cluster(tmp)
    try:
        exporter = start_fake_exporter(cluster, tmp / "nvml.json", GPUS, GPU_HOST)
        audit = tmp / "audit.jsonl"
        config = tmp / "qvl.yaml"
        config.write_text(
            f"""up: {{engine: sim, replicas: 2, model: "{MODEL}"}}
sim: {{prefill_base_ms: 40, step_base_ms: 12, output_tokens: 24}}
router:
  auth: {{keys_file: "{console_keys(tmp)}"}}
  audit: {{path: "{audit}"}}
  limits: {{max_image_pixels: {MAX_PIXELS}}}
  console: {{gpu_exporters: ["{exporter.url}"]}}
  batch: {{files_dir: "{tmp / "batch-files"}"}}
"""
        )
        router = cluster.start("up", "--config", str(config), ready_path="/health", auth=True)
        yield Console(router, exporter, audit, artifacts_dir())
    finally:
        cluster.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make install` installs it"
    with sync_playwright() as playwright:
        yield launch(playwright)


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True)


@pytest.fixture(scope="module")
def weights(console: Console) -> Iterator[dict[str, int]]:
    """Bytes of every HTML, JS and CSS body the browser received, by path; written out at the end."""
    received: dict[str, int] = {}
    yield received
    pages = {
        "signin": ["/console/signin", "/console/static/console.css"],
        "playground": ["/console/playground", "/console/static/playground.js", "/console/static/console.css"],
        "operations": ["/console/operations", "/console/static/operations.js", "/console/static/console.css"],
    }
    report = {
        name: {"files": {path: received.get(path) for path in paths}, "total": sum(received.get(p, 0) for p in paths)}
        for name, paths in pages.items()
    }
    (console.artifacts / "page-weight.json").write_text(json.dumps(report, indent=2) + "\n")


@pytest.fixture
def page(browser: Browser, console: Console, weights: dict[str, int]) -> Iterator[Page]:
    context = browser.new_context(base_url=console.router.url, viewport={"width": 1280, "height": 860})
    elsewhere: list[str] = []
    context.on("request", lambda r: None if r.url.startswith(console.router.url) else elsewhere.append(r.url))
    context.on("response", lambda r: record_weight(weights, r))
    page = context.new_page()
    try:
        yield page
        assert elsewhere == [], "the console loaded something from another origin"
    finally:
        context.close()


def sign_in(page: Page, key: str) -> None:
    page.goto("/console")
    expect(page).to_have_url(re.compile(r"/console/signin$"))
    page.fill("#key", key)
    page.click("#signin")


def photo(path: Path, size: tuple[int, int]) -> Path:
    """A product-photo-like PNG: a bag-coloured rectangle on a light background, `size` pixels."""
    image = Image.new("RGB", size, (236, 236, 232))
    w, h = size
    image.paste((122, 68, 40), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    image.save(path, format="PNG")
    return path


def drop_image(page: Page, path: Path) -> None:
    """Drop the file on the playground's drop zone, as a drag from the desktop would (a DataTransfer)."""
    transfer = page.evaluate_handle(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            return transfer;
        }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def audit_lines(console: Console, key_id: str) -> list[dict]:
    if not console.audit.exists():
        return []
    return [line for line in map(json.loads, console.audit.read_text().splitlines()) if line["key_id"] == key_id]


def test_a_wrong_key_is_refused_with_the_reason_and_roles_hold_in_the_browser(page: Page, console: Console) -> None:
    sign_in(page, "sk-this-is-not-a-key-here")
    expect(page.locator("#signin-error")).to_contain_text("invalid API key")
    expect(page).to_have_url(re.compile(r"/console/signin$"))
    for path in ("/console/api/session", "/console/api/playground", "/console/api/operations"):
        answer = page.request.get(path)
        assert answer.status == 401 and answer.json()["error"]["code"] == "console_session_missing"

    sign_in(page, VIEWER)
    expect(page).to_have_url(re.compile(r"/console/playground$"))
    expect(page.locator("header nav")).not_to_contain_text("Operations")
    assert page.request.get("/console/api/session").json()["role"] == "viewer"
    denied = page.request.get("/console/api/operations")
    assert denied.status == 403 and denied.json()["error"]["code"] == "operator_only"
    page.goto("/console/operations")
    expect(page.locator("main")).to_contain_text("role: operator")


def test_an_image_question_streams_and_the_follow_up_still_sends_the_image(
    page: Page, console: Console, tmp_path: Path
) -> None:
    big = photo(tmp_path / "bag.png", (1600, 1200))  # 1.9 MP: over the router's 1 MP
    sign_in(page, VIEWER)
    expect(page.locator("#model")).to_have_value(MODEL)
    page.set_input_files("#files", str(big))
    expect(page.locator("#attached .thumb")).to_have_count(1)
    expect(page.locator("#attached .thumb")).to_contain_text("scaled 1600\u00d71200")

    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    with page.expect_response("**/v1/chat/completions") as first:
        page.fill("#question", "What is this bag made of?")
        page.keyboard.press("Enter")
    assert first.value.status == 200
    assert first.value.headers["content-type"].startswith("text/event-stream")
    answer = page.locator(".msg.assistant").nth(0)
    expect(answer).to_have_class(re.compile(r"\bdone\b"))
    meta = answer.locator(".meta")
    expect(meta).to_contain_text(re.compile(r"TTFT \d+(\.\d+)? m?s"))
    expect(meta).to_contain_text(re.compile(r"replica 127\.0\.0\.1:\d+"))
    expect(meta).to_contain_text("tokens/s")
    expect(meta).to_contain_text(re.compile(r"cache (miss|bypass)"))  # sampled at 0.7: bypass
    assert answer.locator(".text").inner_text().strip()

    page.fill("#question", "Is the same bag also sold in black?")
    page.click("#send")
    expect(page.locator(".msg.assistant.done")).to_have_count(2)
    page.screenshot(path=str(console.artifacts / "playground.png"), full_page=True)

    # The browser sent the photo scaled under the router's pixel limit, and sent it again with the follow-up.
    images = [
        [p for m in b["messages"] for p in m["content"] if isinstance(m["content"], list) and p["type"] == "image_url"]
        for b in bodies
    ]
    assert [len(i) for i in images] == [1, 1]
    assert images[0] == images[1]
    url = images[0][0]["image_url"]["url"]
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as sent:
        assert sent.width * sent.height <= MAX_PIXELS and sent.width / sent.height == pytest.approx(4 / 3, rel=0.01)
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    # The router's audit log shows the same image digest in both turns, under the viewer's key.
    wait_for(lambda: len(audit_lines(console, "viewer")) >= 2, timeout=10)  # written after the answer
    turns = [line for line in audit_lines(console, "viewer") if line["status"] == 200]
    assert len(turns) == 2
    assert turns[0]["image_digests"] == turns[1]["image_digests"] and len(turns[0]["image_digests"]) == 1


def test_the_controls_change_the_request_and_clear_forgets_the_conversation(
    page: Page, console: Console, tmp_path: Path
) -> None:
    sign_in(page, VIEWER)
    expect(page.locator("#model")).to_have_value(MODEL)
    page.locator("#temperature").fill("1.3")
    page.locator("#max-tokens").fill("7")
    page.locator("#top-p").fill("0.8")
    page.fill("#system", "Answer in one line.")
    expect(page.locator("#temperature-value")).to_have_text("1.3")

    def ask(question: str) -> Request:
        with page.expect_request("**/v1/chat/completions") as sent:
            page.fill("#question", question)
            page.click("#send")
        expect(page.locator("#send")).to_be_enabled()
        return sent.value

    drop_image(page, photo(tmp_path / "shoe.png", (320, 240)))
    expect(page.locator("#attached .thumb")).to_contain_text("320\u00d7240")
    body = ask("Which colour is it?").post_data_json
    assert (body["temperature"], body["max_tokens"], body["top_p"]) == (1.3, 7, 0.8)
    assert body["messages"][0] == {"role": "system", "content": "Answer in one line."}
    dropped = body["messages"][1]["content"][0]["image_url"]["url"]
    assert dropped == "data:image/png;base64," + base64.b64encode((tmp_path / "shoe.png").read_bytes()).decode()
    expect(page.locator(".msg.assistant .meta").last).to_contain_text("7 tokens")

    page.locator("#temperature").fill("0")
    page.locator("#max-tokens").fill("3")
    body = ask("And the size?").post_data_json
    assert (body["temperature"], body["max_tokens"]) == (0, 3)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]

    page.click("#clear")
    expect(page.locator("#transcript .msg")).to_have_count(0)
    body = ask("A new question.").post_data_json
    assert [m["role"] for m in body["messages"]] == ["system", "user"]


def test_an_operator_follows_a_batch_and_cancels_it_from_the_operations_page(
    page: Page, console: Console, openai_client: OpenAIClient
) -> None:
    client = openai_client(console.router.url, OPERATOR)
    upload = client.files.create(file=("catalogue.jsonl", batch_lines(MODEL, 3000, max_tokens=24)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    sign_in(page, OPERATOR)
    page.goto("/console/operations")
    row = page.locator(f'#batches tr[data-batch="{batch.id}"]')
    expect(row).to_have_attribute("data-status", "in_progress")
    expect(row).to_contain_text("/ 3000")
    expect(row).to_contain_text("lines/s")
    page.screenshot(path=str(console.artifacts / "operations-batch.png"), full_page=True)
    row.get_by_role("button", name="Cancel").click()
    expect(row).to_have_count(0, timeout=15_000)  # cancelled: no longer an active batch
    done = wait_batch(client, batch.id, timeout=30)
    assert done.status == "cancelled" and done.request_counts is not None and done.request_counts.completed < 3000


def test_the_operations_page_shows_the_fleet_and_a_killed_source_within_seconds(
    page: Page, console: Console, browser: Browser
) -> None:
    # Some traffic first, so the router's cards have a last minute to show.
    for i in range(6):
        httpx.post(
            console.router.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {OPERATOR}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": f"hello {i % 3}"}], "max_tokens": 4},
            timeout=30,
        ).raise_for_status()
    sign_in(page, OPERATOR)
    page.goto("/console/operations")
    replicas = page.locator("#replicas tr")
    expect(replicas).to_have_count(2)
    expect(page.locator('#replicas tr[data-state="healthy"]')).to_have_count(2)
    gpus = page.locator("#gpus tr")
    expect(gpus).to_have_count(2)
    expect(page.locator(f'#gpus tr[data-gpu="{GPU_HOST}/0"]')).to_contain_text("31.0 / 48.0 GiB")
    expect(page.locator(f'#gpus tr[data-gpu="{GPU_HOST}/0"]')).to_contain_text("61 °C")
    expect(page.locator(f'#gpus tr[data-gpu="{GPU_HOST}/1"]')).to_contain_text("98 / 350 W")
    expect(page.locator('[data-metric="request-rate"] .v')).not_to_have_text(NO_VALUE)
    expect(page.locator('[data-metric="ttft-p50"] .v')).not_to_have_text(NO_VALUE)
    # No rollout has run on this cluster (its routes and rollouts are in the router's memory).
    expect(page.locator('[data-panel="rollouts"]')).to_contain_text("No rollout yet")
    # Nor an autoscaler: it reports through the replica registry, which this cluster does not use.
    expect(page.locator("#autoscaling-note")).to_contain_text("this router has none (registry.url)")
    page.screenshot(path=str(console.artifacts / "operations.png"), full_page=True)

    # Kill one replica and the GPU exporter outright.
    victim = replicas.nth(1).get_attribute("data-replica")
    assert victim is not None
    os.kill(sim_pid(int(victim.rsplit(":", 1)[1])), signal.SIGKILL)
    console.exporter.kill()
    row = page.locator(f'#replicas tr[data-replica="{victim}"]')
    expect(row).to_have_attribute("data-state", re.compile("failing|ejected"), timeout=3000)
    expect(row).to_have_attribute("data-stale", "true", timeout=20_000)
    expect(page.locator('#gpus tr[data-stale="true"]')).to_have_count(2, timeout=20_000)
    expect(page.locator("#exporters")).to_contain_text("stale")
    expect(page.locator('#replicas tr[data-state="healthy"][data-stale="false"]')).to_have_count(1)
    page.screenshot(path=str(console.artifacts / "operations-stale.png"), full_page=True)


def test_the_autoscaling_panel_draws_each_pool_and_marks_a_stale_status(
    browser: Browser, cluster: Cluster, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Its own router, whose registry is a real Redis holding the autoscaler's status (written by the test)."""
    config = tmp_path / "registry.yaml"
    config.write_text(f'registry: {{url: "{redis_server.url}"}}\n')
    keys = console_keys(tmp_path)
    router = cluster.router(cluster.sim(), flags=("--keys-file", str(keys), "--config", str(config)), auth=True)
    with Redis.from_url(redis_server.url) as redis:
        now = time.time()
        redis.set("qvl:autoscale:status", json.dumps(status_doc(now, ["stable", "canary"], history=30)), ex=60)
        context = browser.new_context(base_url=router.url, viewport={"width": 1600, "height": 860})
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            sign_in(page, OPERATOR)
            page.goto("/console/operations")
            rows = page.locator("#autoscaling tr")
            expect(rows).to_have_count(2)
            stable = page.locator('#autoscaling tr[data-pool="stable"]')
            expect(stable).to_have_attribute("data-direction", "up")
            expect(stable).to_contain_text("1\u20138")
            expect(stable).to_contain_text("1 starting \u00b7 2 serving \u00b7 0 draining")
            expect(stable).to_contain_text("5.1 k prefill \u00b7 820 decode tok/s")
            expect(stable).to_contain_text("(profile)")
            expect(stable).to_contain_text("demand_up 2 \u2192 3 applied")
            expect(stable).to_have_attribute("data-stale", "false")
            chart = stable.locator("svg.chart")
            expect(chart).to_have_attribute("data-points", "30")
            expect(chart.locator("polyline")).to_have_count(4)
            expect(page.locator("#autoscaling-meta")).to_have_text("policy demand \u00b7 every 10 s")
            page.locator('[data-panel="autoscaling"]').screenshot(
                path=str(artifacts_dir() / "operations-autoscaling.png")
            )

            # The autoscaler stopped writing a minute ago, in dry-run: the rows say both.
            old = status_doc(now - 61, ["stable"], dry_run=True)
            redis.set("qvl:autoscale:status", json.dumps(old), ex=60)
            expect(rows).to_have_count(1)
            expect(stable).to_have_attribute("data-stale", "true")
            expect(stable).to_contain_text("dry run")
            redis.delete("qvl:autoscale:status")
            expect(rows).to_have_count(0)
            expect(page.locator("#autoscaling-note")).to_contain_text("no autoscaler has reported")
            assert errors == [], "the page's script failed"
        finally:
            context.close()


def record_weight(weights: dict[str, int], response: Response) -> None:
    if response.request.resource_type in ("document", "script", "stylesheet") and response.status == 200:
        weights[urlsplit(response.url).path] = len(response.body())
