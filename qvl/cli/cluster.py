"""The `qvl cluster` actions: connect to Ray, act, print the replicas, disconnect.

Exit status: 0 done; 1 with a one-line reason naming the Ray cluster looked at (unreachable, or no
replicas there while `cluster.run_dir` records a local head elsewhere, or a replica that cannot be
placed); 3 from `status` when that Ray cluster is reachable but has no replica of the cluster name.
`down` with nothing to stop says so and exits 0: what it is asked for holds.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from qvl.settings import Settings
from serving.ray.local import LocalHeadError

NO_REPLICAS = 3


def say(message: str) -> None:
    print(f"qvl: {message}", file=sys.stderr, flush=True)


def run_cluster(
    settings: Settings, action: str, *, count: int | None = None, as_json: bool = False, once: bool = False
) -> int:
    """Run one action (up, status, scale, down, autoscale); returns the exit status (see the module's docstring)."""
    import ray

    from serving.ray import cluster as ray_cluster
    from serving.ray import local as ray_local

    conf = settings.cluster
    code = 0
    try:
        target = ray_cluster.connect(conf, start_local=action == "up", say=say)
        others: list[str] = []
        try:
            found = ray_cluster.find(conf, target) if action != "up" else []
            rows = None
            if action == "up":
                rows = ray_cluster.up(settings, say)
            elif action == "autoscale":
                status = asyncio.run(_autoscale(settings, once))
                if once or as_json:
                    print(json.dumps(status, indent=2), flush=True)
            elif action == "scale":
                assert count is not None
                if not found:
                    say(f"no replicas of cluster {conf.name!r} on Ray at {target.address} yet: starting {count}")
                rows = ray_cluster.scale(settings, count, say)
            elif action == "down":
                if found:
                    ray_cluster.down(conf, target, say)
                else:
                    say(f"no replicas of cluster {conf.name!r} on Ray at {target.address}: nothing to stop")
                others = ray_cluster.other_clusters(conf)
            elif found:
                say(f"{len(found)} replica(s) of cluster {conf.name!r} on Ray at {target.address}")
                rows = ray_cluster.status(conf)
            else:
                say(f"no replicas of cluster {conf.name!r} on Ray at {target.address}")
                code = NO_REPLICAS
                if as_json:
                    print("[]", flush=True)
            if rows is not None:
                print(ray_cluster.as_json(conf) if as_json else ray_cluster.format_table(rows), flush=True)
        finally:
            ray.shutdown()
        # Only the head reached as `local` or `auto` is this config's to stop, not one named by its address.
        if action == "down" and target.local_head is not None and conf.address in ("local", "auto"):
            if others:
                say(f"left the local Ray head at {target.address} running: clusters {', '.join(others)} are on it")
            else:
                ray_local.stop_head(target.local_head)
                ray_local.forget(conf)
                say(f"stopped the local Ray head ({target.address})")
    except (ray_cluster.ClusterError, LocalHeadError) as exc:
        print(f"qvl: {exc}", file=sys.stderr)
        return 1
    return code


async def _autoscale(settings: Settings, once: bool) -> dict[str, Any]:
    """Run the autoscaler on the connected Ray until SIGINT or SIGTERM (or one tick); returns its last status."""
    from autoscale.fleet import RayFleet
    from autoscale.metrics import AutoscalerMetrics
    from autoscale.service import run_autoscaler, stop_on_signals

    stop = asyncio.Event()
    stop_on_signals(stop)
    metrics = AutoscalerMetrics()
    fleet = RayFleet(settings, metrics)
    try:
        autoscaler = await run_autoscaler(settings, fleet, metrics, stop, once=once)
    finally:
        say("waiting for drains and starts under way")
        await fleet.close()
    return autoscaler.status()
