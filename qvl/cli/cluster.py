"""The `qvl cluster` actions: connect to Ray, act, print the replicas, disconnect."""

from __future__ import annotations

import sys

from qvl.settings import Settings
from serving.ray.local import LocalHeadError


def say(message: str) -> None:
    print(f"qvl: {message}", file=sys.stderr, flush=True)


def run_cluster(settings: Settings, action: str, *, count: int | None = None, as_json: bool = False) -> int:
    """Run one action (up, status, scale, down); returns the exit status (1 with a one-line reason)."""
    import ray

    from serving.ray import cluster as ray_cluster
    from serving.ray import local as ray_local

    conf = settings.cluster
    try:
        ray_cluster.connect(conf, start_local=action == "up", say=say)
        try:
            if action == "up":
                rows = ray_cluster.up(settings, say)
            elif action == "scale":
                assert count is not None
                rows = ray_cluster.scale(settings, count, say)
            elif action == "down":
                ray_cluster.down(conf, say)
                rows = None
            else:
                rows = ray_cluster.status(conf)
            if rows is not None:
                print(ray_cluster.as_json(conf) if as_json else ray_cluster.format_table(rows), flush=True)
        finally:
            ray.shutdown()
        if action == "down" and conf.address == "local":
            head = ray_local.running_head(conf)
            if head is not None:
                ray_local.stop_head(head)
                say(f"stopped the local Ray head ({head.address})")
            ray_local.forget(conf)
    except (ray_cluster.ClusterError, LocalHeadError) as exc:
        print(f"qvl: {exc}", file=sys.stderr)
        return 1
    return 0
