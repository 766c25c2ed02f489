"""Reading an engine's Prometheus text page (vLLM's `vllm:` series, which `qvl sim` exports too).

One pure function, shared by the router (queue and cache gauges, router/replicas.py), the Ray supervisor
(is a draining replica empty yet) and the autoscaler (token rates, autoscale/observe.py).
"""

from __future__ import annotations

from collections.abc import Collection


def engine_series(text: str, wanted: Collection[str], take_max: Collection[str] = ()) -> dict[str, float]:
    """The value of each series in `wanted` on the page, summed over its label sets (engines of several
    models, or several engine cores), or the largest for the names in `take_max`. A counter is found under
    its name with or without `_total` (prometheus_client and vLLM differ); names not on the page are absent.
    """
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in wanted:
            name = name.removesuffix("_total")
            if name not in wanted:
                continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except ValueError:
            continue
        if name in take_max:
            found[name] = max(found.get(name, value), value)
        else:
            found[name] = found.get(name, 0.0) + value
    return found


def engine_busy(text: str) -> int:
    """Requests running or waiting on the engine whose page this is."""
    found = engine_series(text, ("vllm:num_requests_running", "vllm:num_requests_waiting"))
    return round(sum(found.values()))
