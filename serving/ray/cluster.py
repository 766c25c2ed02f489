"""`qvl cluster up|status|scale|down`: replicas placed on a Ray cluster, one placement group each.

Replica i of cluster NAME is the detached actor `NAME-replica-i` (serving/ray/supervisor.py) in bundle 0
of the detached placement group `NAME-replica-i-pg`: `gpus_per_replica` bundles of one GPU each, with
STRICT_PACK, so a tensor-parallel replica's GPUs are all on one node. Both outlive the command that
made them; later commands find them by name in Ray's `qvl` namespace. This module runs in a plain
(synchronous) CLI process: it has no event loop to block.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError, RayError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qvl.settings import ClusterSettings, PoolSettings, Settings, load_settings
from serving.engines import ENGINES
from serving.ray import local as ray_local
from serving.ray.supervisor import ReplicaSupervisor

log = logging.getLogger("qvl.cluster")
NAMESPACE = "qvl"
CLIENT_ATTEMPTS = 3
Say = Callable[[str], None]


class ClusterError(RuntimeError):
    """Ray cannot be reached, a replica cannot be placed or started, or there is no such cluster."""


@dataclass(frozen=True)
class Row:
    """One line of `qvl cluster status`."""

    replica: str
    node: str
    gpus: str
    url: str
    state: str
    uptime_s: float | None
    restarts: int


@dataclass(frozen=True)
class Target:
    """The Ray cluster a command is connected to."""

    address: str  # as reported to the user: the GCS HOST:PORT, or the ray://HOST:PORT given
    local_head: ray_local.LocalHead | None  # the head `up --address local` recorded, when it is this one


def connect(conf: ClusterSettings, *, start_local: bool, say: Say) -> Target:
    """ray.init against the Ray cluster `conf.address` names; raises ClusterError naming it if unreachable.

    `local`: the head recorded in `cluster.run_dir` (started when `start_local` and none runs).
    `auto`: RAY_ADDRESS when set; else that recorded head when it runs (said on stderr: `up --address
    local` made it for this run_dir, while Ray's own guess picks any Ray on the machine); else Ray's `auto`.
    """
    head = ray_local.running_head(conf)
    if conf.address == "local":
        if head is None:
            if not start_local:
                raise ClusterError(f"no local Ray head is running: {_record_state(conf)}")
            say("starting a local Ray head" + (f" with {conf.local_gpus} logical GPU(s)" if conf.local_gpus else ""))
            head = ray_local.start_head(conf)
            say(f"local Ray head at {head.address} (Ray Client: {head.client_address}); log {head.log}")
        _init_recorded(conf, head, say)
        return Target(head.address, head)
    if conf.address == "auto" and not os.environ.get("RAY_ADDRESS"):
        if head is not None:
            say(
                f"address auto: using the local Ray head at {head.address} that `qvl cluster up --address local` "
                f"recorded in {ray_local.record_path(conf)}"
            )
            _init_recorded(conf, head, say)
            return Target(head.address, head)
        try:
            ray.init(address="auto", namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError:
            raise ClusterError(
                "no Ray cluster found for address auto: RAY_ADDRESS is not set, no Ray runs on this machine, and "
                f"{_record_state(conf)}; pass --address HOST:PORT (or ray://HOST:10001), or start a local head "
                "with `qvl cluster up --address local`"
            ) from None
        address = str(ray.get_runtime_context().gcs_address)
    else:
        address = conf.address if conf.address != "auto" else os.environ["RAY_ADDRESS"]
        if not ray_local.accepts(address):
            raise ClusterError(f"cannot reach the Ray cluster at {address}: nothing accepts connections there")
        _init(address, say)
        if not address.startswith("ray://"):
            address = str(ray.get_runtime_context().gcs_address)
    same = head is not None and address in (head.address, head.client_address)
    return Target(address, head if same else None)


def _init_recorded(conf: ClusterSettings, head: ray_local.LocalHead, say: Say) -> None:
    if not ray_local.accepts(head.address):
        raise ClusterError(
            f"the local Ray head recorded in {ray_local.record_path(conf)} (pid {head.pid}) does not accept "
            f"connections at {head.address}"
        )
    _init(head.address, say)


def _init(address: str, say: Say) -> None:
    # Ray Client starts a server process per connection on the head; on a busy head that start can
    # time out once (Ray's "Initialization failure from server"), and the next try usually works.
    attempts = CLIENT_ATTEMPTS if address.startswith("ray://") else 1
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
            return
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if attempt == attempts:
                raise ClusterError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
            say(f"connecting to {address} failed ({str(exc).strip().splitlines()[0]}); retrying ({attempt}/{attempts})")
            ray.shutdown()
            time.sleep(2.0 * attempt)


def find(conf: ClusterSettings, target: Target) -> list[str]:
    """Names of this cluster's replicas on `target`. None there while `cluster.run_dir` records a running
    local head elsewhere is a ClusterError naming both: the command was most likely pointed at the wrong Ray."""
    names = [_name(conf, i) for i in _replica_indexes(conf)]
    head = ray_local.running_head(conf)
    if not names and head is not None and target.local_head is None:
        raise ClusterError(
            f"no replicas of cluster {conf.name!r} on Ray at {target.address}, but {ray_local.record_path(conf)} "
            f"records a local Ray head that `qvl cluster up --address local` started at {head.address}: "
            "pass --address local to use that one"
        )
    return names


def other_clusters(conf: ClusterSettings) -> list[str]:
    """Names of the other qvl clusters with replicas on the connected Ray."""
    names = {str(n).rpartition("-replica-")[0] for n in ray.util.list_named_actors() if "-replica-" in str(n)}
    return sorted(names - {conf.name})


def _record_state(conf: ClusterSettings) -> str:
    path = ray_local.record_path(conf)
    recorded = ray_local.recorded_head(conf)
    if recorded is None:
        return f"no local head is recorded in {path} (cluster.run_dir)"
    return f"the local head recorded in {path} ({recorded.address}, pid {recorded.pid}) no longer runs"


def up(settings: Settings, say: Say) -> list[Row]:
    """Place and start replicas 0..replicas-1 that do not run yet; returns the status rows."""
    conf = settings.cluster
    if not settings.registry.url:
        say("warning: registry.url is empty: replicas are not announced, routers must list their URLs")
    dead = [i for i in _replica_indexes(conf) if _info(_actor(conf, i)) is None]
    if dead:
        say(f"re-placing {len(dead)} replica(s) whose supervisor is gone: {', '.join(_name(conf, i) for i in dead)}")
        _stop(conf, dead)
    existing = _replica_indexes(conf)
    if existing:
        say(f"{len(existing)} replica(s) of cluster {conf.name!r} already running")
    if not settings.pools:
        _start(settings, [i for i in range(conf.replicas) if i not in existing], say)
        return status(conf)
    plan = pool_plan(settings, existing)
    for pool in settings.pools:
        adding = sum(p is pool for p in plan.values())
        say(f"pool {pool.name}: {pool.replicas} replica(s) of {pool.model} version {pool.version}, {adding} to start")
    _start(settings, sorted(plan), say, plan)
    return status(conf)


def pool_plan(settings: Settings, existing: list[int]) -> dict[int, PoolSettings]:
    """The replicas each pool still lacks (counted by the pool the running ones report), at free indexes.
    A pool that has more than its `replicas` keeps them: `down` and `up` to shrink it."""
    have = Counter(str(info.get("pool", "")) for i in existing if (info := _info(_actor(settings.cluster, i))))
    free = (i for i in itertools.count() if i not in existing)
    return {next(free): pool for pool in settings.pools for _ in range(max(0, pool.replicas - have[pool.name]))}


def scale(settings: Settings, count: int, say: Say) -> list[Row]:
    """Grow to `count` replicas (with the settings the running ones were started with) or shrink by
    stopping the highest-numbered ones first."""
    conf = settings.cluster
    if settings.pools:
        raise ClusterError("scale resizes a cluster without pools; with pools, set pools[].replicas and run up")
    existing = _replica_indexes(conf)
    if len(existing) > count:
        doomed = existing[count:]
        say(f"stopping {len(doomed)} replica(s): {', '.join(_name(conf, i) for i in doomed)}")
        _stop(conf, doomed)
    elif len(existing) < count:
        for i in existing:
            info = _info(_actor(conf, i))
            if info is not None:
                settings = load_settings(None, info["settings"])
                break
        free = (i for i in itertools.count() if i not in existing)
        _start(settings, [next(free) for _ in range(count - len(existing))], say)
    return status(conf)


def down(conf: ClusterSettings, target: Target, say: Say) -> int:
    """Stop every replica of the cluster and remove its placement groups; returns how many."""
    existing = _replica_indexes(conf)
    _stop(conf, existing)
    say(f"stopped {len(existing)} replica(s) of cluster {conf.name!r} on Ray at {target.address}")
    return len(existing)


def status(conf: ClusterSettings) -> list[Row]:
    """One row per replica actor; an actor that does not answer shows state `dead`."""
    rows = []
    now = time.time()
    for i in _replica_indexes(conf):
        info = _info(_actor(conf, i))
        if info is None:
            rows.append(Row(_name(conf, i), "-", "-", "-", "dead", None, 0))
            continue
        node = f"{info['node_ip']} ({info['node_id'][:8]})"
        gpus = ",".join(map(str, info["gpus"])) or "-"
        uptime = now - info["started_at"] if info["healthy"] else None
        rows.append(Row(info["replica"], node, gpus, info["url"], info["state"], uptime, info["restarts"]))
    return rows


def replica_infos(conf: ClusterSettings) -> list[dict[str, Any]]:
    """Every answering replica's `info()` (for `status --json` and tests), settings left out."""
    found = []
    for i in _replica_indexes(conf):
        info = _info(_actor(conf, i))
        if info is not None:
            info.pop("settings", None)
            found.append(info)
    return found


def format_table(rows: list[Row]) -> str:
    head = ("REPLICA", "NODE", "GPUS", "URL", "HEALTHY", "UPTIME", "RESTARTS")
    lines = [
        (
            r.replica,
            r.node,
            r.gpus,
            r.url,
            "yes" if r.state == "healthy" else f"no ({r.state})",
            _duration(r.uptime_s),
            str(r.restarts),
        )
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    return "\n".join(
        "  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in [head, *lines]
    )


def as_json(conf: ClusterSettings) -> str:
    return json.dumps(replica_infos(conf), indent=2)


# -- placement ---------------------------------------------------------------------------------


def _start(settings: Settings, indexes: list[int], say: Say, plan: Mapping[int, PoolSettings] | None = None) -> None:
    if not indexes:
        return
    started: dict[int, tuple[ActorHandle, ray.ObjectRef]] = {}
    try:
        for i in indexes:
            started[i] = _create(settings, i, (plan or {}).get(i), say)
        _wait_started(settings.cluster, started, settings.replica.startup_timeout_s, say)
    except BaseException:
        _stop(settings.cluster, list(started))
        raise


def _create(settings: Settings, index: int, pool: PoolSettings | None, say: Say) -> tuple[ActorHandle, ray.ObjectRef]:
    """Place replica `index` (of `pool`) and ask its supervisor to start; returns the actor and the start's ref."""
    conf = settings.cluster
    own = ENGINES[conf.engine].for_pool(settings, pool) if pool is not None else settings
    spec = own.replica
    gpus = conf.gpus_per_replica if conf.gpus_per_replica is not None else spec.tensor_parallel_size
    dumped = own.model_dump(mode="json", exclude={"api_keys"})
    pool_doc = pool.model_dump(mode="json") if pool is not None else None
    pg = _place(conf, index, gpus, say)
    actor = (
        ray.remote(ReplicaSupervisor)
        .options(
            name=_name(conf, index),
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=conf.cpus_per_replica,
            num_gpus=1 if gpus else 0,
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
        )
        .remote(_name(conf, index), dumped, pg, pool_doc)
    )
    return actor, actor.start.remote()


def free_index(conf: ClusterSettings, taken: set[int]) -> int:
    """The lowest replica index with no actor or placement group and not in `taken` (indexes a caller
    has handed out and not yet placed)."""
    used = set(_replica_indexes(conf)) | taken
    return next(i for i in itertools.count() if i not in used)


def launch(settings: Settings, pool: PoolSettings | None, index: int, say: Say) -> tuple[str, ray.ObjectRef]:
    """Place replica `index` of `pool` (None: of the cluster without pools) and ask it to start without
    waiting: its `info()` says `starting` until it serves, and the returned ref resolves then (a RayError
    if it never does). Raises ClusterError when it cannot be placed within cluster.placement_timeout_s."""
    _, ref = _create(settings, index, pool, say)
    return _name(settings.cluster, index), ref


def remove(conf: ClusterSettings, replica: str, *, drain: bool, settle_s: float, timeout_s: float) -> dict[str, Any]:
    """Stop one replica by name. With `drain`, it first leaves the registry and finishes its requests
    (ReplicaSupervisor.drain); returns the drain's report ({} without)."""
    index = int(replica.rpartition("-replica-")[2])
    actor = _actor(conf, index)
    report: dict[str, Any] = {}
    if drain and actor is not None:
        try:
            report = ray.get(actor.drain.remote(settle_s, timeout_s), timeout=settle_s + timeout_s + 60)
        except (RayError, GetTimeoutError) as exc:
            report = {"drained": False, "error": cause(exc)}
    _stop(conf, [index])
    return report


def _place(conf: ClusterSettings, index: int, gpus: int, say: Say) -> PlacementGroup:
    bundles: list[dict[str, float]] = [{"GPU": 1.0} for _ in range(gpus)] or [{}]
    if conf.cpus_per_replica:
        bundles[0]["CPU"] = conf.cpus_per_replica
    if not bundles[0]:
        raise ClusterError("a replica needs at least one GPU or CPU: set gpus_per_replica or cpus_per_replica")
    name = _name(conf, index)
    pg = placement_group(bundles, strategy="STRICT_PACK", name=f"{name}-pg", lifetime="detached")
    if not pg.wait(conf.placement_timeout_s):
        remove_placement_group(pg)
        free = {k: v for k, v in ray.available_resources().items() if k in ("GPU", "CPU")}
        raise ClusterError(
            f"cannot place {name}: it needs {gpus} GPU(s) and {conf.cpus_per_replica} CPU(s) on one node "
            f"(STRICT_PACK), and none was free within {conf.placement_timeout_s:.0f}s; free in the whole "
            f"cluster: {free}"
        )
    where = f"{gpus} GPU bundle(s)" if gpus else "CPUs only"
    say(f"{name}: placement group ready ({where}, STRICT_PACK)")
    return pg


def _wait_started(
    conf: ClusterSettings,
    started: dict[int, tuple[ActorHandle, ray.ObjectRef]],
    timeout_s: float,
    say: Say,
) -> None:
    pending = {ref: i for i, (_, ref) in started.items()}
    began = time.monotonic()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=15)
        for ref in done:
            i = pending.pop(ref)
            try:
                info = ray.get(ref)
            except RayError as exc:
                raise ClusterError(f"{_name(conf, i)} did not start: {cause(exc)}") from None
            say(f"{info['replica']} healthy at {info['url']} on {info['node_ip']} (GPUs {info['gpus'] or '-'})")
        waited = time.monotonic() - began
        if pending and not done:
            if waited > timeout_s + 30:
                raise ClusterError(f"replicas still starting after {waited:.0f}s: {sorted(pending.values())}")
            say(f"still starting {len(pending)} replica(s) ({waited:.0f}s)")


def _stop(conf: ClusterSettings, indexes: list[int]) -> None:
    stopping = []
    for i in indexes:
        actor = _actor(conf, i)
        if actor is not None:
            stopping.append((actor, actor.stop.remote()))
    for actor, ref in stopping:
        try:
            ray.get(ref, timeout=60)
        except (RayError, GetTimeoutError) as exc:
            log.warning("replica did not stop cleanly: %s", cause(exc))
        ray.kill(actor, no_restart=True)
    for i in indexes:
        with contextlib.suppress(ValueError):  # never placed, or already removed
            remove_placement_group(ray.util.get_placement_group(f"{_name(conf, i)}-pg"))


# -- lookups -----------------------------------------------------------------------------------


def _name(conf: ClusterSettings, index: int) -> str:
    return f"{conf.name}-replica-{index}"


def _replica_indexes(conf: ClusterSettings) -> list[int]:
    """Replicas with a live actor or a placement group (whose actor may have died: status shows it)."""
    prefix = f"{conf.name}-replica-"
    names = [str(n) for n in ray.util.list_named_actors()]
    names += [
        str(pg["name"]).removesuffix("-pg")
        for pg in ray.util.placement_group_table().values()
        if pg.get("state") != "REMOVED" and str(pg.get("name", "")).endswith("-pg")
    ]
    return sorted({int(n.removeprefix(prefix)) for n in names if n.startswith(prefix) and n[len(prefix) :].isdigit()})


def _actor(conf: ClusterSettings, index: int) -> ActorHandle | None:
    try:
        return ray.get_actor(_name(conf, index), namespace=NAMESPACE)
    except ValueError:
        return None


def _info(actor: ActorHandle | None) -> dict[str, Any] | None:
    if actor is None:
        return None
    try:
        info: dict[str, Any] = ray.get(actor.info.remote(), timeout=10)
    except (RayActorError, GetTimeoutError):
        return None
    return info


def cause(exc: BaseException) -> str:
    """The remote exception's own message (RayTaskError wraps it with a traceback)."""
    cause = getattr(exc, "cause", None)
    return str(cause if cause is not None else exc).strip()[-4000:]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
