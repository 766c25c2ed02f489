import base64
import hashlib
import io
import struct
import time
import zlib

import orjson
import pytest
from PIL import Image
from support.chat import image_chat, png_data_url

from qvl.images import tokens_for_size
from qvl.settings import LimitSettings
from router.edge import (
    MAX_JSON_DEPTH,
    decode_data_url,
    image_digest,
    image_parts,
    parse_chat_request,
    parse_json_object,
)
from router.errors import InvalidRequest


def body(doc: object) -> bytes:
    return orjson.dumps(doc)


def test_digest_is_sha256_of_decoded_bytes() -> None:
    raw = b"\x89PNG\r\n\x1a\n-not-really-but-bytes"
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    assert image_digest(url) == hashlib.sha256(raw).hexdigest()
    assert decode_data_url(url) == raw


def test_same_image_same_digest_different_image_different_digest() -> None:
    red, blue = png_data_url((255, 0, 0)), png_data_url((0, 0, 255))
    assert image_digest(red) == image_digest(png_data_url((255, 0, 0)))
    assert image_digest(red) != image_digest(blue)


def test_parse_collects_digests_in_order_and_keeps_body_verbatim() -> None:
    red, blue = png_data_url((255, 0, 0)), png_data_url((0, 0, 255))
    doc = image_chat("m", red, max_tokens=7, temperature=0.2, stream=True)
    doc["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": blue}})
    raw = body(doc)
    req = parse_chat_request(raw, session_id="s1")
    assert req.model == "m"
    assert req.stream is True
    assert req.image_digests == (image_digest(red), image_digest(blue))
    assert req.sampling.max_tokens == 7
    assert req.sampling.temperature == 0.2
    assert req.session_id == "s1"
    assert req.body is raw


