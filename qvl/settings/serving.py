"""Replicas' part of the settings tree: the simulated engine, vLLM replicas, the local launcher (`qvl up`)
and the GPU exporter."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from qvl.settings.base import EngineName, Section

SchedulingPolicy = Literal["fcfs", "priority"]
"""vLLM's --scheduling-policy: arrival order, or (priority, arrival) with lower priorities served first."""


class SimSettings(Section):
    """The simulated engine: its limits and its step-time model (serving/sim/core.py). Times in
    milliseconds; zero turns a term off."""

    host: str = Field("127.0.0.1", description="Address the simulated engine listens on.")
    port: int = Field(8100, ge=1, le=65535, description="Port the simulated engine listens on.")
    model: str = Field("Qwen/Qwen3-VL-8B-Instruct", description="Model name the engine serves.")
    aliases: list[str] = Field(
        default_factory=list,
        description="Further model names the engine serves beside `model` (a model version's name such as "
        "qwen3-vl-8b@v2): /v1/models lists them after `model`, a request may name any of them, and the reply's "
        "`model` is the name the request used.",
    )
    max_model_len: int = Field(32768, ge=16, description="Context length reported by /v1/models.")
    profile: Path | None = Field(
        None,
        description="Capacity profile (YAML, qvl-capacity-profile/1) whose values replace the sim settings it "
        "holds (the latency terms, max_running, max_batched_tokens, mm_cache_items, ...) at start-up; empty: none.",
    )
    # The defaults give a lone request about the old fixed model's timing: a first token after
    # 25 ms + 0.02 ms per text token + 0.1 ms per uncached image token, then a token every ~12 ms.
    step_base_ms: float = Field(12.0, ge=0, description="Fixed cost of every engine step (one decode round).")
    per_decode_ms: float = Field(0.15, ge=0, description="Step cost per request decoding in the step.")
    per_kv_ktoken_ms: float = Field(
        0.04, ge=0, description="Step cost per 1000 tokens held in the KV cache by running requests."
    )
    prefill_base_ms: float = Field(13.0, ge=0, description="Step cost of each request prefilled in the step.")
    per_text_token_ms: float = Field(0.02, ge=0, description="Prefill cost per text prompt token (about 4 characters).")
    per_image_token_ms: float = Field(
        0.1, ge=0, description="Prefill (vision encode) cost per image token of an image not in the mm cache."
    )
    image_hit_discount: float = Field(
        1.0, ge=0, le=1, description="Share of an image's encode cost that an mm-cache hit saves (1: all of it)."
    )
    frontend_base_ms: float = Field(
        0.0, ge=0, description="Time before the engine sees a request (HTTP, preprocessing), per request."
    )
    frontend_per_image_token_ms: float = Field(
        0.0, ge=0, description="Time before the engine sees a request, per image token (image preprocessing)."
    )
    max_running: int = Field(
        64, ge=1, description="Requests decoded at once (vLLM max_num_seqs); the rest wait in a queue."
    )
    max_batched_tokens: int = Field(
        8192,
        ge=1,
        description="Prompt tokens admitted into one step (vLLM max_num_batched_tokens); a longer prompt runs alone.",
    )
    output_tokens: int = Field(
        24,
        ge=1,
        description="Tokens generated when the request sets no max_tokens (or max_completion_tokens).",
    )
    mm_cache_items: int = Field(
        256, ge=0, description="Image digests kept in the replica's LRU (stands for vLLM's mm/prefix cache)."
    )
    scheduling_policy: SchedulingPolicy = Field(
        "priority",
        description="Order of the waiting queue, as vLLM's --scheduling-policy: priority serves the lowest "
        "request `priority` first (arrival order among equals), which is how the router's classes take effect; "
        "fcfs serves in arrival order and ignores `priority`, as vLLM does.",
    )
    text_chars_per_token: float = Field(4.0, gt=0, description="Prompt characters per text token.")
    text_template_tokens: int = Field(0, ge=0, description="Tokens the chat template adds to every prompt.")
    image_min_pixels: int = Field(65536, ge=1024, description="Qwen3-VL resize lower bound in pixels.")
    image_max_pixels: int = Field(16777216, ge=1024, description="Qwen3-VL resize upper bound in pixels.")
    # Fault injection, for rollout tests (a canary that fails or is slow). Faults are not latency terms.
    fault_error_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of valid chat requests answered at once with HTTP 500 (vLLM's InternalServerError "
        "JSON) instead of any token, drawn at random per request; 0: none, 1: every one.",
    )
    fault_added_ttft_ms: float = Field(
        0.0,
        ge=0,
        description="Extra delay before the engine sees each chat request, on top of the latency model: the first "
        "token, or the whole non-streamed answer, comes that much later (the engine's TTFT histogram includes "
        "it). A fault, not a latency term: zero_delay (--zero-delay) keeps it.",
    )
    fault_seed: int | None = Field(
        None, description="Seed of the fault draws (fault_error_ratio), for repeatable tests; empty: random."
    )
    startup_delay_s: float = Field(
        0.0,
        ge=0,
        description="Seconds the engine waits before it listens, as a real replica loads its weights (a cold "
        "start, for autoscaling tests and trace replays).",
    )

    def zero_delay(self) -> SimSettings:
        """The same settings with every latency term at zero (throughput benchmarks): nothing sleeps.

        Injected faults (`fault_*`) stay: a test of a slow canary may run the rest at zero delay."""
        zeros = {
            name: 0.0 for name in type(self).model_fields if name.endswith("_ms") and not name.startswith("fault_")
        }
        return self.model_copy(update=zeros)


