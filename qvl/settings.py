"""The one typed settings tree: defaults < YAML file (`--config`) < `QVL_*` environment < command-line flags.

Nested fields are reached from the environment with a double underscore, for example
`QVL_ROUTER__PORT=8001` or `QVL_ROUTER__REPLICAS='["http://127.0.0.1:9001"]'`.
A bad value anywhere raises `SettingsError`, whose message names the field in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from qvl.settings_cluster import ClusterSettings, RegistrySettings
from qvl.settings_edge import (
    AdmissionSettings,
    AuditSettings,
    AuthSettings,
    DrainSettings,
    FetchSettings,
    LimitSettings,
    QuotaSettings,
)

PolicyName = Literal["round-robin", "least-loaded", "session", "image-affinity"]
LogLevel = Literal["debug", "info", "warning", "error"]


class SettingsError(ValueError):
    """A settings value is missing, malformed or out of range; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthSettings(_Section):
    interval_s: float = Field(1.0, gt=0, description="Seconds between active health checks of each replica.")
    timeout_s: float = Field(1.0, gt=0, description="Seconds a health check (GET /health) may take.")
    eject_after_failures: int = Field(
        2, ge=1, description="Consecutive failed checks or connection errors before a replica is ejected."
    )
    readmit_after_successes: int = Field(
        1, ge=1, description="Consecutive passed checks before an ejected replica takes traffic again."
    )


class RouterSettings(_Section):
    host: str = Field("127.0.0.1", description="Address the router listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the router listens on.")
    replicas: list[str] = Field(
        default_factory=list,
        description="Base URLs of engine replicas (vLLM or `qvl sim`), e.g. http://10.0.0.5:8001: the static "
        "list for one machine. Replicas found in the registry (registry.url) are routed to as well.",
    )
    policy: PolicyName = Field("least-loaded", description="Routing policy used to pick a replica.")
    load_factor: float = Field(
        1.25,
        gt=1.0,
        description="image-affinity: no replica takes more than this times the mean in-flight load.",
    )
    virtual_nodes: int = Field(
        160, ge=1, le=4096, description="Points per replica on the consistent-hash ring (session, affinity)."
    )
    session_header: str = Field(
        "x-session-id", description="Request header whose value pins a conversation (session policy)."
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="Replicas tried per request before giving up (retries happen before "
        "the first byte reaches the client).",
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="Seconds to open a connection to a replica.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Seconds a whole upstream request may take, streaming included."
    )
    max_request_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest accepted request body, images included."
    )
    load_scrape_interval_s: float = Field(
        1.0, gt=0, description="Seconds between scrapes of each replica's /metrics queue depth."
    )
    health: HealthSettings = Field(default_factory=HealthSettings, description="Active health checking.")

    @field_validator("replicas")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        cleaned = []
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"replica URL must start with http:// or https://, got {url!r}")
            cleaned.append(url.rstrip("/"))
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("replica URLs must be distinct")
        return cleaned


class SimSettings(_Section):
    """The simulated engine's latency model. All times in milliseconds; zero turns a term off."""

    host: str = Field("127.0.0.1", description="Address the simulated engine listens on.")
    port: int = Field(8100, ge=1, le=65535, description="Port the simulated engine listens on.")
    model: str = Field("Qwen/Qwen3-VL-8B-Instruct", description="Model name the engine serves.")
    max_model_len: int = Field(32768, ge=16, description="Context length reported by /v1/models.")
    ttft_base_ms: float = Field(25.0, ge=0, description="Fixed part of time to first token.")
    ttft_per_prompt_token_ms: float = Field(
        0.02, ge=0, description="Prefill cost per text prompt token (about 4 characters)."
    )
    ttft_per_image_token_ms: float = Field(
        0.1, ge=0, description="Vision-encode cost per image token of an image not in the mm cache."
    )
    itl_base_ms: float = Field(12.0, ge=0, description="Inter-token latency with one running request.")
    itl_per_running_ms: float = Field(
        0.15, ge=0, description="Extra inter-token latency per additional running request."
    )
    max_running: int = Field(
        64, ge=1, description="Requests decoded at once (vLLM max_num_seqs); the rest wait in a queue."
    )
    output_tokens: int = Field(
        24,
        ge=1,
        description="Tokens generated when the request sets no max_tokens (or max_completion_tokens).",
    )
    mm_cache_items: int = Field(
        256, ge=0, description="Image digests kept in the replica's LRU (stands for vLLM's mm/prefix cache)."
    )
    image_min_pixels: int = Field(65536, ge=1024, description="Qwen3-VL resize lower bound in pixels.")
    image_max_pixels: int = Field(16777216, ge=1024, description="Qwen3-VL resize upper bound in pixels.")

    def zero_delay(self) -> SimSettings:
        """The same settings with every latency term at zero (throughput benchmarks)."""
        zeros = {name: 0.0 for name in type(self).model_fields if name.endswith("_ms")}
        return self.model_copy(update=zeros)


