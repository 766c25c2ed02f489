"""`qvl autoscale replay`: replay a rate trace against the autoscale settings (autoscale/tool.py).

Virtual time by default (seconds for a day); `--live` through the real router and autoscaler with
simulated replicas on a local Ray cluster, in compressed time (autoscale/live.py; needs --registry).
Exit status: 0 done, 1 when the trace cannot be read or the live replay cannot start.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qvl.cli.flags import setting_flag
from qvl.settings import Settings


def add_commands(sub: argparse._SubParsersAction, common: object) -> None:  # type: ignore[type-arg]
    auto = sub.add_parser("autoscale", help="Tune the autoscaler on traces.", description=__doc__)
    actions = auto.add_subparsers(dest="autoscale_command", required=True, metavar="ACTION")
    text = (
        "Replay a rate trace against the autoscale settings, the reactive baseline and an oracle; print each "
        "one's minutes in violation of the SLO, replica-hours and direction changes, and draw them."
    )
    p: argparse.ArgumentParser = actions.add_parser("replay", help=text, description=text)
    p.set_defaults(handler=run_replay)
    assert callable(common)
    common(p)
    p.add_argument(
        "--trace",
        default="flash-sale",
        metavar="NAME|PATH",
        help="flash-sale, noisy-sine, diurnal, or a CSV of t_s,rate rows (default: %(default)s)",
    )
    p.add_argument(
        "--base-rate", type=float, default=50.0, metavar="RPS", help="a built-in trace's base rate (default: 50)"
    )
    p.add_argument(
        "--capacity-rps",
        type=float,
        default=10.0,
        metavar="RPS",
        help="requests/s one replica serves at the SLO, e.g. from `qvl plan size` (default: 10)",
    )
    p.add_argument(
        "--latency",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="mean time a request is in flight on an unloaded replica; the reactive baseline sees rate x this "
        "in flight (default: 0.25, which puts its target of 2 per replica at 80 %% of 10 requests/s)",
    )
    p.add_argument("--start", type=int, default=None, metavar="N", help="replicas at the start (default: the oracle's)")
    p.add_argument(
        "--out", type=Path, default=Path(".qvl-run/autoscale-replay"), metavar="DIR", help="where to write the results"
    )
    p.add_argument("--live", action="store_true", help="replay through the real router and autoscaler on local Ray")
    p.add_argument("--speed", type=float, default=10.0, help="--live: trace seconds per real second (default: 10)")
    p.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS", help="trace seconds to replay (default: all)"
    )
    setting_flag(p, "--registry", "registry.url", metavar="URL")
    setting_flag(p, "--policy", "autoscale.policy")
    setting_flag(p, "--startup", "autoscale.startup_s")
    setting_flag(p, "--min-replicas", "autoscale.min_replicas")
    setting_flag(p, "--max-replicas", "autoscale.max_replicas")
    setting_flag(p, "--target-utilisation", "autoscale.target_utilisation")


def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    from autoscale.replay import Fleet
    from autoscale.tool import compare, load_trace, plot, rows, table
    from loadtests.planner.size import SizingError

    try:
        named = load_trace(args.trace, args.base_rate)
    except SizingError as exc:
        print(f"qvl: {exc}", file=sys.stderr)
        return 1
    if args.duration:
        named = type(named)(named.trace, args.duration, named.about)
    auto = settings.autoscale
    fleet = Fleet(capacity_rps=args.capacity_rps, startup_s=auto.startup_s, latency_s=args.latency)
    if args.live:
        return _live(settings, named, args)
    start = args.start if args.start is not None else max(auto.min_replicas, _ceil(named.trace(0) / args.capacity_rps))
    # The policy sees token rates: one replica's capacity in tokens is the fleet model's.
    capacity = fleet.capacity()
    tuned = auto.model_copy(
        update={
            "capacity_prefill_tokens_s": capacity.prefill_tokens_s,
            "capacity_decode_tokens_s": capacity.decode_tokens_s,
        }
    )
    runs = compare(named, tuned, fleet, start)
    found = rows(runs)
    print(f"{named.about}; a replica serves {args.capacity_rps:g} requests/s and starts in {auto.startup_s:g} s")
    print(table(found))
    capped = sum(d.reason == "at_max" for run in runs.values() for d in run.decisions) * 5.0 / 60
    if capped >= 1:
        print(f"note: a policy was held at max_replicas ({auto.max_replicas}) for {capped:.0f} min; see --max-replicas")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replay.json").write_text(json.dumps({"trace": named.about, "rows": found}, indent=2) + "\n")
    figure = plot(runs, named.about, args.out / "replay.png", args.capacity_rps)
    print(f"wrote {args.out / 'replay.json'} and {figure}")
    return 0


def _ceil(value: float) -> int:
    return int(-(-value // 1))


def _live(settings: Settings, named: object, args: argparse.Namespace) -> int:
    from autoscale.live import run_live
    from autoscale.tool import NamedTrace

    assert isinstance(named, NamedTrace)
    if not settings.registry.url:
        print("qvl: --live needs a Redis for the replicas' registry: --registry redis://HOST:PORT/DB", file=sys.stderr)
        return 1
    run = run_live(
        settings,
        named.trace,
        named.duration_s,
        speed=args.speed,
        cold_start_s=settings.autoscale.startup_s,
        start=args.start or settings.autoscale.min_replicas,
        run_dir=args.out,
        say=lambda m: print(f"qvl: {m}", file=sys.stderr, flush=True),
    )
    run.dump(args.out / "live")
    print(json.dumps(run.summary(), indent=2))
    return 0
