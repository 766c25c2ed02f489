"""The `qvl` command: one entry, a subcommand per role (router, sim, up).

Every subcommand takes `--config FILE` (YAML) and reads `QVL_*` variables; its flags win over both.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qvl.settings import Settings, SettingsError, load_settings

Handler = Callable[[Settings], int]
# Flags whose dest starts with this prefix are settings overrides, e.g. "set:router.port".
_SET = "set:"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, build the settings tree once, and run the chosen subcommand."""
    parser = _parser()
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith(_SET) and value is not None:
            _put(overrides, dest.removeprefix(_SET).split("."), value)
    try:
        settings = load_settings(args.config, overrides)
    except SettingsError as exc:
        print(f"qvl: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "zero_delay", False):
        settings = settings.model_copy(update={"sim": settings.sim.zero_delay()})
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    return handler(settings)


def _run_router(settings: Settings) -> int:
    from router.server import serve_router

    return serve_router(settings)


def _run_sim(settings: Settings) -> int:
    from serving.sim_app import run_sim

    return run_sim(settings.sim, settings.log_level)


def _run_up(settings: Settings) -> int:
    from serving.launcher import run_up

    return run_up(settings)


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
    up.add_argument("--model", dest="set:sim.model", help="model name the simulated replicas serve")
    return parser


def _put(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
