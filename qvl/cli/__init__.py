"""The `qvl` command: one entry, a subcommand per role (router, sim, up, replica, gpu-exporter,
cluster up|status|scale|down|autoscale, model tiny, loadtest [run]|sweep|report,
plan calibrate|validate|size|verify|report, batch submit|status|cancel, autoscale replay);
`python -m qvl` and `python -m qvl.cli` run it too.

Every subcommand that runs with settings takes `--config FILE` (YAML) and reads `QVL_*` variables; its
flags win over both. Flags that set a settings field are added with `setting_flag` (qvl/cli/flags.py),
which takes their help text from the field.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qvl.cli import autoscale, batch, loadtest, plan, rollout
from qvl.cli.flags import SET_PREFIX, setting_flag
from qvl.cli.loadtest import with_default_action
from qvl.settings import Settings, SettingsError, load_settings

Handler = Callable[[Settings, argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, build the settings tree once, and run the chosen subcommand."""
    args = _parser().parse_args(with_default_action(list(sys.argv[1:] if argv is None else argv)))
    standalone: Callable[[argparse.Namespace], int] | None = getattr(args, "standalone", None)
    if standalone is not None:
        return standalone(args)
    if getattr(args, "tiny", False):
        return _build_tiny(args.out, args.seed)
    try:
        settings = settings_for(args)
        settings = with_sim_profile(settings, _runs_sim(args, settings))
    except SettingsError as exc:
        print(f"qvl: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "zero_delay", False):
        settings = settings.model_copy(update={"sim": settings.sim.zero_delay()})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    return handler(settings, args)


def parse_command(argv: Sequence[str]) -> tuple[argparse.Namespace, Settings]:
    """What `qvl ARGV` would run with: its parsed arguments and settings (used to check deployment
    files against the code). Raises SystemExit for unknown flags, SettingsError for bad values."""
    args = _parser().parse_args(argv)
    return args, settings_for(args)


def settings_for(args: argparse.Namespace) -> Settings:
    """The settings tree of parsed arguments: their --config file, the environment, then their flags."""
    overrides: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith(SET_PREFIX) and value is not None:
            _put(overrides, dest.removeprefix(SET_PREFIX).split("."), value)
    if getattr(args, "engine_args", None):
        overrides.setdefault("replica", {})["engine_args"] = _engine_args(args.engine_args)
    return load_settings(getattr(args, "config", None), overrides)


def _build_tiny(out: Path, seed: int) -> int:
    from serving.tiny_model import build_tiny_model

    print(f"qvl: building the tiny Qwen3-VL checkpoint in {out} (seed {seed}) ...", flush=True)
    built = build_tiny_model(out, seed)
    print(f"qvl: {built.params:,} parameters, vocabulary {built.vocab_size}, built in {built.seconds:.1f}s: {out}")
    return 0


def _run_router(settings: Settings, args: argparse.Namespace) -> int:
    from router.server import serve_router

    return serve_router(settings)


def _run_sim(settings: Settings, args: argparse.Namespace) -> int:
    from serving.sim.app import run_sim

    return run_sim(settings.sim, settings.log_level)


def _run_up(settings: Settings, args: argparse.Namespace) -> int:
    from qvl.cli.up import run_up

    return run_up(settings)


def _run_replica(settings: Settings, args: argparse.Namespace) -> int:
    from qvl.cli.up import run_replica

    return run_replica(settings)


def _run_gpu_exporter(settings: Settings, args: argparse.Namespace) -> int:
    from serving.gpu_exporter import run_gpu_exporter

    return run_gpu_exporter(settings.gpu_exporter)


def _run_cluster(settings: Settings, args: argparse.Namespace) -> int:
    from qvl.cli.cluster import run_cluster

    return run_cluster(
        settings,
        args.cluster_command,
        count=getattr(args, "count", None),
        as_json=args.json,
        once=getattr(args, "once", False),
    )


def _common_flags(p: argparse.ArgumentParser) -> None:
    """Flags of every subcommand that runs with settings."""
    p.add_argument("--config", type=Path, default=None, metavar="PATH", help="YAML settings file")
    setting_flag(p, "--log-level", "log_level")


def _edge_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the router's edge, shared by `qvl router` and `qvl up`."""
    setting_flag(
        parser,
        "--no-auth",
        "router.auth.enabled",
        action="store_const",
        const=False,
        help="accept requests without an API key (prints a warning; for local trials only)",
    )
    setting_flag(parser, "--keys-file", "router.auth.keys_file")
    setting_flag(parser, "--audit-log", "router.audit.path")


def _routing_flags(p: argparse.ArgumentParser) -> None:
    """Router flags shared by `qvl router` and `qvl up`."""
    setting_flag(p, "--host", "router.host")
    setting_flag(p, "--port", "router.port")
    setting_flag(p, "--policy", "router.policy")
    setting_flag(p, "--cache", "cache.backend", metavar="BACKEND")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qvl", description="qvl-cluster: Qwen3-VL serving cluster")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        _common_flags(p)
        return p

    router = command("router", _run_router, "Run the OpenAI-compatible router in front of replicas.")
    _routing_flags(router)
    setting_flag(
        router,
        "--replica",
        "router.replicas",
        action="append",
        help="a replica's base URL, e.g. http://10.0.0.5:8001 (repeat)",
    )
    setting_flag(router, "--load-factor", "router.load_factor", metavar="FACTOR")
    setting_flag(router, "--registry", "registry.url", metavar="URL")
    _edge_flags(router)

    sim = command("sim", _run_sim, "Run the simulated engine: vLLM's HTTP API and metrics, no GPU (load tests).")
    setting_flag(sim, "--host", "sim.host")
    setting_flag(sim, "--port", "sim.port")
    setting_flag(sim, "--model", "sim.model")
    setting_flag(sim, "--max-running", "sim.max_running")
    setting_flag(sim, "--output-tokens", "sim.output_tokens")
    setting_flag(sim, "--mm-cache-items", "sim.mm_cache_items")
    setting_flag(sim, "--max-batched-tokens", "sim.max_batched_tokens")
    setting_flag(sim, "--scheduling-policy", "sim.scheduling_policy")
    for field in SIM_TERMS:
        setting_flag(sim, f"--{field.replace('_', '-')}", f"sim.{field}")
    _profile_flag(sim)
    sim.add_argument("--zero-delay", action="store_true", help="set every latency term to zero")

    up = command("up", _run_up, "Start local replicas and a router in front of them, in the foreground.")
    setting_flag(up, "--engine", "up.engine")
    setting_flag(up, "--replicas", "up.replicas")
    _routing_flags(up)
    _edge_flags(up)
    setting_flag(up, "--model", "up.model", metavar="MODEL")
    _profile_flag(up, help="engine sim: a capacity profile (costs, engine limits) every replica runs with")
    _replica_flags(up)

    replica = command("replica", _run_replica, "Run one vLLM replica in the foreground.")
    setting_flag(replica, "--model", "replica.model", metavar="PATH")
    setting_flag(replica, "--served-model-name", "replica.served_model_name")
    setting_flag(replica, "--host", "replica.host")
    setting_flag(replica, "--port", "replica.port")
    _replica_flags(replica)

    gpu = command("gpu-exporter", _run_gpu_exporter, "Serve this host's GPU telemetry (NVML) as Prometheus metrics.")
    setting_flag(gpu, "--host", "gpu_exporter.host")
    setting_flag(gpu, "--port", "gpu_exporter.port")
    setting_flag(gpu, "--node-name", "gpu_exporter.node_name")

    _cluster_commands(sub)
    loadtest.add_commands(sub)
    plan.add_commands(sub)
    batch.add_commands(sub)
    rollout.add_commands(sub)
    autoscale.add_commands(sub, _common_flags)

    model = sub.add_parser("model", help="Build models.", description="Build models.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="WHAT")
    tiny_help = "Build the tiny random Qwen3-VL checkpoint (offline)."
    tiny = model_sub.add_parser("tiny", help=tiny_help, description=tiny_help)
    tiny.add_argument("--out", type=Path, required=True, metavar="PATH", help="directory to write the checkpoint to")
    tiny.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the random weights (default: %(default)s)"
    )
    tiny.set_defaults(handler=None, tiny=True)
    return parser


SIM_TERMS = (
    "step_base_ms",
    "per_decode_ms",
    "per_kv_ktoken_ms",
    "prefill_base_ms",
    "per_text_token_ms",
    "per_image_token_ms",
    "image_hit_discount",
    "frontend_base_ms",
    "frontend_per_image_token_ms",
)
"""The simulated engine's latency terms, each a `qvl sim` flag of the same name."""


def _profile_flag(p: argparse.ArgumentParser, help: str | None = None) -> None:
    setting_flag(p, "--profile", "sim.profile", type=Path, metavar="PATH", help=help)


def with_sim_profile(settings: Settings, runs_sim: bool) -> Settings:
    """`settings` with sim.profile's values in place of the sim settings it holds, when the command
    runs simulated engines and a profile is set; its path made absolute, for replicas started elsewhere.

    Raises SettingsError with the profile's problem (the file and the field) when it is bad."""
    path = settings.sim.profile
    if path is None or not runs_sim:
        return settings
    from serving.sim.profile import ProfileError, load_profile

    path = path.resolve()
    try:
        profile = load_profile(path)
    except ProfileError as exc:
        raise SettingsError(str(exc)) from None
    sim = profile.apply(settings.sim).model_copy(update={"profile": path})
    return settings.model_copy(update={"sim": sim})


def _runs_sim(args: argparse.Namespace, settings: Settings) -> bool:
    """Whether the command runs simulated engines in this process or as its replicas."""
    handler = getattr(args, "handler", None)
    return handler is _run_sim or (handler is _run_up and settings.up.engine == "sim")


def _cluster_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cluster = sub.add_parser(
        "cluster", help="Replicas on a Ray cluster.", description="Place, inspect, scale and stop replicas on Ray."
    )
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=_run_cluster)
        _common_flags(p)
        setting_flag(p, "--address", "cluster.address", metavar="ADDRESS")
        setting_flag(p, "--name", "cluster.name")
        p.add_argument("--json", action="store_true", help="print the replicas as JSON instead of a table")
        return p

    up = action("up", "Place replicas (one placement group each) and start them; returns once they are healthy.")
    setting_flag(up, "--replicas", "cluster.replicas")
    setting_flag(up, "--engine", "cluster.engine")
    setting_flag(up, "--registry", "registry.url", metavar="URL")
    action(
        "status",
        "Show every replica: node, GPUs, URL, health, uptime, restarts. Exits 3 when the Ray cluster is "
        "reachable but has no replica of this cluster name, 1 when it cannot be reached.",
    )
    scale = action("scale", "Start or stop replicas until there are N.")
    scale.add_argument("count", type=int, metavar="N", help="replicas wanted")
    action(
        "down",
        "Stop every replica and remove its placement group; also stop the local Ray head that `up --address "
        "local` started, unless other clusters' replicas are on it.",
    )
    auto = action(
        "autoscale",
        "Size every pool from its load until SIGINT or SIGTERM (the autoscale: settings): start replicas ahead "
        "of the demand, drain and stop the ones not needed. Serves /metrics and /status on autoscale.port.",
    )
    auto.add_argument("--once", action="store_true", help="decide (and act) once, print the status as JSON, exit")
    setting_flag(auto, "--dry-run", "autoscale.dry_run")
    setting_flag(auto, "--policy", "autoscale.policy")
    setting_flag(auto, "--interval", "autoscale.interval_s")
    setting_flag(auto, "--min-replicas", "autoscale.min_replicas")
    setting_flag(auto, "--max-replicas", "autoscale.max_replicas")
    setting_flag(auto, "--profile", "autoscale.profile", metavar="PATH", type=Path)
    setting_flag(auto, "--port", "autoscale.port")
    setting_flag(auto, "--registry", "registry.url", metavar="URL")


