"""`qvl rollout start | status | pause | resume | abort | promote`: roll a new model version out by weighted
canary, through any router (the state is in Redis; one router runs the analysis).

    qvl rollout start qwen3-vl-8b --to v2 --steps 1,5,25,50,100 --min-requests 500 --min-duration 300
    qvl rollout status qwen3-vl-8b --watch          # the step, the weights, the analysis, the decisions
    qvl rollout abort qwen3-vl-8b                   # every client back on the baseline at once

A client of the router (`--url`, default http://127.0.0.1:8000; an operator's key from --api-key,
QVL_API_KEY or OPENAI_API_KEY). Exit status: 0 done (status: the rollout promoted or still going), 3 status
of an aborted rollout, 1 the router refused or cannot be reached, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from typing import Any

import httpx

_ACTIONS = ("start", "status", "pause", "resume", "abort", "promote")


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    rollout = sub.add_parser(
        "rollout",
        help="Roll a new model version out by weighted canary, with automatic analysis and rollback.",
        description="Rollouts through the router's /v1/rollouts endpoints.",
    )
    actions = rollout.add_subparsers(dest="rollout_action", required=True, metavar="ACTION")
    helps = {
        "start": "Start sending a share of MODEL's traffic to --to, growing by --steps while the analysis passes.",
        "status": "Show MODEL's rollout: step, weights, last analysis, decisions (all rollouts without MODEL).",
        "pause": "Hold the rollout at its step: the analysis stops deciding.",
        "resume": "Resume a paused rollout; its step's clock starts over.",
        "abort": "Send all of MODEL's traffic back to the baseline now.",
        "promote": "Send all of MODEL's traffic to the new version now.",
    }
    for action in _ACTIONS:
        p = actions.add_parser(action, help=helps[action], description=helps[action])
        p.add_argument("model", nargs="?" if action == "status" else None, help="the public model name")
        p.add_argument("--url", default="http://127.0.0.1:8000", help="the router's base URL")
        p.add_argument(
            "--api-key", default=None, help="API key (default: $QVL_API_KEY, else $OPENAI_API_KEY, else none)"
        )
        p.add_argument("--json", action="store_true", help="print the router's JSON answer")
        p.set_defaults(standalone=run)
        if action == "start":
            p.add_argument("--to", required=True, help="the new version's label (its pool's version)")
            p.add_argument(
                "--steps",
                default=None,
                help="percent of traffic per step, ending at 100 (default router.rollout.steps)",
            )
            p.add_argument("--min-requests", type=int, default=None, help="answers of the new version per step")
            p.add_argument("--min-duration", type=float, default=None, metavar="SECONDS", help="seconds per step")
            p.add_argument(
                "--shadow", type=float, default=None, help="share of greedy requests mirrored to the new version"
            )
        if action == "status":
            p.add_argument("--watch", action="store_true", help="refresh until the rollout ends")
            p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="seconds between refreshes")


def run(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("QVL_API_KEY") or os.environ.get("OPENAI_API_KEY") or ""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=10) as client:
            if args.rollout_action == "status":
                return _status(client, args)
            body: dict[str, Any] = {"model": args.model}
            if args.rollout_action == "start":
                try:
                    steps = [float(s) for s in args.steps.split(",")] if args.steps else None
                except ValueError:
                    print("qvl: --steps must be comma-separated percentages, e.g. 1,5,25,50,100", file=sys.stderr)
                    return 2
                body |= {
                    "to": args.to,
                    "steps": steps,
                    "min_requests": args.min_requests,
                    "min_duration_s": args.min_duration,
                    "shadow": args.shadow,
                }
            state = _call(client.post(f"/v1/rollouts/{args.rollout_action}", json=body))
            print(json.dumps(state, indent=2) if args.json else _summary(state))
            return 0
    except _Refused as exc:
        print(f"qvl: the router refused: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError:
        print(f"qvl: cannot reach the router at {args.url}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


class _Refused(Exception):
    pass


def _call(answer: httpx.Response) -> Any:
    if answer.status_code >= 400:
        try:
            error = answer.json()["error"]
            raise _Refused(f"{answer.status_code} {error.get('code') or error.get('type')}: {error['message']}")
        except (ValueError, KeyError, TypeError):
            raise _Refused(f"{answer.status_code} {answer.text[:200]}") from None
    return answer.json()


def _status(client: httpx.Client, args: argparse.Namespace) -> int:
    if not args.model:
        states = _call(client.get("/v1/rollouts"))["data"]
        print(json.dumps(states, indent=2) if args.json else "\n".join(_summary(s) for s in states) or "no rollouts")
        return 0
    while True:
        state = _call(client.get(f"/v1/rollouts/{args.model}"))
        print(json.dumps(state, indent=2) if args.json else _report(state), flush=True)
        if not args.watch or state["status"] in ("promoted", "aborted"):
            return 3 if state["status"] == "aborted" else 0
        time.sleep(args.interval)


def _summary(state: dict[str, Any]) -> str:
    step = state["steps"][state["step"]]
    return (
        f"{state['model']}: {state['baseline']} -> {state['target']} {state['status']} at step {state['step'] + 1}/"
        f"{len(state['steps'])} ({step:g}%): {state['reason']}"
    )


def _report(state: dict[str, Any]) -> str:
    lines = [_summary(state)]
    route = state.get("route") or {}
    if route:
        lines.append("  route: " + ", ".join(f"{v} {w:g}" for v, w in route["versions"]))
    analysis = state.get("analysis")
    if analysis:
        lines.append(
            f"  analysis: {analysis['decision']} ({analysis['canary_requests']} answers from {state['target']}, "
            f"{analysis['baseline_requests']} from {state['baseline']})"
        )
        for check in analysis["checks"]:
            lines.append(f"    {'pass' if check['passed'] else 'FAIL'} {check['name']}: {check['detail']}")
    for event in state.get("events", [])[:10]:
        at = dt.datetime.fromtimestamp(event["at"], dt.UTC).strftime("%H:%M:%S")
        lines.append(f"  {at} {event['decision']} by {event['by']} at {event['step']:g}%: {event['reason']}")
    return "\n".join(lines)
