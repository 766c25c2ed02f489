import base64
import hashlib

import orjson
import pytest
from conftest import image_chat, png_data_url

from router.edge import decode_data_url, image_digest, parse_chat_request
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
