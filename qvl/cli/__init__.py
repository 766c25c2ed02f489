"""The `qvl` command: one entry, a subcommand per role (router, sim, up, replica, gpu-exporter).

Every subcommand takes `--config FILE` (YAML) and reads `QVL_*` variables; its flags win over both.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qvl.settings import Settings, SettingsError, load_settings

Handler = Callable[[Settings, argparse.Namespace], int]
# Flags whose dest starts with this prefix are settings overrides, e.g. "set:router.port".
_SET = "set:"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, build the settings tree once, and run the chosen subcommand."""
    args = _parser().parse_args(argv)
    if getattr(args, "tiny", False):
        return _build_tiny(args.out, args.seed)
    try:
        settings = settings_for(args)
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
        if dest.startswith(_SET) and value is not None:
            _put(overrides, dest.removeprefix(_SET).split("."), value)
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

    return run_cluster(settings, args.cluster_command, count=getattr(args, "count", None), as_json=args.json)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qvl", description="qvl-cluster: Qwen3-VL serving cluster")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        p.add_argument("--config", type=Path, default=None, help="YAML settings file")
        p.add_argument("--log-level", dest="set:log_level", choices=["debug", "info", "warning", "error"])
        return p

    router = command("router", _run_router, "Run the OpenAI-compatible router in front of replicas.")
    router.add_argument("--host", dest="set:router.host")
    router.add_argument("--port", dest="set:router.port", type=int)
    router.add_argument(
        "--replica",
        dest="set:router.replicas",
        action="append",
        metavar="URL",
        help="replica base URL (repeat)",
    )
    router.add_argument(
        "--policy",
        dest="set:router.policy",
        choices=["round-robin", "least-loaded", "session", "image-affinity"],
    )
    router.add_argument("--load-factor", dest="set:router.load_factor", type=float)
    router.add_argument(
        "--registry", dest="set:registry.url", metavar="redis://HOST:PORT/DB", help="find replicas in this registry"
    )
    router.add_argument("--cache", dest="set:cache.backend", metavar="memory|off|redis://HOST:PORT/DB")
    _edge_flags(router)

    sim = command("sim", _run_sim, "Run the simulated engine: vLLM's HTTP API and metrics, no GPU (load tests).")
    sim.add_argument("--host", dest="set:sim.host")
    sim.add_argument("--port", dest="set:sim.port", type=int)
    sim.add_argument("--model", dest="set:sim.model")
    sim.add_argument("--max-running", dest="set:sim.max_running", type=int)
    sim.add_argument("--output-tokens", dest="set:sim.output_tokens", type=int)
    sim.add_argument("--mm-cache-items", dest="set:sim.mm_cache_items", type=int)
    for field in (
        "ttft_base",
        "ttft_per_prompt_token",
        "ttft_per_image_token",
        "itl_base",
        "itl_per_running",
    ):
        sim.add_argument(f"--{field.replace('_', '-')}-ms", dest=f"set:sim.{field}_ms", type=float)
    sim.add_argument("--zero-delay", action="store_true", help="set every latency term to zero")

    up = command("up", _run_up, "Start local replicas and a router in front of them, in the foreground.")
    up.add_argument("--engine", dest="set:up.engine", choices=["sim", "vllm"])
    up.add_argument("--replicas", dest="set:up.replicas", type=int)
    up.add_argument("--port", dest="set:router.port", type=int)
    up.add_argument("--host", dest="set:router.host")
    up.add_argument(
        "--policy",
        dest="set:router.policy",
        choices=["round-robin", "least-loaded", "session", "image-affinity"],
    )
    up.add_argument("--cache", dest="set:cache.backend", metavar="memory|off|redis://HOST:PORT/DB")
    _edge_flags(up)
    up.add_argument(
        "--model", dest="set:up.model", help="checkpoint directory (vllm; default: the tiny test model) or name (sim)"
    )
    _replica_flags(up, port=False)

    replica = command("replica", _run_replica, "Run one vLLM replica in the foreground.")
    replica.add_argument("--model", dest="set:replica.model", help="checkpoint directory (default: tiny test model)")
    replica.add_argument("--served-model-name", dest="set:replica.served_model_name")
    replica.add_argument("--host", dest="set:replica.host")
    replica.add_argument("--port", dest="set:replica.port", type=int)
    _replica_flags(replica, port=True)

    gpu = command("gpu-exporter", _run_gpu_exporter, "Serve this host's GPU telemetry (NVML) as Prometheus metrics.")
    gpu.add_argument("--host", dest="set:gpu_exporter.host")
    gpu.add_argument("--port", dest="set:gpu_exporter.port", type=int)
    gpu.add_argument("--node-name", dest="set:gpu_exporter.node_name", help="host label (default: the hostname)")

    _cluster_commands(sub)

    model = sub.add_parser("model", help="Build models.", description="Build models.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="WHAT")
    tiny = model_sub.add_parser("tiny", help="Build the tiny random Qwen3-VL checkpoint (offline).")
    tiny.add_argument("--out", type=Path, required=True, help="directory to write the checkpoint to")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(handler=None, tiny=True)
    return parser


def _cluster_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cluster = sub.add_parser(
        "cluster", help="Replicas on a Ray cluster.", description="Place, inspect, scale and stop replicas on Ray."
    )
    actions = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=_run_cluster)
        p.add_argument("--config", type=Path, default=None, help="YAML settings file")
        p.add_argument("--log-level", dest="set:log_level", choices=["debug", "info", "warning", "error"])
        p.add_argument("--address", dest="set:cluster.address", metavar="auto|ray://HOST:PORT|HOST:PORT|local")
        p.add_argument("--name", dest="set:cluster.name", help="cluster name (default qvl)")
        p.add_argument("--json", action="store_true", help="print the replicas as JSON instead of a table")
        return p

    up = action("up", "Place replicas (one placement group each) and start them; returns once they are healthy.")
    up.add_argument("--replicas", dest="set:cluster.replicas", type=int)
    up.add_argument("--engine", dest="set:cluster.engine", choices=["sim", "vllm"])
    up.add_argument("--registry", dest="set:registry.url", metavar="redis://HOST:PORT/DB")
    action("status", "Show every replica: node, GPUs, URL, health, uptime, restarts.")
    scale = action("scale", "Start or stop replicas until there are N.")
    scale.add_argument("count", type=int, metavar="N", help="replicas wanted")
    action("down", "Stop every replica and remove its placement group (and a local Ray head).")