class ReplicaSettings(Section):
    """One vLLM replica (`qvl replica`, and each replica of `qvl up --engine vllm`).

    Fields left empty take vLLM's own default on a GPU; on a CPU some get a working value instead
    (see `cpu_defaults` in serving/vllm_replica.py): max_num_seqs 16, max_model_len 4096,
    kv_cache_memory_bytes 128 MiB, enforce_eager true.
    """

    model: str | None = Field(
        None, description="Checkpoint directory (e.g. /models/Qwen3-VL-8B-Instruct); empty: the tiny test model."
    )
    served_model_name: str | None = Field(
        None, description="Model name clients use; empty: the checkpoint directory's name."
    )
    aliases: list[str] = Field(
        default_factory=list,
        description="Further model names clients may use (a model version's name such as qwen3-vl-8b@v2), given "
        "to vLLM's --served-model-name after the main one.",
    )
    host: str = Field("127.0.0.1", description="Address a replica listens on.")
    port: int = Field(8200, ge=1, le=65535, description="Port of `qvl replica` (qvl up picks its own).")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where the engine runs; auto: GPUs when any are visible, else the CPU."
    )
    gpus: list[int] | None = Field(
        None, description="GPU indexes replicas may use; empty: every GPU nvidia-smi lists (or CUDA_VISIBLE_DEVICES)."
    )
    cpus: list[int] | None = Field(
        None,
        description="CPU core ids the CPU replicas of one launcher split between them, each its own contiguous "
        "block in order (vLLM pins its model worker's threads there: VLLM_CPU_OMP_THREADS_BIND, OMP_NUM_THREADS); "
        "empty: the "
        "cores this process may run on. More CPU replicas than cores is refused, never shared.",
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs per replica (vLLM --tensor-parallel-size).")
    max_num_seqs: int | None = Field(None, ge=1, description="Requests batched at once (vLLM --max-num-seqs).")
    max_model_len: int | None = Field(None, ge=16, description="Context length in tokens (vLLM --max-model-len).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="Share of each GPU's memory vLLM may use (--gpu-memory-utilization)."
    )
    limit_mm_per_prompt: dict[str, int] = Field(
        default_factory=lambda: {"image": 4, "video": 0},
        description="Most items of each modality per prompt (--limit-mm-per-prompt).",
    )
    mm_processor_cache_gb: float | None = Field(
        None, ge=0, description="Multimodal processor cache size in GiB (--mm-processor-cache-gb)."
    )
    enable_prefix_caching: bool = Field(True, description="Automatic prefix caching (--enable-prefix-caching).")
    dtype: str = Field("auto", description="Weight and activation dtype (--dtype): auto, bfloat16, float16, ...")
    quantization: str | None = Field(None, description="Quantization method (--quantization), e.g. fp8, awq.")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="KV cache size in bytes (--kv-cache-memory-bytes); overrides memory utilisation."
    )
    enforce_eager: bool | None = Field(None, description="Skip graph capture and compilation (--enforce-eager).")
    scheduling_policy: SchedulingPolicy = Field(
        "priority",
        description="vLLM --scheduling-policy. priority: the waiting queue is served lowest request `priority` "
        "first (arrival order among equals), so the class priorities the router forwards take effect; fcfs: "
        "arrival order, and vLLM accepts but ignores a request's priority.",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM engine arguments, passed through verbatim: {name: value} becomes --name value "
        "(true: --name, false: --no-name, lists and mappings as JSON).",
    )
    startup_timeout_s: float = Field(600.0, gt=0, description="Seconds a replica may take to answer /health.")
    run_dir: str = Field(
        ".qvl-run", description="Directory for replica logs, caches and the tiny model (relative to the cwd)."
    )


class UpSettings(Section):
    engine: EngineName = Field("vllm", description="Engine each local replica runs.")
    model: str | None = Field(
        None, description="Model of every replica: sets replica.model (vllm) or sim.model (sim) when given."
    )
    replicas: int = Field(2, ge=1, le=64, description="Number of local replicas `qvl up` starts.")
    replica_base_port: int = Field(
        0, ge=0, le=65535, description="First replica port (then +1, +2...); 0 picks free ports."
    )
    ready_timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for replicas to become healthy.")
    gpu_exporter: bool = Field(
        True,
        description="vllm engine (and `qvl replica`): also start this host's GPU exporter (gpu_exporter.*), "
        "unless its port is already taken.",
    )


class GpuExporterSettings(Section):
    """The GPU telemetry exporter (`qvl gpu-exporter`; `qvl up --engine vllm` and `qvl replica` start one)."""

    host: str = Field("127.0.0.1", description="Address the GPU exporter listens on.")
    port: int = Field(9835, ge=1, le=65535, description="Port the GPU exporter serves /metrics on.")
    node_name: str = Field("", description="Value of the host label on every series; empty: this machine's hostname.")
