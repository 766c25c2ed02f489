"""`qvl model tiny`: a tiny, randomly initialised Qwen3-VL checkpoint, built offline, that vLLM and
transformers both load.

It exists so the real serving path (vLLM's OpenAI server, its scheduler, multimodal processor and
caches) runs on a CPU in tests and in `make demo` without downloading weights. Its answers are
nonsense, but deterministic: greedy output depends only on the prompt and the image.

Shape, and why: text hidden 128, 2 layers, 4 heads, 2 KV heads, head_dim 32 (vLLM's CPU attention
needs head_dim in {32, 64, 80, ...}; the interleaved mrope sections sum to head_dim / 2); vision
depth 2, hidden 64, patch 16, spatial merge 2, temporal patch 2, out_hidden_size equal to the text
hidden size. The vocabulary is a byte-level BPE trained on a generated corpus plus Qwen's special
tokens, with no padding rows (a random model would otherwise emit ids the tokenizer cannot decode).
Weights are re-drawn with std 0.2: with the default 0.02 the answers barely depend on the image.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVED_NAME = "qwen3-vl-tiny"
BUILD_INFO = "qvl-tiny.json"

# Qwen2's pre-tokenizer split.
_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

# Added after the learned vocabulary in Qwen's order, so their ids are contiguous: (token, special).
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# ChatML as Qwen writes it; an image part becomes <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = """{%- if messages and messages[0].role != 'system' -%}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif -%}
{%- for message in messages -%}
<|im_start|>{{ message.role }}
{% if message.content is string -%}
{{ message.content }}
{%- else -%}
{%- for content in message.content -%}
{%- if content.type == 'image' or 'image' in content or 'image_url' in content -%}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif content.type == 'video' or 'video' in content -%}
<|vision_start|><|video_pad|><|vision_end|>
{%- elif 'text' in content -%}
{{ content.text }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}"""

_WORDS = [
    "the",
    "a",
    "an",
    "image",
    "picture",
    "photo",
    "product",
    "shows",
    "is",
    "are",
    "of",
    "in",
    "on",
    "with",
    "and",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "gray",
    "orange",
    "purple",
    "square",
    "circle",
    "line",
    "stripe",
    "pattern",
    "mug",
    "shoe",
    "bag",
    "shirt",
    "bottle",
    "box",
    "table",
    "price",
    "size",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "corner",
    "large",
    "small",
    "one",
    "two",
    "three",
    "many",
    "what",
    "describe",
    "this",
    "that",
    "there",
    "here",
    "answer",
    "question",
    "assistant",
    "user",
    "system",
    "hello",
    "yes",
    "no",
    "please",
    "thank",
    "you",
    "it",
    "has",
    "shape",
    "background",
]

_PATCH, _MERGE, _TEMPORAL = 16, 2, 2


@dataclass(frozen=True)
class TinyModel:
    path: Path
    params: int
    vocab_size: int
    seconds: float


def build_tiny_model(out: Path, seed: int = 0, std: float = 0.2) -> TinyModel:
    """Write the checkpoint (safetensors, tokenizer, processor configs) to `out`; same seed, same bytes."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    started = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(seed)
    ids = {token: int(tokenizer.convert_tokens_to_ids(token)) for token, _ in ADDED_TOKENS}
    vocab_size = len(tokenizer)
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "hidden_act": "silu",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [6, 5, 5],
                "mrope_interleaved": True,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "dtype": "bfloat16",
        },
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": _PATCH,
            "spatial_merge_size": _MERGE,
            "temporal_patch_size": _TEMPORAL,
            "out_hidden_size": 128,
            "num_position_embeddings": 576,
            "deepstack_visual_indexes": [0, 1],
            "hidden_act": "gelu_pytorch_tanh",
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.bos_token_id = config.pad_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]

    model = Qwen3VLForConditionalGeneration(config)
    if std > 0:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
                elif name.endswith("bias"):
                    param.zero_()
    model = model.to(torch.bfloat16)
    generation = model.generation_config
    generation.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    generation.pad_token_id = generation.bos_token_id = ids["<|endoftext|>"]
    generation.do_sample = False

    shared = {
        "patch_size": _PATCH,
        "temporal_patch_size": _TEMPORAL,
        "merge_size": _MERGE,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    # 4 to 196 image tokens: small enough for a CPU, large enough that images differ.
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": 32 * 32 * 4, "longest_edge": 448 * 448}, **shared)
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 32 * 32 * 4, "longest_edge": 448 * 448 * 4},
        fps=2,
        min_frames=4,
        max_frames=16,
        cap_pixels_per_frame=True,
        max_video_tokens=196,
        **shared,
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # The stand-alone processor files that released Qwen3-VL checkpoints also ship.
    image_processor.save_pretrained(out)
    video_processor.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    built = TinyModel(out, params, vocab_size, round(time.perf_counter() - started, 2))
    info = {"seed": seed, "std": std, "params": params, "vocab_size": vocab_size, "served_name": SERVED_NAME}
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return built


def ensure_tiny_model(out: Path, seed: int = 0) -> Path:
    """The tiny model at `out`, built first if it is missing or was built with another seed."""
    info_path = out / BUILD_INFO
    if info_path.exists() and (out / "model.safetensors").exists():
        info = json.loads(info_path.read_text())
        if info.get("seed") == seed:
            return out
    build_tiny_model(out, seed)
    return out


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    text = []
    for _ in range(lines):
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16)))
        number = str(rng.randint(0, 9999)) if rng.random() < 0.3 else ""
        text.append(f"{sentence.capitalize()} {number}{rng.choice(['.', '?', '!', ',', ':', chr(10)])}")
    return text


def _tokenizer(seed: int) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=1024,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    learned = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=learned["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    for token, special in ADDED_TOKENS:
        tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)], special_tokens=special)
    tokenizer.eos_token = "<|im_end|>"  # a chat model stops on <|im_end|>
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
