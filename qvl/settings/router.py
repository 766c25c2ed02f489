"""The router's part of the settings tree: listening, replicas, routing, health checks, and the edge
(API keys, quotas, admission, input limits, image fetching, the audit log, graceful drain) nested under it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator

from qvl.settings.base import Section, redis_url
from qvl.settings.versions import RolloutSettings, RouteSettings

PolicyName = Literal["round-robin", "least-loaded", "session", "image-affinity"]


class AuthSettings(Section):
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


class QuotaSettings(Section):
    backend: Annotated[str, redis_url("memory")] = Field(
        "memory",
        description="Where per-key token buckets live: memory (per router) or a Redis URL shared by every router "
        "(redis://HOST:PORT/DB, or redis+sentinel://H1:P1,H2:P2,.../SERVICE/DB).",
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
        0.05, gt=0, description="redis: seconds one quota check may take before the store counts as down."
    )
    on_store_failure: Literal["local", "open", "closed"] = Field(
        "local",
        description="redis: what a router does while the store is down: local (each router enforces its "
        "share of every key's rate, the rate divided by `routers`, in its own buckets), open (admit every "
        "request, unmetered) or closed (refuse with 503 quota_unavailable).",
    )
    routers: int = Field(
        0,
        ge=0,
        description="redis, local: routers sharing each key's rate while the store is down; 0: the live routers "
        "in the registry (registry.url) as last read, 1 without a registry.",
    )
    probe_interval_s: float = Field(
        1.0, gt=0, description="redis: seconds between checks of a down store; requests do not wait on them."
    )


class AdmissionSettings(Section):
    max_in_flight_per_replica: int = Field(
        64, ge=1, description="Requests this router sends to one replica at once; more wait in the queue."
    )
    queue_size: int = Field(
        256, ge=0, description="Requests that may wait for a replica slot; beyond it new ones get 503 at once."
    )
    queue_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for a replica slot before the request gets 503 with Retry-After."
    )


class LimitSettings(Section):
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


class FetchSettings(Section):
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


class AuditSettings(Section):
    path: str = Field("", description="Audit log file (JSON lines); empty: no audit log.")
    max_bytes: int = Field(100 * 1024 * 1024, ge=1024, description="Rotate the audit log when it reaches this size.")
    backups: int = Field(10, ge=1, description="Rotated audit files kept (audit.log.1 ... .N).")
    include_prompts: bool = Field(False, description="Write the prompt text into audit lines (never image bytes).")
    queue_size: int = Field(
        100_000, ge=100, description="Lines waiting for the writer; when full, requests wait (nothing is dropped)."
    )


class DrainSettings(Section):
    timeout_s: float = Field(
        30.0, ge=0, description="On SIGTERM: seconds in-flight requests may take to finish before the router exits."
    )


class HealthSettings(Section):
    interval_s: float = Field(1.0, gt=0, description="Seconds between active health checks of each replica.")
    timeout_s: float = Field(1.0, gt=0, description="Seconds a health check (GET /health) may take.")
    eject_after_failures: int = Field(
        2, ge=1, description="Consecutive failed checks or connection errors before a replica is ejected."
    )
    readmit_after_successes: int = Field(
        1, ge=1, description="Consecutive passed checks before an ejected replica takes traffic again."
    )


class ConsoleSettings(Section):
    enabled: bool = Field(
        True, description="Serve the web console (playground and operations page) under /console; off: 404 there."
    )
    session_secret: SecretStr = Field(
        SecretStr(""),
        description="Key that signs console session cookies (16+ characters). Empty: a random one per process, so "
        "sessions end when the router restarts and only work against the router that signed them; give every "
        "router behind one address the same value (QVL_ROUTER__CONSOLE__SESSION_SECRET).",
    )
    session_ttl_s: float = Field(
        8 * 3600.0, gt=0, description="Seconds a console sign-in lasts before the key must be entered again."
    )
    secure_cookie: bool = Field(
        False,
        description="Mark the session cookie Secure (sent over HTTPS only): set it when the router is reached "
        "through TLS (nginx in deploy/ terminates it).",
    )
    refresh_s: float = Field(
        1.0, gt=0, le=2.0, description="Seconds between refreshes of the operations page (at most 2)."
    )
    stale_after_s: float = Field(
        10.0,
        gt=0,
        description="Seconds without an answer from a replica or GPU exporter before its row is marked stale.",
    )
    window_s: float = Field(
        60.0, ge=10, description="Seconds of history behind the router's rates, ratios and percentiles on the page."
    )
    gpu_exporters: list[str] = Field(
        default_factory=list,
        description="Base URLs of GPU exporters (`qvl gpu-exporter`) whose GPUs the operations page shows; "
        "`qvl up` adds the one it starts.",
    )

    @field_validator("session_secret")
    @classmethod
    def _secret(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and len(value.get_secret_value()) < 16:
            raise ValueError("session_secret must be empty (random per process) or at least 16 characters")
        return value

    @field_validator("gpu_exporters")
    @classmethod
    def _exporters(cls, value: list[str]) -> list[str]:
        return _base_urls(value, "GPU exporter")


class ClassSettings(Section):
    forward_priority: bool = Field(
        True,
        description="Send each request's class as vLLM's `priority` (replicas must run `--scheduling-policy "
        "priority`, replica.scheduling_policy); a client's own `priority` field is always replaced.",
    )
    interactive_priority: int = Field(0, description="vLLM priority of interactive requests (lower runs first).")
    flex_priority: int = Field(5, description="vLLM priority of `service_tier: flex` requests.")
    batch_priority: int = Field(10, description="vLLM priority of batch lines.")
    flex_shed_queue: int = Field(
        1,
        ge=0,
        description="Shed `flex` requests (429 with Retry-After) while every replica of the model has at least this "
        "many requests waiting in its engine, or requests wait for a router slot; 0: never shed.",
    )


class BatchSettings(Section):
    enabled: bool = Field(True, description="Serve the OpenAI files and batches API and run batch jobs.")
    state: Annotated[str, redis_url("memory")] = Field(
        "memory",
        description="Where batch job state lives: memory (this router only; jobs are lost when it stops) or a "
        "Redis URL shared by every router, so jobs survive restarts and any router resumes a job whose router died.",
    )
    files_dir: str = Field(
        ".qvl-run/batch-files",
        description="Directory of uploaded input files and of output and error files; with several routers, one "
        "directory shared by all (a volume mounted on each).",
    )
    key_prefix: str = Field("qvl:batch:", description="Prefix of every Redis key of batch job state.")
    max_file_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="Largest uploaded file.")
    max_lines: int = Field(50_000, ge=1, description="Most lines (requests) in one batch input file.")
    in_flight_per_replica: int = Field(
        8, ge=1, description="Batch lines one router sends to one replica at once (K), while the replica has room."
    )
    start_interval_s: float = Field(
        0.1,
        ge=0,
        description="At most one new batch line per replica every this many seconds, so that batch prefills "
        "spread over the engine's steps instead of stretching one that interactive requests wait on.",
    )
    headroom_slots: int = Field(
        0,
        ge=0,
        description="Once a replica's slots are learned (the most it ran while requests waited), batch lines are "
        "sent only while this many of them stay free for interactive arrivals.",
    )
    quiet_after_interactive_s: float = Field(
        0.05,
        ge=0,
        description="No new batch line goes to a replica this soon after an interactive or flex request was sent "
        "to it, so that a batch prefill does not share, and stretch, the engine step that prefills the "
        "interactive one (0: no wait).",
    )
    spare_kv_cache: float = Field(
        0.9,
        gt=0,
        le=1,
        description="A replica has room for batch lines only while no request waits in its engine and its KV-cache "
        "use is below this.",
    )
    aging_after_s: float = Field(
        30.0,
        gt=0,
        description="A job with no line finished for this long may send one line at a time even to busy replicas "
        "(the aging floor against starvation).",
    )
    strict: bool = Field(False, description="No aging floor: batch lines only ever use spare capacity.")
    line_attempts: int = Field(
        3, ge=1, description="Times a line is tried when its replica fails (a 5xx) before it counts as failed."
    )
    lease_s: float = Field(
        5.0,
        gt=0,
        description="A router holds a job for this long without renewing; after that another router resumes it.",
    )
    poll_interval_s: float = Field(0.5, gt=0, description="Seconds between a router's looks for jobs to run.")


class RouterSettings(Section):
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
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        description="Seconds an idle client connection stays open. Longer than clients' own idle expiry (httpx "
        "and the OpenAI SDK: 5 s), so that a client never sends on a connection the router is closing.",
    )
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
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys at the router.")
    quota: QuotaSettings = Field(default_factory=QuotaSettings, description="Per-key rate limits.")
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings, description="Backpressure.")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Input limits checked at the edge.")
    fetch: FetchSettings = Field(default_factory=FetchSettings, description="http(s) image URL fetching.")
    audit: AuditSettings = Field(default_factory=AuditSettings, description="The audit log.")
    drain: DrainSettings = Field(default_factory=DrainSettings, description="Graceful shutdown.")
    console: ConsoleSettings = Field(
        default_factory=ConsoleSettings, description="The web console under /console (same API keys)."
    )
    classes: ClassSettings = Field(
        default_factory=ClassSettings, description="Priority classes: interactive, flex and batch."
    )
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Batch jobs (the OpenAI Batch API).")
    routes: dict[str, RouteSettings] = Field(
        default_factory=dict,
        description="Public model name -> how it is split between versions. A pooled model without a route "
        "goes to its first pool's version; a rollout's route (in Redis) replaces the one given here.",
    )
    rollout: RolloutSettings = Field(
        default_factory=RolloutSettings, description="Rollouts of a new model version (`qvl rollout`)."
    )

    @field_validator("replicas")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return _base_urls(value, "replica")


def _base_urls(value: list[str], what: str) -> list[str]:
    cleaned = []
    for url in value:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{what} URL must start with http:// or https://, got {url!r}")
        cleaned.append(url.rstrip("/"))
    if len(set(cleaned)) != len(cleaned):
        raise ValueError(f"{what} URLs must be distinct")
    return cleaned