def _replica_flags(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by `qvl replica` and `qvl up` (they set replica.* settings)."""
    setting_flag(p, "--device", "replica.device")
    setting_flag(p, "--gpus", "replica.gpus", type=_int_list, metavar="I,J,...")
    setting_flag(p, "--cpus", "replica.cpus", type=_int_list, metavar="I,J,...")
    setting_flag(p, "--tensor-parallel-size", "replica.tensor_parallel_size", aliases=("--tp",))
    setting_flag(p, "--max-num-seqs", "replica.max_num_seqs")
    setting_flag(p, "--max-model-len", "replica.max_model_len", metavar="TOKENS")
    setting_flag(p, "--gpu-memory-utilization", "replica.gpu_memory_utilization", metavar="FRACTION")
    setting_flag(p, "--kv-cache-memory-bytes", "replica.kv_cache_memory_bytes")
    setting_flag(p, "--dtype", "replica.dtype")
    setting_flag(p, "--quantization", "replica.quantization", metavar="METHOD")
    setting_flag(p, "--enforce-eager", "replica.enforce_eager")
    setting_flag(p, "--scheduling-policy", "replica.scheduling_policy")
    setting_flag(p, "--run-dir", "replica.run_dir")
    setting_flag(p, "--gpu-exporter", "up.gpu_exporter")
    setting_flag(p, "--gpu-exporter-port", "gpu_exporter.port")
    p.add_argument(
        "--engine-arg",
        dest="engine_args",
        action="append",
        metavar="NAME=VALUE",
        help="extra vLLM engine argument, passed through (repeat); VALUE is read as JSON when it parses",
    )


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _engine_args(pairs: list[str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise SettingsError(f"--engine-arg needs NAME=VALUE, got {pair!r}")
        try:
            parsed[name.strip().lstrip("-").replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[name.strip().lstrip("-").replace("-", "_")] = raw
    return parsed


def _put(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
