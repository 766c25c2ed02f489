"""Qwen3-VL's image knowledge, shared by the router's edge and the simulated engine: what an image is,
read from its first bytes, and how many prompt tokens the model spends on it.

Format and size come from the header alone (the magic number, then the PNG IHDR, the JPEG frame
header, the WebP VP8/VP8L/VP8X header or the BMP info header); pixels are never decoded, so a
decompression bomb costs nothing to measure. The readers never look past the buffer and give up on
anything truncated or malformed.

Qwen3-VL cuts an image into 16x16 patches and merges 2x2 of them into one token, so each side is
first resized ("smart resize") to a multiple of 32 pixels, keeping the aspect ratio, with the pixel
count held between a lower and an upper bound (the model's defaults: 65,536 and 16,777,216). The
token count is then (height / 32) * (width / 32).
"""

from __future__ import annotations

import math

PATCH_SIZE = 16
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE
DEFAULT_MIN_PIXELS = 65_536
DEFAULT_MAX_PIXELS = 16_777_216
# Qwen's image processors refuse images more elongated than this.
MAX_ASPECT_RATIO = 200

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers that carry the frame size (not DHT C4, JPG C8 or DAC CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers without a length field: TEM, RST0-7 (and SOI, seen only at the start).
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
# Real files carry a handful of segments before the frame header; beyond these the bytes are not one.
_JPEG_MAX_SEGMENTS = 512
_JPEG_MAX_FILL = 64
_BMP_INFO_SIZES = frozenset({40, 52, 56, 64, 108, 124})


class _Corrupt(Exception):
    """The header is truncated or malformed."""


class ImageError(ValueError):
    """The bytes are not a JPEG, PNG, WebP or BMP image with a readable header, or its shape is one
    Qwen3-VL refuses."""


def sniff_format(data: bytes) -> str | None:
    """`jpeg`, `png`, `webp` or `bmp` from the bytes' magic number; None for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(_PNG):
        return "png"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    return None


def image_dimensions(fmt: str, data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of an image of format `fmt`; None if truncated or corrupt.

    Costs O(header): a PNG or WebP header is a fixed offset, a JPEG's frame header is found by
    jumping from segment to segment, a BMP's is its info header.
    """
    reader = _READERS[fmt]
    try:
        return reader(data)
    except _Corrupt:
        return None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, read from its header; raises ImageError if undecodable."""
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError("cannot identify image: not JPEG, PNG, WebP or BMP")
    size = image_dimensions(fmt, data)
    if size is None:
        raise ImageError(f"cannot read the {fmt} header")
    width, height = size
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


def _be(data: bytes, at: int, size: int) -> int:
    if at + size > len(data):
        raise _Corrupt
    return int.from_bytes(data[at : at + size], "big")


def _le(data: bytes, at: int, size: int, *, signed: bool = False) -> int:
    if at + size > len(data):
        raise _Corrupt
    return int.from_bytes(data[at : at + size], "little", signed=signed)


def _png(data: bytes) -> tuple[int, int]:
    # The first chunk must be IHDR (13 bytes): width and height as big-endian 32-bit, at most 2^31 - 1.
    if _be(data, 8, 4) != 13 or data[12:16] != b"IHDR":
        raise _Corrupt
    width, height = _be(data, 16, 4), _be(data, 20, 4)
    if width > 0x7FFFFFFF or height > 0x7FFFFFFF:
        raise _Corrupt
    return width, height


def _jpeg(data: bytes) -> tuple[int, int]:
    pos, end = 2, len(data)
    for _ in range(_JPEG_MAX_SEGMENTS):
        if pos >= end or data[pos] != 0xFF:
            raise _Corrupt
        fill = 0
        while pos < end and data[pos] == 0xFF:
            pos += 1
            fill += 1
            if fill > _JPEG_MAX_FILL:
                raise _Corrupt
        if pos >= end:
            raise _Corrupt
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data, before any frame header
            raise _Corrupt
        length = _be(data, pos, 2)
        if length < 2:
            raise _Corrupt
        if marker in _JPEG_SOF:
            # length, precision (1 byte), height, width
            return _be(data, pos + 5, 2), _be(data, pos + 3, 2)
        pos += length
    raise _Corrupt


def _webp(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        # Lossy: a 3-byte frame tag, the start code 9D 01 2A, then 14-bit width and height.
        if data[23:26] != b"\x9d\x01\x2a":
            raise _Corrupt
        return _le(data, 26, 2) & 0x3FFF, _le(data, 28, 2) & 0x3FFF
    if chunk == b"VP8L":
        # Lossless: signature 0x2F, then width - 1 and height - 1 in 14 bits each.
        if data[20:21] != b"\x2f":
            raise _Corrupt
        bits = _le(data, 21, 4)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        # Extended: flags and reserved (4 bytes), then canvas width - 1 and height - 1 in 24 bits each.
        return _le(data, 24, 3) + 1, _le(data, 27, 3) + 1
    raise _Corrupt


def _bmp(data: bytes) -> tuple[int, int]:
    info_size = _le(data, 14, 4)
    if info_size == 12:  # OS/2 BITMAPCOREHEADER: unsigned 16-bit sides
        return _le(data, 18, 2), _le(data, 20, 2)
    if info_size not in _BMP_INFO_SIZES:
        raise _Corrupt
    width, height = _le(data, 18, 4, signed=True), _le(data, 22, 4, signed=True)
    # A negative height is a top-down bitmap, not an empty one; a negative width is corrupt.
    return width, abs(height)


_READERS = {"png": _png, "jpeg": _jpeg, "webp": _webp, "bmp": _bmp}
