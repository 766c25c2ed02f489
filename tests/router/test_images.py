"""Image headers read without decoding: formats from magic numbers, sizes, bombs, truncation and garbage."""

from __future__ import annotations

import io
import random
import struct
import time
import zlib

import pytest
from PIL import Image

from qvl.images import image_dimensions, image_tokens, sniff_format
from qvl.settings import LimitSettings
from router.errors import InvalidRequest
from router.images import inspect_image

LIMITS = LimitSettings()


def encoded(size: tuple[int, int], fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    if save.pop("alpha", False):
        Image.new("RGBA", size, (10, 200, 30, 128)).save(buf, format=fmt, **save)
    else:
        Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt, **save)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR declaring `width` x `height`, a tiny IDAT and IEND: a header-only bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_with_size(width: int, height: int) -> bytes:
    """A real JPEG whose frame header is rewritten to declare `width` x `height`."""
    data = bytearray(encoded((16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(encoded((4, 4), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


CASES = [
    ("png", encoded((64, 48), "PNG"), (64, 48)),
    ("png", encoded((300, 7), "PNG", alpha=True), (300, 7)),
    ("jpeg", encoded((640, 480), "JPEG"), (640, 480)),
    ("jpeg", encoded((333, 777), "JPEG", progressive=True), (333, 777)),
    ("jpeg", encoded((120, 90), "JPEG", exif=b"Exif\x00\x00" + b"\x00" * 2000, icc_profile=b"x" * 5000), (120, 90)),
    ("webp", encoded((200, 100), "WEBP", quality=50), (200, 100)),  # VP8 (lossy)
    ("webp", encoded((201, 99), "WEBP", lossless=True), (201, 99)),  # VP8L
    ("webp", encoded((123, 45), "WEBP", alpha=True, quality=50), (123, 45)),  # VP8X (alpha)
    ("bmp", encoded((31, 17), "BMP"), (31, 17)),
]


@pytest.mark.parametrize(("fmt", "data", "size"), CASES)
def test_reads_format_and_size_like_pillow(fmt: str, data: bytes, size: tuple[int, int]) -> None:
    assert sniff_format(data) == fmt
    assert image_dimensions(fmt, data) == size
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == size
    info = inspect_image(data, LIMITS)
    assert (info.format, info.width, info.height) == (fmt, *size)
    assert info.tokens == image_tokens(data)


def test_top_down_bmp_has_its_positive_height() -> None:
    assert image_dimensions("bmp", bmp_with_size(31, -17)) == (31, 17)


@pytest.mark.parametrize(("fmt", "data", "size"), CASES)
def test_every_truncation_is_refused_or_read_never_raised(fmt: str, data: bytes, size: tuple[int, int]) -> None:
    for cut in range(min(len(data), 400)):
        got = image_dimensions(fmt, data[:cut])
        assert got is None or got == size, cut


def test_garbage_after_the_magic_number_never_raises_or_hangs() -> None:
    rng = random.Random(7)
    magics = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff", "webp": b"RIFF\0\0\0\0WEBP", "bmp": b"BM"}
    started = time.perf_counter()
    for _ in range(3000):
        fmt = rng.choice(list(magics))
        data = magics[fmt] + rng.randbytes(rng.randrange(0, 200))
        size = image_dimensions(fmt, data)
        assert size is None or all(isinstance(side, int) for side in size)
    assert time.perf_counter() - started < 2


class Watched(bytes):
    """Bytes that remember the furthest offset a reader looked at (by index or slice)."""

    furthest = 0

    def __getitem__(self, key: int | slice) -> object:
        stop = key.stop if isinstance(key, slice) else key + 1
        self.furthest = max(self.furthest, stop or len(self))
        return super().__getitem__(key)


def test_header_reading_does_not_grow_with_the_image() -> None:
    # A JPEG whose frame header comes after 10 MB of fill bytes, or a PNG followed by 20 MB: O(header) each,
    # checked by what the readers look at rather than by a wall-clock window.
    fill = Watched(b"\xff\xd8" + b"\xff" * 10_000_000)
    huge_png = Watched(png_header(640, 480) + b"\0" * 20_000_000)
    assert image_dimensions("jpeg", fill) is None
    assert image_dimensions("png", huge_png) == (640, 480)
    assert 0 < fill.furthest <= 1024
    assert 0 < huge_png.furthest <= 64


@pytest.mark.parametrize(
    "data",
    [
        encoded((8, 8), "GIF"),
        encoded((8, 8), "TIFF"),
        encoded((8, 8), "ICO"),
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
        b"just some text",
        b"",
    ],
    ids=["gif", "tiff", "ico", "svg", "heic", "text", "empty"],
)
def test_other_formats_are_unsupported(data: bytes) -> None:
    assert sniff_format(data) is None
    with pytest.raises(InvalidRequest) as info:
        inspect_image(data, LIMITS, "messages[0].content[1]")
    assert info.value.code == "unsupported_image_format"
    assert info.value.message.startswith("messages[0].content[1]: ")


def test_a_format_left_out_of_the_limits_is_unsupported() -> None:
    only_png = LimitSettings(image_formats=["png"])
    assert inspect_image(encoded((64, 48), "PNG"), only_png).format == "png"
    with pytest.raises(InvalidRequest) as info:
        inspect_image(encoded((64, 48), "JPEG"), only_png)
    assert info.value.code == "unsupported_image_format"


@pytest.mark.parametrize(
    "data",
    [
        png_header(50_000, 50_000),
        jpeg_with_size(65_000, 65_000),
        bmp_with_size(100_000, 100_000),
        b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0" + (16_000_000).to_bytes(3, "little") * 2,
    ],
    ids=["png", "jpeg", "bmp", "webp"],
)
def test_decompression_bombs_are_refused_from_the_header(data: bytes) -> None:
    assert len(data) < 2000
    with pytest.raises(InvalidRequest) as info:
        inspect_image(data, LIMITS)
    assert info.value.code == "image_too_many_pixels"


def test_pixel_limit_is_inclusive() -> None:
    limits = LimitSettings(max_image_pixels=640 * 480)
    assert inspect_image(png_header(640, 480), limits).width == 640
    with pytest.raises(InvalidRequest) as info:
        inspect_image(png_header(641, 480), limits)
    assert info.value.code == "image_too_many_pixels"


@pytest.mark.parametrize(
    "data",
    [
        png_header(0, 10),
        png_header(10, 0),
        png_header(2**31, 10),
        bmp_with_size(0, 10),
        bmp_with_size(-5, 10),
        jpeg_with_size(10, 0),
        b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0",
        b"\x89PNG\r\n\x1a\n\0\0\0\x0dIEND" + b"\0" * 20,
        b"\xff\xd8\xff\xd9",
        b"\xff\xd8\xff\xda\0\x08",
        b"\xff\xd8\xff\xe0\0\x01",
        b"RIFF\0\0\0\0WEBPVP8 \0\0\0\0\0\0\0\0\0\0",
        b"RIFF\0\0\0\0WEBPABCD" + b"\0" * 30,
        b"BM" + b"\0" * 12 + struct.pack("<I", 99) + b"\0" * 40,
    ],
)
def test_corrupt_headers_and_empty_images_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        inspect_image(data, LIMITS)
    assert info.value.code == "invalid_image"


def test_shapes_qwen_refuses_are_named() -> None:
    with pytest.raises(InvalidRequest) as info:
        inspect_image(png_header(10_000, 10), LIMITS)
    assert info.value.code == "image_aspect_ratio_too_large"
