from __future__ import annotations

import base64
import copy
import textwrap

import orjson
import pytest
from support.chat import image_chat, png_data_url

from cache.keys import KEY_VERSION, NON_OUTPUT_FIELDS, cache_key, image_parts
from router.edge import parse_chat_request

MODEL = "qwen3-vl"
RED = png_data_url((200, 30, 30))
BLUE = png_data_url((30, 30, 200))


def key_of(doc: dict, revision: str = "r1") -> str:
    """The key as the router computes it: digests from the edge, never from the URL text."""
    request = parse_chat_request(orjson.dumps(doc))
    return cache_key(request.doc, request.image_digests, revision)


def base(**extra: object) -> dict:
    return image_chat(MODEL, RED, temperature=0, **extra)


def test_key_is_hex_sha256_and_stable() -> None:
    key = key_of(base())
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == key_of(base())
    assert KEY_VERSION == 1


def test_same_image_with_line_breaks_in_base64_gives_same_key() -> None:
    header, payload = RED.split(",", 1)
    wrapped = header + "," + "\n".join(textwrap.wrap(payload, 76))
    assert wrapped != RED
    assert key_of(image_chat(MODEL, wrapped, temperature=0)) == key_of(base())


def test_same_image_with_data_url_parameters_gives_same_key() -> None:
    payload = RED.split(",", 1)[1]
    named = "data:image/png;name=x.png;base64," + payload
    assert key_of(image_chat(MODEL, named, temperature=0)) == key_of(base())


def test_same_bytes_reencoded_give_same_key() -> None:
    raw = base64.b64decode(RED.split(",", 1)[1])
    crlf = "data:image/png;base64," + base64.encodebytes(raw).decode().replace("\n", "\r\n")
    assert key_of(image_chat(MODEL, crlf, temperature=0)) == key_of(base())


def test_different_image_gives_different_key() -> None:
    assert key_of(image_chat(MODEL, BLUE, temperature=0)) != key_of(base())


@pytest.mark.parametrize(
    ("name", "a", "b"),
    [
        ("temperature", 0, 0.7),
        ("seed", 1, 2),
        ("max_tokens", 16, 17),
        ("max_completion_tokens", 16, 17),
        ("top_k", 1, 20),
        ("top_p", 0.5, 0.9),
        ("min_p", 0.0, 0.1),
        ("stop", ["\n"], ["."]),
        ("response_format", {"type": "text"}, {"type": "json_object"}),
        ("logprobs", False, True),
        ("n", 1, 2),
        ("tools", [], [{"type": "function", "function": {"name": "f"}}]),
        ("some_future_parameter", 1, 2),
    ],
)
def test_output_changing_parameters_change_the_key(name: str, a: object, b: object) -> None:
    without = key_of(base())
    keys = {key_of({**base(), name: a}), key_of({**base(), name: b})}
    assert len(keys) == 2
    assert without not in keys or name == "temperature"  # base() already has temperature 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("stream", True),
        ("stream_options", {"include_usage": True}),
        ("user", "alice"),
        ("metadata", {"team": "x"}),
        ("store", True),
        ("service_tier", "auto"),
    ],
)
def test_delivery_and_bookkeeping_fields_do_not_change_the_key(name: str, value: object) -> None:
    assert name in NON_OUTPUT_FIELDS
    assert key_of({**base(), name: value}) == key_of(base())


def test_stream_and_user_together_give_the_same_key() -> None:
    doc = base(stream=True, stream_options={"include_usage": True}, user="bob")
    assert key_of(doc) == key_of(base())


def test_integral_floats_and_ints_give_the_same_key() -> None:
    assert key_of(base(max_tokens=16, top_p=1)) == key_of({**base(max_tokens=16, top_p=1.0), "temperature": 0.0})


def test_model_and_revision_change_the_key() -> None:
    assert key_of(base()) != key_of({**base(), "model": "other"})
    assert key_of(base(), revision="r1") != key_of(base(), revision="r2")


def test_text_changes_the_key() -> None:
    assert key_of(image_chat(MODEL, RED, text="What colour?")) != key_of(image_chat(MODEL, RED, text="What shape?"))


def test_image_detail_is_kept_but_auto_is_the_default() -> None:
    detailed = base()
    detailed["messages"][0]["content"][1]["image_url"]["detail"] = "low"
    auto = copy.deepcopy(base())
    auto["messages"][0]["content"][1]["image_url"]["detail"] = "auto"
    assert key_of(detailed) != key_of(base())
    assert key_of(auto) == key_of(base())


def test_message_order_and_image_order_matter() -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Hello"}
    assert key_of({"model": MODEL, "messages": [system, user]}) != key_of({"model": MODEL, "messages": [user, system]})

    def two_images(first: str, second: str) -> dict:
        parts = [{"type": "image_url", "image_url": {"url": u}} for u in (first, second)]
        return {"model": MODEL, "messages": [{"role": "user", "content": parts}]}

    assert key_of(two_images(RED, BLUE)) != key_of(two_images(BLUE, RED))


def test_text_only_requests_have_keys_too() -> None:
    doc = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    assert key_of(doc) == key_of(dict(doc))
    assert key_of(doc) != key_of({**doc, "messages": [{"role": "user", "content": "Hi!"}]})


def test_digest_count_must_match_image_parts() -> None:
    doc = base()
    assert image_parts(doc) == 1
    assert image_parts({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}) == 0
    with pytest.raises(ValueError, match="fewer"):
        cache_key(doc, [], "r1")
    with pytest.raises(ValueError, match="more"):
        cache_key(doc, ["a" * 64, "b" * 64], "r1")


def test_the_body_is_not_modified() -> None:
    doc = base(user="u")
    before = copy.deepcopy(doc)
    cache_key(doc, ["0" * 64], "r1")
    assert doc == before