class ReplicaSettings(_Section):
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
    host: str = Field("127.0.0.1", description="Address a replica listens on.")
    port: int = Field(8200, ge=1, le=65535, description="Port of `qvl replica` (qvl up picks its own).")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where the engine runs; auto: GPUs when any are visible, else the CPU."
    )
    gpus: list[int] | None = Field(
        None, description="GPU indexes replicas may use; empty: every GPU nvidia-smi lists (or CUDA_VISIBLE_DEVICES)."
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
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vLLM engine arguments, passed through verbatim: {name: value} becomes --name value "
        "(true: --name, false: --no-name, lists and mappings as JSON).",
    )
    startup_timeout_s: float = Field(600.0, gt=0, description="Seconds a replica may take to answer /health.")
    run_dir: str = Field(
        ".qvl-run", description="Directory for replica logs, caches and the tiny model (relative to the cwd)."
    )


class CacheSettings(_Section):
    """The answer cache (`cache/`): keyed by image content and the request's meaning."""

    backend: str = Field(
        "memory", description="memory (in-process LRU), off, or redis://HOST:PORT/DB (shared by every router)."
    )
    ttl_s: float = Field(3600.0, gt=0, description="Seconds an answer stays cached.")
    max_entry_bytes: int = Field(1024 * 1024, ge=1024, description="Answers larger than this are not stored.")
    memory_max_entries: int = Field(10000, ge=1, description="memory: most answers kept (least recently used go).")
    memory_max_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="memory: most bytes of answers kept.")
    redis_timeout_s: float = Field(
        0.02, gt=0, description="redis: seconds one cache operation may take before the cache is bypassed."
    )
    redis_pool_size: int = Field(
        64,
        ge=1,
        description="redis: connections per router for cache operations (followers waiting on another "
        "router's answer hold connections of a second pool of the same size).",
    )
    lock_ttl_s: float = Field(
        30.0, gt=0, description="redis: how long a leader's single-flight lock holds followers on other routers."
    )
    deterministic_only: bool = Field(
        True, description="Cache only requests with temperature 0 or a fixed seed (others could legitimately differ)."
    )
    model_revisions: dict[str, str] = Field(
        default_factory=dict, description="Revision per served model, part of every key: change it when weights change."
    )
    key_prefix: str = Field("qvl:", description="redis: prefix of every key this cluster writes.")

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value in ("memory", "off") or value.startswith(("redis://", "rediss://", "unix://")):
            return value
        raise ValueError(f"cache backend must be memory, off or redis://HOST:PORT/DB, got {value!r}")


class GpuExporterSettings(_Section):
    """The GPU telemetry exporter (`qvl gpu-exporter`; `qvl up --engine vllm` and `qvl replica` start one)."""

    host: str = Field("127.0.0.1", description="Address the GPU exporter listens on.")
    port: int = Field(9835, ge=1, le=65535, description="Port the GPU exporter serves /metrics on.")
    node_name: str = Field("", description="Value of the host label on every series; empty: this machine's hostname.")


class UpSettings(_Section):
    engine: Literal["sim", "vllm"] = Field("vllm", description="Engine each local replica runs.")
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


class Settings(BaseSettings):
    """Everything a `qvl` process reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="QVL_", env_nested_delimiter="__", extra="forbid", frozen=True, case_sensitive=False
    )

    log_level: LogLevel = Field("info", description="Log level of every qvl process.")
    router: RouterSettings = Field(default_factory=RouterSettings, description="The router (`qvl router`).")
    sim: SimSettings = Field(default_factory=SimSettings, description="The simulated engine (`qvl sim`).")
    replica: ReplicaSettings = Field(default_factory=ReplicaSettings, description="vLLM replicas.")
    cache: CacheSettings = Field(default_factory=CacheSettings, description="The answer cache.")
    up: UpSettings = Field(default_factory=UpSettings, description="The local launcher (`qvl up`).")
    gpu_exporter: GpuExporterSettings = Field(
        default_factory=GpuExporterSettings, description="The GPU telemetry exporter (`qvl gpu-exporter`)."
    )
    api_keys: SecretStr = Field(
        SecretStr(""), description="API keys allowed every model, comma-separated (set it as QVL_API_KEYS)."
    )
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys at the router.")
    quota: QuotaSettings = Field(default_factory=QuotaSettings, description="Per-key rate limits.")
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings, description="Backpressure.")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Input limits checked at the edge.")
    fetch: FetchSettings = Field(default_factory=FetchSettings, description="http(s) image URL fetching.")
    audit: AuditSettings = Field(default_factory=AuditSettings, description="The audit log.")
    drain: DrainSettings = Field(default_factory=DrainSettings, description="Graceful shutdown.")
    registry: RegistrySettings = Field(
        default_factory=RegistrySettings, description="The replica registry in Redis (cluster mode)."
    )
    cluster: ClusterSettings = Field(default_factory=ClusterSettings, description="Replicas on Ray (`qvl cluster`).")


def load_settings(config_file: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Build the settings tree: flags (`overrides`, nested dicts) beat environment, which beats the YAML file."""
    file_values = _read_yaml(config_file) if config_file is not None else {}

    class _Layered(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=file_values)

    try:
        layered = _Layered(**dict(overrides or {}))
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    return Settings.model_construct(**{name: getattr(layered, name) for name in Settings.model_fields})


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping at the top level")
    return data


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        parts.append(f"setting {field}: {err['msg']}{shown}")
    return "; ".join(parts)