def _replica_flags(p: argparse.ArgumentParser, port: bool) -> None:
    """Engine flags shared by `qvl replica` and `qvl up` (they set replica.* settings)."""
    p.add_argument("--device", dest="set:replica.device", choices=["auto", "cpu", "gpu"])
    p.add_argument("--gpus", dest="set:replica.gpus", type=_int_list, help="GPU indexes to use, e.g. 0,1,2,3")
    p.add_argument("--tensor-parallel-size", "--tp", dest="set:replica.tensor_parallel_size", type=int)
    p.add_argument("--max-num-seqs", dest="set:replica.max_num_seqs", type=int)
    p.add_argument("--max-model-len", dest="set:replica.max_model_len", type=int)
    p.add_argument("--gpu-memory-utilization", dest="set:replica.gpu_memory_utilization", type=float)
    p.add_argument("--kv-cache-memory-bytes", dest="set:replica.kv_cache_memory_bytes", type=int)
    p.add_argument("--dtype", dest="set:replica.dtype")
    p.add_argument("--quantization", dest="set:replica.quantization")
    p.add_argument("--enforce-eager", dest="set:replica.enforce_eager", action=argparse.BooleanOptionalAction)
    p.add_argument("--run-dir", dest="set:replica.run_dir", help="logs, caches and the tiny model go here")
    p.add_argument(
        "--gpu-exporter",
        dest="set:up.gpu_exporter",
        action=argparse.BooleanOptionalAction,
        help="also start this host's GPU exporter (vllm engine)",
    )
    p.add_argument("--gpu-exporter-port", dest="set:gpu_exporter.port", type=int)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _edge_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the router's edge, shared by `qvl router` and `qvl up`."""
    parser.add_argument(
        "--no-auth",
        dest="set:router.auth.enabled",
        action="store_const",
        const=False,
        help="accept requests without an API key (prints a warning; for local trials only)",
    )
    parser.add_argument("--keys-file", dest="set:router.auth.keys_file", metavar="PATH", help="YAML file of API keys")
    parser.add_argument("--audit-log", dest="set:router.audit.path", metavar="PATH", help="audit log file (JSON lines)")
