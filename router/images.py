"""The edge's image checks: format, size and token count from the header (qvl/images.py), against the limits.

The edge checks every image before a replica sees it, and must do so without decoding pixels: a
decompression bomb (a few kilobytes of PNG declaring 50,000 x 50,000 pixels) is refused from its
header. Pillow's decoders are not used on the request path.

Codes (all InvalidRequest, param `messages`):
    unsupported_image_format      not JPEG, PNG, WebP or BMP by its bytes, or a format the limits leave out
    invalid_image                 a truncated or corrupt header, or a side of zero pixels
    image_too_many_pixels         width x height over limits.max_image_pixels
    image_aspect_ratio_too_large  a shape Qwen3-VL's processor refuses (over 200:1)
"""

from __future__ import annotations

from dataclasses import dataclass

from qvl.images import ImageError, image_dimensions, sniff_format, tokens_for_size
from qvl.settings import LimitSettings
from router.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """An image as its header describes it, and the prompt tokens Qwen3-VL spends on it."""

    format: str
    width: int
    height: int
    tokens: int


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
