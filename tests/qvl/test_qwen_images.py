"""Qwen3-VL image token counts: smart resize arithmetic, real encoded images, bounds, bad bytes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from qvl.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    FACTOR,
    ImageError,
    ImageTokenCounter,
    image_size,
    image_tokens,
    smart_resize,
    tokens_for_size,
)


def encoded(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [
        (1024, 1024, 32 * 32),  # already a multiple of 32 and within bounds
        (1920, 1080, 60 * 34),  # 1080 rounds to 1088
        (640, 480, 20 * 15),
        (64, 48, 10 * 7),  # under 65,536 pixels: scaled up to 320x224
        (32, 32, 8 * 8),  # scaled up to exactly the lower bound
        (8000, 8000, 128 * 128),  # 64 Mpx scaled down to the 16 Mpx upper bound
    ],
)
def test_known_sizes(width: int, height: int, tokens: int) -> None:
    assert tokens_for_size(width, height) == tokens


@pytest.mark.parametrize("size", [(7, 7), (33, 1000), (333, 777), (1280, 720), (4032, 3024), (12000, 9000)])
def test_resize_keeps_multiples_of_32_within_bounds(size: tuple[int, int]) -> None:
    width, height = size
    h_bar, w_bar = smart_resize(height, width)
    assert h_bar % FACTOR == 0 and w_bar % FACTOR == 0
    assert DEFAULT_MIN_PIXELS <= h_bar * w_bar <= DEFAULT_MAX_PIXELS
    # Aspect ratio survives to within one 32-pixel step on either side.
    assert abs(w_bar / h_bar - width / height) <= (width / height) * 2 * FACTOR / min(h_bar, w_bar)


def test_custom_bounds() -> None:
    assert tokens_for_size(64, 48, min_pixels=1024) == 2 * 2  # no upscale needed: 64x64 after rounding
    assert tokens_for_size(4096, 4096, max_pixels=1024 * 1024) == 32 * 32


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP"])
def test_encoded_images(fmt: str) -> None:
    data = encoded((1280, 720), fmt)
    assert image_size(data) == (1280, 720)
    # 720 / 32 = 22.5, and Python's round() (which Qwen's resize uses) goes to the even 22.
    assert image_tokens(data) == tokens_for_size(1280, 720) == 40 * 22


def test_counter_memoises_by_digest() -> None:
    counter = ImageTokenCounter(items=2)
    small, large = encoded((64, 48)), encoded((1280, 720))
    assert counter.count(b"a", small) == 70
    assert counter.count(b"b", large) == 880
    # The digest is the key: the caller vouches that it names the same bytes.
    assert counter.count(b"a", large) == 70
    assert counter.count(b"c", large) == 880  # evicts "a", the oldest
    assert counter.count(b"a", large) == 880


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", encoded((100, 100))[:20], b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
    ids=["empty", "text", "truncated-png", "png-magic-only"],
)
def test_undecodable_bytes(data: bytes) -> None:
    with pytest.raises(ImageError):
        image_tokens(data)


def test_formats_the_edge_refuses_are_not_read() -> None:
    # One header reader for the edge and the simulated engine: what the edge would refuse, neither reads.
    with pytest.raises(ImageError, match="not JPEG, PNG, WebP or BMP"):
        image_size(encoded((64, 48), "GIF"))


def test_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(ImageError, match="aspect ratio"):
        image_tokens(encoded((6400, 20)))
