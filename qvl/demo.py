"""`make demo`: bring the cluster up locally, ask one image question through the router, shut down.

By default the replicas are real vLLM servers. Without `--model` they serve the tiny, randomly
initialised Qwen3-VL that `qvl model tiny` builds (no weights are downloaded, ever), so the answer is
real vLLM output from a model that knows nothing: nonsense words that depend on the image. Point
`--model` at a local Qwen3-VL-4B/8B-Instruct checkpoint on a GPU host for a real answer.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import openai
from PIL import Image, ImageDraw

from qvl.procs import StartError, answers, free_port, spawn


def product_photo() -> bytes:
    """A small PNG of a red mug on a light table: a stand-in product photo made on the spot."""
    img = Image.new("RGB", (320, 240), (236, 232, 226))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 170, 320, 240), fill=(200, 190, 175))
    draw.rounded_rectangle((110, 70, 200, 190), radius=12, fill=(190, 30, 40))
    draw.arc((185, 95, 235, 160), start=270, end=90, fill=(190, 30, 40), width=12)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--engine", default="vllm", choices=["sim", "vllm"])
    parser.add_argument("--model", help="checkpoint directory (default: the tiny test model)")
    args = parser.parse_args()

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "qvl",
        "up",
        "--engine",
        args.engine,
        "--replicas",
        str(args.replicas),
        "--port",
        str(port),
        "--policy",
        "image-affinity",
    ]
    if args.model:
        cmd += ["--model", args.model]
    print("$", " ".join(["qvl", *cmd[3:]]), flush=True)
    # The router requires an API key; the demo makes one for this run only.
    api_key = "sk-demo-" + secrets.token_hex(16)
    env = {**os.environ, "QVL_API_KEYS": api_key}
    with tempfile.TemporaryDirectory(prefix="qvl-demo-") as tmp:
        log = Path(tmp) / "up.log"
        up = spawn("qvl up", cmd, url=f"http://127.0.0.1:{port}", log=log, env=env)
        shown = _Echo(log)

        def ready() -> bool:
            shown.more()
            return answers(up.url + "/ready")

        try:
            up.wait_ready(900, check=ready)
            return _ask(up.url, api_key, args.engine, args.model)
        except StartError as exc:
            shown.more()
            raise SystemExit(f"qvl up did not become ready: {exc}") from None
        finally:
            up.stop(grace_s=30)
            shown.more()


def _ask(url: str, api_key: str, engine: str, custom_model: str | None) -> int:
    """One image question through the router, printed with the replica that answered."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0)
    model = client.models.list().data[0].id
    image = "data:image/png;base64," + base64.b64encode(product_photo()).decode()
    question = "What product is in this photo, and what colour is it?"
    print(f"\nQ ({model}, with a 320x240 PNG): {question}", flush=True)
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": question},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
        max_tokens=32,
    )
    answer = raw.parse()
    elapsed = time.perf_counter() - started
    print(f"A: {answer.choices[0].message.content}")
    if engine == "vllm" and not custom_model:
        print("   (vLLM's answer from the tiny random test model: the words are nonsense by design)")
    elif engine == "sim":
        print("   (the simulated engine's filler text)")
    print(
        f"   replica {raw.headers['x-qvl-replica']}, request {raw.headers['x-request-id']}, "
        f"{answer.usage.prompt_tokens if answer.usage else '?'} prompt tokens, {elapsed * 1000:.0f} ms"
    )
    return 0


class _Echo:
    """Prints what `qvl up` writes to its log, a little more on every call."""

    def __init__(self, log: Path) -> None:
        self._log = log
        self._offset = 0

    def more(self) -> None:
        if not self._log.exists():
            return
        with self._log.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
