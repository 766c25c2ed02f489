"""The tiny Qwen3-VL checkpoint: built offline, loaded by transformers, deterministic, image-dependent."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from serving.tiny_model import ADDED_TOKENS, build_tiny_model, ensure_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0).path


def test_tokenizer_and_config_agree_on_special_tokens(tiny: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = AutoConfig.from_pretrained(tiny)
    assert type(tokenizer).__name__.startswith("Qwen2Tokenizer")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token, _ in ADDED_TOKENS}
    assert config.image_token_id == ids["<|image_pad|>"]
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert config.text_config.vocab_size == len(tokenizer)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_transformers_generates_and_the_answer_depends_on_the_image(tiny: Path) -> None:
    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)

    def answer(image: Image.Image) -> list[int]:
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        return [int(t) for t in out[0, inputs["input_ids"].shape[1] :]]

    red = Image.new("RGB", (96, 96), (220, 20, 20))
    noise = Image.effect_noise((96, 96), 120).convert("RGB")
    assert answer(red) == answer(red)
    assert answer(red) != answer(noise)


def test_same_seed_same_bytes_and_ensure_reuses(tmp_path: Path, tiny: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0).path
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(tiny)
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(again, seed=0) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
