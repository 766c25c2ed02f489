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
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from qvl.settings.autoscale import AutoscaleSettings
from qvl.settings.base import REDIS_URL_ERROR, EngineName, Section, SettingsError, is_redis_url, redis_url
from qvl.settings.cache import CacheSettings
from qvl.settings.cluster import ClusterSettings, RegistrySettings
from qvl.settings.router import (
    AdmissionSettings,
    AuditSettings,
    AuthSettings,
    BatchSettings,
    ClassSettings,
    ConsoleSettings,
    DrainSettings,
    FetchSettings,
    HealthSettings,
    LimitSettings,
    PolicyName,
    QuotaSettings,
    RouterSettings,
)
from qvl.settings.serving import GpuExporterSettings, ReplicaSettings, SimSettings, UpSettings
from qvl.settings.versions import PoolSettings, RolloutSettings, RouteSettings, is_version, versioned

__all__ = [
    "AdmissionSettings",
    "AuditSettings",
    "AuthSettings",
    "AutoscaleSettings",
    "BatchSettings",
    "CacheSettings",
    "ClassSettings",
    "ClusterSettings",
    "ConsoleSettings",
    "DrainSettings",
    "EngineName",
    "FetchSettings",
    "GpuExporterSettings",
    "HealthSettings",
    "LimitSettings",
    "PolicyName",
    "PoolSettings",
    "QuotaSettings",
    "RegistrySettings",
    "ReplicaSettings",
    "RolloutSettings",
    "RouteSettings",
    "RouterSettings",
    "Section",
    "Settings",
    "SettingsError",
    "SimSettings",
    "UpSettings",
    "is_redis_url",
    "is_version",
    "load_settings",
    "redis_url",
    "versioned",
]

LogLevel = Literal["debug", "info", "warning", "error"]


DEFAULT_POOL = "default"
"""The name the autoscaler gives the one pool of a cluster without `pools`."""


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
    registry: RegistrySettings = Field(
        default_factory=RegistrySettings, description="The replica registry in Redis (cluster mode)."
    )
    cluster: ClusterSettings = Field(default_factory=ClusterSettings, description="Replicas on Ray (`qvl cluster`).")
    pools: list[PoolSettings] = Field(
        default_factory=list,
        description="Model pools, each one version of one model with its own replicas; `qvl up` and `qvl cluster "
        "up` start every pool's replicas (then up.replicas and cluster.replicas are unused, and `qvl cluster "
        "scale` is refused). Empty: one pool of up.replicas (cluster.replicas) replicas of the model the engine "
        "settings name, without a version.",
    )
    autoscale: AutoscaleSettings = Field(
        default_factory=AutoscaleSettings, description="The autoscaler of pools on Ray (`qvl cluster autoscale`)."
    )

    @model_validator(mode="after")
    def _pools(self) -> Settings:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError("pool names must be distinct")
        served = [p.versioned for p in self.pools]
        if len(set(served)) != len(served):
            raise ValueError("two pools serve the same model and version")
        for model, route in self.router.routes.items():
            known = {p.version for p in self.pools if p.model == model}
            unknown = sorted(set(route.versions) - known) if known else []
            if unknown:
                raise ValueError(f"route {model} names version(s) no pool serves: {', '.join(unknown)}")
        pools = set(names) or {DEFAULT_POOL}
        stray = sorted(set(self.autoscale.pools) - pools)
        if stray:
            raise ValueError(f"autoscale.pools names no pool: {', '.join(stray)} (pools: {', '.join(sorted(pools))})")
        return self


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
        shown = (
            "" if isinstance(got, dict | list) or got is None or err["type"] == REDIS_URL_ERROR else f" (got {got!r})"
        )
        parts.append(f"setting {field}: {err['msg']}{shown}")
    return "; ".join(parts)
