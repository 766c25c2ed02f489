"""The audit record: what a line holds (digests of the prompt and images, never image bytes) and how it
is built from a request."""

from __future__ import annotations

import hashlib

import orjson
from support.chat import image_chat, png_data_url

from router.audit_record import AuditRecord, audit_record, prompt_digest, prompt_text
from router.edge import parse_chat_request


def test_prompt_digest_is_sha256_of_documented_canonical_form() -> None:
    doc = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": png_data_url()}},
                    {"type": "text", "text": "And its colour?"},
                ],
            },
        ],
    }
    canonical = [["system", ["Be brief."]], ["user", ["What is this?", "And its colour?"]]]
    assert prompt_digest(doc) == hashlib.sha256(orjson.dumps(canonical)).hexdigest()


def test_prompt_digest_depends_on_text_and_roles_only() -> None:
    def chat(role: str, content: object) -> dict[str, object]:
        return {"model": "m", "messages": [{"role": role, "content": content}], "temperature": 0}

    as_string = prompt_digest(chat("user", "hi"))
    assert prompt_digest(chat("user", [{"type": "text", "text": "hi"}])) == as_string
    red = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": png_data_url((255, 0, 0))}}]
    blue = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": png_data_url((0, 0, 255))}}]
    assert prompt_digest(chat("user", red)) == prompt_digest(chat("user", blue)) == as_string
    assert prompt_digest(chat("system", "hi")) != as_string
    assert prompt_digest(chat("user", "hi!")) != as_string
    assert prompt_digest({"model": "m", "messages": "not a list"}) == hashlib.sha256(b"[]").hexdigest()


def test_prompt_text_leaves_images_out() -> None:
    doc = image_chat("m", png_data_url(), text="What product is this?")
    doc["messages"].insert(0, {"role": "system", "content": "Answer in one line."})
    assert prompt_text(doc) == "system: Answer in one line.\nuser: What product is this?"


def test_record_holds_only_the_image_digest_and_the_prompt_only_when_asked() -> None:
    url = png_data_url((10, 200, 30))
    payload = url.partition(",")[2]
    request = parse_chat_request(orjson.dumps(image_chat("m", url)))

    def build(include_prompts: bool) -> AuditRecord:
        return audit_record(
            request.doc,
            request.image_digests,
            include_prompts=include_prompts,
            time=1.0,
            request_id="r",
            key_id="k",
            model="m",
            cache="bypass",
            replica="none",
            status=200,
            error_type="",
            latency_ms=3.0,
        )

    # The writer writes exactly this serialisation (test_audit.py's round trip).
    lines = [orjson.dumps(build(include_prompts=True)), orjson.dumps(build(include_prompts=False))]
    raw = b"\n".join(lines)
    assert payload.encode() not in raw
    assert payload[:40].encode() not in raw
    assert b"data:image" not in raw
    with_prompt, without = [orjson.loads(line) for line in lines]
    assert with_prompt["image_digests"] == without["image_digests"] == list(request.image_digests)
    assert with_prompt["prompt"] == "user: What is in this photo?"
    assert without["prompt"] is None
    assert with_prompt["prompt_digest"] == without["prompt_digest"] == prompt_digest(request.doc)

    unparsed = audit_record(
        None, (), include_prompts=True, time=1.0, request_id="r", key_id="", model="unknown", cache="none",
        replica="none", status=400, error_type="invalid_request_error", latency_ms=0.1,
    )  # fmt: skip
    assert (unparsed.prompt_digest, unparsed.prompt, unparsed.image_digests) == ("", None, ())
