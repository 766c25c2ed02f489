"""Cluster mode's part of the settings tree: the replica registry in Redis and replicas placed on Ray."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from qvl.settings.base import EngineName, Section, redis_url


class RegistrySettings(Section):
    """Where replicas announce themselves and routers find them (both read this section)."""

    url: Annotated[str, redis_url("")] = Field(
        "",
        description="Redis URL of the replica registry, e.g. redis://10.0.0.2:6379/0 or "
        "redis+sentinel://10.0.0.2:26379,10.0.0.3:26379,10.0.0.4:26379/qvl-primary/0. Empty: no registry "
        "(the router uses router.replicas only). Routers and `qvl cluster` replicas must name the same one.",
    )
    ttl_s: float = Field(
        10.0,
        gt=0,
        description="Seconds an announcement lasts; replicas re-announce every ttl_s / 3. A replica whose "
        "heartbeat stops leaves routing within ttl_s + poll_interval_s.",
    )
    poll_interval_s: float = Field(1.0, gt=0, description="Seconds between a router's reads of the registry.")
    timeout_s: float = Field(1.0, gt=0, description="Seconds one registry read or write may take.")
    key_prefix: str = Field("qvl:", description="Prefix of the registry's Redis keys (one cluster per prefix).")


class ClusterSettings(Section):
    """Replicas on a Ray cluster (`qvl cluster up|status|scale|down`)."""

    address: str = Field(
        "auto",
        description="Ray cluster to use: auto (RAY_ADDRESS, else the local head `up --address local` recorded "
        "in run_dir, else the one this machine belongs to), ray://HOST:PORT (Ray Client), "
        "HOST:PORT (its GCS), or local (start a Ray head on this machine; `qvl cluster down` stops it).",
    )
    name: str = Field(
        "qvl",
        pattern=r"^[a-z0-9][a-z0-9-]{0,30}$",
        description="Cluster name: prefix of the Ray actor and placement-group names, so several clusters can "
        "share one Ray cluster.",
    )
    engine: EngineName = Field("vllm", description="Engine of every replica (sim: load tests only).")
    replicas: int = Field(2, ge=0, le=256, description="Number of replicas `qvl cluster up` places.")
    gpus_per_replica: int | None = Field(
        None,
        ge=0,
        le=64,
        description="GPU bundles in each replica's placement group; empty: replica.tensor_parallel_size. "
        "0 places on CPUs only (a vLLM-CPU replica without logical GPUs).",
    )
    cpus_per_replica: float = Field(1.0, ge=0, description="Ray CPUs the supervising actor of each replica holds.")
    replica_host: str = Field(
        "",
        description="Address each replica's server binds to and announces; empty: the Ray node's IP address.",
    )
    placement_timeout_s: float = Field(
        60.0, gt=0, description="Seconds to wait for a replica's placement group before reporting it unplaceable."
    )
    max_restarts: int = Field(
        5, ge=0, description="Server restarts allowed within restart_window_s; past that the replica stays down."
    )
    restart_window_s: float = Field(600.0, gt=0, description="Window over which max_restarts is counted.")
    restart_backoff_s: float = Field(
        1.0, gt=0, description="Wait before the first restart; doubled for each restart in the window."
    )
    restart_backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between restarts.")
    health_interval_s: float = Field(2.0, gt=0, description="Seconds between a supervisor's health checks.")
    local_gpus: int = Field(
        0,
        ge=0,
        description="address local: GPUs the local Ray head declares (logical resources: on a machine without "
        "GPUs they let placement be tried and tested); 0: what Ray detects.",
    )
    local_cpus: int = Field(0, ge=0, description="address local: CPUs the local Ray head declares; 0: detected.")
    run_dir: str = Field(
        ".qvl-run/cluster",
        description="The local Ray head's files and its record (address, pid), which status, scale and down "
        "read with address auto or local.",
    )
