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
import signal
import socket
import subprocess
import sys
import time

import openai
from PIL import Image, ImageDraw


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

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
    up = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    try:
        url = _wait_ready(up, timeout=900)
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
        if args.engine == "vllm" and not args.model:
            print("   (vLLM's answer from the tiny random test model: the words are nonsense by design)")
        elif args.engine == "sim":
            print("   (the simulated engine's filler text)")
        print(
            f"   replica {raw.headers['x-qvl-replica']}, request {raw.headers['x-request-id']}, "
            f"{answer.usage.prompt_tokens if answer.usage else '?'} prompt tokens, {elapsed * 1000:.0f} ms"
        )
        return 0
    finally:
        if up.poll() is None:
            os.kill(up.pid, signal.SIGTERM)
        rest, _ = up.communicate(timeout=30)
        sys.stdout.write(rest)


def _wait_ready(up: subprocess.Popen[str], timeout: float) -> str:
    assert up.stdout is not None
    deadline = time.monotonic() + timeout
    for line in up.stdout:
        sys.stdout.write(line)
        if line.startswith("qvl: ready at "):
            return line.split()[3]
        if time.monotonic() > deadline:
            break
    raise SystemExit(f"qvl up did not become ready (exit status {up.poll()})")


if __name__ == "__main__":
    sys.exit(main())
