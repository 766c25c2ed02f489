"""Request bodies: real small images as data URLs and OpenAI chat requests carrying them."""

from __future__ import annotations

import base64
import io

from PIL import Image


def png_data_url(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48)) -> str:
    """A small, real PNG as a data URL; a different colour gives a different image digest."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_chat(model: str, image_url: str, text: str = "What is in this photo?", **extra: object) -> dict:
    """A chat completion request: one user message with `text` and one image."""
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": text},
                    {"type": "image_url", "image_url": {"url": image_url}},
                ],
            }
        ],
        **extra,
    }
