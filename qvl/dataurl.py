"""Decoding image data URLs: one pure function shared by the router's edge and the simulated engine."""

from __future__ import annotations

import base64
import binascii

_WHITESPACE = "\r\n\t "
_DROP_WHITESPACE = str.maketrans("", "", _WHITESPACE)


class DataURLError(ValueError):
    """Not a usable image data URL; `code` is `unsupported_image_url` (not a data URL at all),
    `invalid_image_url` (a malformed one) or `image_too_large` (more bytes than the caller's limit)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def decode_image_data_url(url: str, *, max_bytes: int | None = None) -> bytes:
    """The decoded bytes of `data:image/<type>;base64,<payload>`; raises DataURLError otherwise.

    With `max_bytes`, a payload that would decode to more bytes is refused from its length, before
    anything is decoded.
    """
    if not url.startswith("data:"):
        raise DataURLError(
            "image_url.url must be a data URL (data:image/<type>;base64,...); remote image URLs are not fetched",
            "unsupported_image_url",
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise DataURLError("image data URL must look like data:image/<type>;base64,<payload>", "invalid_image_url")
    if any(c in payload for c in _WHITESPACE):
        # MIME-style base64 wraps lines; the bytes (and so the image digest) are the same either way.
        payload = payload.translate(_DROP_WHITESPACE)
    if max_bytes is not None and len(payload) // 4 * 3 - payload.count("=", -2) > max_bytes:
        raise DataURLError(f"image is larger than {max_bytes} bytes", "image_too_large")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DataURLError("image data URL payload is not valid base64", "invalid_image_url") from None
    if not raw:
        raise DataURLError("image data URL holds no bytes", "invalid_image_url")
    return raw
