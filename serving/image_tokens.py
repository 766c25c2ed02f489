"""How many prompt tokens Qwen3-VL spends on an image, computed from the image header alone.

Qwen3-VL cuts an image into 16x16 patches and merges 2x2 of them into one token, so each side is
first resized ("smart resize") to a multiple of 32 pixels, keeping the aspect ratio, with the pixel
count held between a lower and an upper bound (the model's defaults: 65,536 and 16,777,216). The
token count is then (height / 32) * (width / 32). Only the header is read: Pillow's `Image.open`
is lazy, so counting costs microseconds even for large images.
"""

from __future__ import annotations

import math
from io import BytesIO

from PIL import Image, UnidentifiedImageError

PATCH_SIZE = 16
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
DEFAULT_MIN_PIXELS = 65_536
DEFAULT_MAX_PIXELS = 16_777_216
# Qwen's image processors refuse images more elongated than this.
MAX_ASPECT_RATIO = 200


class ImageError(ValueError):
    """The bytes are not an image Pillow can identify, or its shape is one Qwen3-VL refuses."""


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, read from its header; raises ImageError if undecodable."""
    try:
        with Image.open(BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot identify image: {type(exc).__name__}") from None
    except (OSError, ValueError, SyntaxError):
        # Pillow's header parsers raise these on truncated or corrupt headers.
        raise ImageError("cannot read the image header") from None
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    return width, height


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) after Qwen's smart resize: multiples of `factor`, pixels within the bounds.

    Mirrors `smart_resize` of Qwen's vision utilities; raises ImageError when the aspect ratio
    exceeds 200, as the model's processor does.
    """
    if height < 1 or width < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageError(f"image aspect ratio must be at most {MAX_ASPECT_RATIO}:1, got {width}x{height}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def tokens_for_size(
    width: int, height: int, *, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS
) -> int:
    """Image tokens of a `width` x `height` image after smart resize."""
    h_bar, w_bar = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    return (h_bar // FACTOR) * (w_bar // FACTOR)


def image_tokens(data: bytes, *, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Image tokens Qwen3-VL spends on the encoded image `data`; raises ImageError if undecodable."""
    width, height = image_size(data)
    return tokens_for_size(width, height, min_pixels=min_pixels, max_pixels=max_pixels)


class ImageTokenCounter:
    """`image_tokens` with a bounded memo keyed by the caller's digest of the same bytes.

    The count is a pure function of the bytes, so the memo changes no result; it spares re-reading
    headers of images seen before (load tests repeat images). Not thread-safe; one per event loop.
    """

    def __init__(
        self, *, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS, items: int = 4096
    ) -> None:
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self._items = items
        self._memo: dict[bytes, int] = {}

    def count(self, digest: bytes, data: bytes) -> int:
        """Image tokens of `data`, whose digest is `digest`; raises ImageError if undecodable."""
        tokens = self._memo.get(digest)
        if tokens is None:
            tokens = image_tokens(data, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
            if len(self._memo) >= self._items:
                # Dicts keep insertion order: dropping the oldest entry is enough for a memo.
                del self._memo[next(iter(self._memo))]
            self._memo[digest] = tokens
        return tokens
