"""What an image is, read from its first bytes: the format from its magic number, the size from its header.

The edge checks every image before a replica sees it, and must do so without decoding pixels: a
decompression bomb (a few kilobytes of PNG declaring 50,000 x 50,000 pixels) is refused from its
header. The readers below look only at the header, never past the buffer, and give up on anything
truncated or malformed (`invalid_image`). Pillow's decoders are not used on the request path.

Codes (all InvalidRequest, param `messages`):
    unsupported_image_format      not JPEG, PNG, WebP or BMP by its bytes, or a format the limits leave out
    invalid_image                 a truncated or corrupt header, or a side of zero pixels
    image_too_many_pixels         width x height over limits.max_image_pixels
    image_aspect_ratio_too_large  a shape Qwen3-VL's processor refuses (over 200:1)
"""

from __future__ import annotations

from dataclasses import dataclass

from qvl.settings_edge import LimitSettings
from router.errors import InvalidRequest
from serving.image_tokens import ImageError, tokens_for_size

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers that carry the frame size (not DHT C4, JPG C8 or DAC CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers without a length field: TEM, RST0-7 (and SOI, seen only at the start).
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
# Real files carry a handful of segments before the frame header; beyond these the bytes are not one.
_JPEG_MAX_SEGMENTS = 512
_JPEG_MAX_FILL = 64
_BMP_INFO_SIZES = frozenset({40, 52, 56, 64, 108, 124})


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """An image as its header describes it, and the prompt tokens Qwen3-VL spends on it."""

    format: str
    width: int
    height: int
    tokens: int


class _Corrupt(Exception):
    """The header is truncated or malformed."""


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


def inspect_image(data: bytes, limits: LimitSettings, where: str = "image") -> ImageInfo:
    """Format, size and image tokens of `data`, checked against `limits`; raises InvalidRequest.

    `where` names the image in messages (e.g. `messages[0].content[1]`).
    """
    fmt = sniff_format(data)
    if fmt is None or fmt not in limits.image_formats:
        accepted = ", ".join(limits.image_formats) or "none"
        raise InvalidRequest(
            f"{where}: image format is not accepted (accepted, recognised from the bytes: {accepted})",
            code="unsupported_image_format",
            param="messages",
        )
    size = image_dimensions(fmt, data)
    if size is None:
        raise InvalidRequest(
            f"{where}: the {fmt} header is truncated or corrupt", code="invalid_image", param="messages"
        )
    width, height = size
    if width < 1 or height < 1:
        raise InvalidRequest(f"{where}: image has no pixels ({width}x{height})", code="invalid_image", param="messages")
    if width * height > limits.max_image_pixels:
        raise InvalidRequest(
            f"{where}: image is {width}x{height} pixels, over the limit of {limits.max_image_pixels}",
            code="image_too_many_pixels",
            param="messages",
        )
    try:
        tokens = tokens_for_size(width, height)
    except ImageError as exc:
        raise InvalidRequest(f"{where}: {exc}", code="image_aspect_ratio_too_large", param="messages") from None
    return ImageInfo(fmt, width, height, tokens)


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
