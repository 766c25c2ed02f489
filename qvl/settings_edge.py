"""Settings sections of the router's edge: API keys, quotas, admission (backpressure), input limits, image
URL fetching, the audit log and graceful drain. Part of the one settings tree in qvl/settings.py."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuthSettings(_Section):
    enabled: bool = Field(
        True,
        description="Require `Authorization: Bearer <key>`. Off only when set false explicitly (`--no-auth`); "
        "start-up then prints a warning.",
    )
    keys_file: str = Field(
        "",
        description="YAML file of API keys: a list of {id, key or sha256, models, requests_per_minute, "
        "image_tokens_per_minute}. Keys from QVL_API_KEYS (comma-separated) are added to it.",
    )


class QuotaSettings(_Section):
    backend: str = Field(
        "memory",
        description="Where per-key token buckets live: memory (per router) or a Redis URL (shared by every router).",
    )
    requests_per_minute: float = Field(
        0, ge=0, description="Default request rate per API key (0: unlimited); a key may set its own."
    )
    image_tokens_per_minute: float = Field(
        0, ge=0, description="Default image-token rate per API key (0: unlimited); a key may set its own."
    )
    burst_s: float = Field(
        10.0, gt=0, description="Bucket size in seconds of the rate: how much a key may send at once after idling."
    )
    redis_timeout_s: float = Field(
        0.05, gt=0, description="redis: seconds one quota check may take before the request is refused with 503."
    )

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value == "memory" or value.startswith(("redis://", "rediss://", "unix://")):
            return value
        raise ValueError(f"quota backend must be memory or redis://HOST:PORT/DB, got {value!r}")


class AdmissionSettings(_Section):
    max_in_flight_per_replica: int = Field(
        64, ge=1, description="Requests this router sends to one replica at once; more wait in the queue."
    )
    queue_size: int = Field(
        256, ge=0, description="Requests that may wait for a replica slot; beyond it new ones get 503 at once."
    )
    queue_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for a replica slot before the request gets 503 with Retry-After."
    )


class LimitSettings(_Section):
    max_images: int = Field(16, ge=0, description="Images per request.")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Decoded bytes per image.")
    max_image_pixels: int = Field(
        40_000_000, ge=1024, description="Pixels (width x height, read from the image header) per image."
    )
    image_formats: list[str] = Field(
        default_factory=lambda: ["jpeg", "png", "webp", "bmp"],
        description="Accepted image formats, recognised from the bytes (not the data URL's media type).",
    )
    max_messages: int = Field(256, ge=1, description="Messages per request.")
    max_tokens: int = Field(32768, ge=1, description="Largest accepted max_tokens / max_completion_tokens.")

    @field_validator("image_formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        known = {"jpeg", "png", "webp", "bmp"}
        if unknown := set(value) - known:
            raise ValueError(f"image formats must be among {sorted(known)}, got {sorted(unknown)}")
        return value


class FetchSettings(_Section):
    enabled: bool = Field(
        False, description="Fetch http(s) image URLs at the edge (off: only data: URLs are accepted)."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names image URLs may name (exact, or `*.example.com`); required when fetching is on.",
    )
    max_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest image body fetched.")
    timeout_s: float = Field(5.0, gt=0, description="Seconds one image fetch may take, connect to last byte.")
    max_redirects: int = Field(
        0, ge=0, le=5, description="Redirects followed (each target re-checked like the first URL); 0 refuses them."
    )


class AuditSettings(_Section):
    path: str = Field("", description="Audit log file (JSON lines); empty: no audit log.")
    max_bytes: int = Field(100 * 1024 * 1024, ge=1024, description="Rotate the audit log when it reaches this size.")
    backups: int = Field(10, ge=1, description="Rotated audit files kept (audit.log.1 ... .N).")
    include_prompts: bool = Field(False, description="Write the prompt text into audit lines (never image bytes).")
    queue_size: int = Field(
        100_000, ge=100, description="Lines waiting for the writer; when full, requests wait (nothing is dropped)."
    )


class DrainSettings(_Section):
    timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: seconds in-flight requests may take to finish before the router exits."
    )