def test_text_only_request_has_no_digests() -> None:
    req = parse_chat_request(body({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
    assert req.image_digests == ()
    assert req.stream is False
    assert req.sampling.n == 1


@pytest.mark.parametrize(
    ("doc", "param", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "`model` is required"),
        ({"model": "m", "messages": []}, "messages", "non-empty array"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages", "role must be"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages", "string or an array"),
        (
            {"model": "m", "stream": "yes", "messages": [{"role": "user", "content": "x"}]},
            "stream",
            "boolean",
        ),
        (
            {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
            "least 1",
        ),
        (
            {"model": "m", "max_tokens": True, "messages": [{"role": "user", "content": "x"}]},
            "max_tokens",
            "integer",
        ),
        (
            {"model": "m", "temperature": 3, "messages": [{"role": "user", "content": "x"}]},
            "temperature",
            "between",
        ),
        ({"model": "m", "top_p": "a", "messages": [{"role": "user", "content": "x"}]}, "top_p", "number"),
    ],
)
def test_bad_fields_are_named(doc: dict, param: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(body(doc))
    assert info.value.param == param
    assert fragment in info.value.message
    assert info.value.payload()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://example.com/a.png", "unsupported_image_url"),
        ("data:text/plain;base64,aGk=", "invalid_image_url"),
        ("data:image/png,rawbytes", "invalid_image_url"),
        ("data:image/png;base64,!!!notbase64", "invalid_image_url"),
        ("data:image/png;base64,", "invalid_image_url"),
    ],
)
def test_bad_image_urls(url: str, code: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(body(image_chat("m", url)))
    assert info.value.code == code


def test_not_json_and_not_object() -> None:
    for raw in (b"{nope", b"[1, 2]"):
        with pytest.raises(InvalidRequest) as info:
            parse_chat_request(raw)
        assert info.value.code == "invalid_json"


def test_unknown_part_type_rejected() -> None:
    doc = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
    }
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(body(doc))
    assert info.value.code == "unsupported_content"


# Input limits (limits.*): counts, sizes, formats from the bytes, pixels read from headers, tokens.


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    return base64.b64decode(png_data_url(size=size).split(",", 1)[1])


def data_url(raw: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(raw).decode()


def chat_with_images(*urls: str, **extra: object) -> dict:
    parts: list[dict] = [{"type": "text", "text": "compare"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"model": "m", "messages": [{"role": "user", "content": parts}], **extra}


def refused(doc: object, limits: LimitSettings | None = None) -> InvalidRequest:
    raw = doc if isinstance(doc, bytes) else body(doc)
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(raw, None, limits or LimitSettings())
    assert info.value.status == 400 and info.value.type == "invalid_request_error"
    return info.value


def test_image_tokens_are_summed_from_the_headers() -> None:
    small, large = png_data_url(size=(64, 48)), png_data_url(size=(1920, 1080))
    req = parse_chat_request(body(chat_with_images(small, large, small)))
    assert req.image_tokens == 2 * tokens_for_size(64, 48) + tokens_for_size(1920, 1080)
    assert parse_chat_request(body({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).image_tokens == 0


def test_too_many_messages() -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}] * 3}
    assert parse_chat_request(body(doc), None, LimitSettings(max_messages=3)).image_digests == ()
    error = refused(doc, LimitSettings(max_messages=2))
    assert (error.code, error.param) == ("too_many_messages", "messages")


def test_too_many_images_is_counted_before_any_is_decoded() -> None:
    good = png_data_url()
    assert len(parse_chat_request(body(chat_with_images(good, good)), None, LimitSettings(max_images=2)).image_digests)
    # The third image is not even valid base64: the count refuses the request first.
    error = refused(chat_with_images(good, good, "data:image/png;base64,!!!"), LimitSettings(max_images=2))
    assert error.code == "too_many_images"
    assert refused(chat_with_images(good), LimitSettings(max_images=0)).code == "too_many_images"


def test_image_too_large_is_judged_from_the_base64_length_without_decoding() -> None:
    limits = LimitSettings(max_image_bytes=4096)
    raw = png_bytes() + b"\0" * (4096 - len(png_bytes()))
    assert len(raw) == 4096
    assert parse_chat_request(body(chat_with_images(data_url(raw))), None, limits).image_digests
    assert refused(chat_with_images(data_url(raw + b"\0")), limits).code == "image_too_large"
    # Not base64 at all, but too long to be a small enough image: refused as too large, so never decoded.
    error = refused(chat_with_images("data:image/png;base64," + "!" * 8000), limits)
    assert (error.code, error.param) == ("image_too_large", "messages")
    # Line breaks do not count against the limit.
    wrapped = "data:image/png;base64," + base64.encodebytes(raw).decode().replace("\n", "\r\n")
    assert parse_chat_request(body(chat_with_images(wrapped)), None, limits).image_digests


def test_huge_image_is_refused_fast() -> None:
    huge = "data:image/png;base64," + "A" * 30_000_000
    raw = body(chat_with_images(huge))
    started = time.perf_counter()
    assert refused(raw).code == "image_too_large"
    assert time.perf_counter() - started < 0.5


def test_format_comes_from_the_bytes_not_the_media_type() -> None:
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 30)).save(jpeg, format="JPEG")
    req = parse_chat_request(body(chat_with_images(data_url(jpeg.getvalue(), "image/png"))))
    assert req.image_tokens == tokens_for_size(40, 30)
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    for media in ("image/png", "image/svg+xml"):
        error = refused(chat_with_images(data_url(svg, media)))
        assert error.code == "unsupported_image_format"
        assert "messages[0].content[1]" in error.message
    gif = io.BytesIO()
    Image.new("RGB", (40, 30)).save(gif, format="GIF")
    assert refused(chat_with_images(data_url(gif.getvalue(), "image/gif"))).code == "unsupported_image_format"
    limits = LimitSettings(image_formats=["png"])
    assert refused(chat_with_images(data_url(jpeg.getvalue(), "image/jpeg")), limits).code == (
        "unsupported_image_format"
    )


def test_decompression_bomb_is_refused_from_its_header() -> None:
    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    error = refused(chat_with_images(png_data_url(), data_url(bomb)))
    assert error.code == "image_too_many_pixels"
    assert "messages[0].content[2]" in error.message and "50000x50000" in error.message
    limits = LimitSettings(max_image_pixels=64 * 48)
    assert parse_chat_request(body(chat_with_images(png_data_url(size=(64, 48)))), None, limits).image_digests
    assert refused(chat_with_images(png_data_url(size=(65, 48))), limits).code == "image_too_many_pixels"


def test_corrupt_image_is_invalid() -> None:
    truncated = png_bytes()[:20]
    assert refused(chat_with_images(data_url(truncated))).code == "invalid_image"
    zero = bytearray(png_bytes())
    zero[16:20] = b"\0\0\0\0"
    assert refused(chat_with_images(data_url(bytes(zero)))).code == "invalid_image"


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_limit(name: str) -> None:
    limits = LimitSettings(max_tokens=100)
    doc = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert parse_chat_request(body({**doc, name: 100}), None, limits).sampling.max_tokens == 100
    error = refused({**doc, name: 101}, limits)
    assert (error.code, error.param) == ("max_tokens_too_large", "max_tokens")
    assert name in error.message
    # The other field is checked too, even when both are sent.
    assert refused({**doc, "max_tokens": 5, "max_completion_tokens": 101}, limits).code == "max_tokens_too_large"
    assert refused({**doc, "max_tokens": 101, "max_completion_tokens": 5}, limits).code == "max_tokens_too_large"
    assert refused({**doc, name: 1e30}, limits).message == f"`{name}` must be an integer"


def test_n_and_stop() -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert parse_chat_request(body({**doc, "n": 8})).sampling.n == 8
    error = refused({**doc, "n": 9})
    assert (error.code, error.param) == ("n_too_large", "n")
    assert refused({**doc, "n": True}).param == "n"
    for stop in ("\n", ["a", "b", "c", "d"], [], None):
        parse_chat_request(body({**doc, "stop": stop}))
    for stop in (["a", "b", "c", "d", "e"], [1], 5, {"a": 1}, ["a", None]):
        error = refused({**doc, "stop": stop})
        assert (error.code, error.param) == ("invalid_stop", "stop")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_are_not_json(literal: bytes) -> None:
    raw = b'{"model": "m", "temperature": ' + literal + b', "messages": [{"role": "user", "content": "x"}]}'
    assert refused(raw).code == "invalid_json"


def test_deeply_nested_json_is_refused_fast() -> None:
    started = time.perf_counter()
    assert refused(b"[" * 100_000 + b"]" * 100_000).code == "invalid_json"
    assert refused(b'{"a":' * 100_000 + b"1" + b"}" * 100_000).code == "invalid_json"
    assert time.perf_counter() - started < 0.5
    doc = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "x"}]}

    def nested(depth: int) -> bytes:
        # depth counts the top-level object: the field adds depth - 1 levels.
        return body(doc)[:-1] + b',"x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert parse_chat_request(nested(MAX_JSON_DEPTH)).doc["x"]
    # Deeper than the edge allows, though orjson reads it: the cache key could not re-serialise it.
    error = refused(nested(MAX_JSON_DEPTH + 1))
    assert error.code == "invalid_json" and str(MAX_JSON_DEPTH) in error.message
    assert refused(nested(1000)).code == "invalid_json"


def test_parse_json_object() -> None:
    assert parse_json_object(b'{"a": 1}') == {"a": 1}
    for raw in (b"", b"[]", b'"x"', b"{", b'{"a": NaN}'):
        with pytest.raises(InvalidRequest) as info:
            parse_json_object(raw)
        assert info.value.code == "invalid_json"


def test_image_parts_name_their_place() -> None:
    doc = chat_with_images("data:a", "https://b")
    parts = image_parts(doc["messages"], LimitSettings())
    assert [(p.message, p.part, p.url, p.where) for p in parts] == [
        (0, 1, "data:a", "messages[0].content[1]"),
        (0, 2, "https://b", "messages[0].content[2]"),
    ]
