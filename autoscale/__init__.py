"""Autoscaling: how many replicas each pool on Ray should have, from the load, ahead of cold starts,
without flapping.

- `policy`: the decisions, pure functions of what is observed (the `demand` policy and the `reactive`
  baseline, registered by name), and which replica a scale-down removes.
- `observe` and `capacity`: token rates from the engines, the batch share from the routers, and a
  replica's capacity at the SLO (profile, settings or learned).
- `loop`: one tick per interval: observe, decide, act on a `fleet`, count and log.
- `fleet`: the replicas behind a small protocol; `RayFleet` starts and drains them on Ray.
- `metrics` and `service`: the process `qvl cluster autoscale` runs (/metrics, /status, the status in Redis).
- `traces`, `replay`, `live`, `tool`: rate traces, the virtual-time fleet model with an oracle, the live
  compressed-time replay through the real router, and `qvl autoscale replay`.
"""
