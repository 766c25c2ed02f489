"""The report of benchmarks/rollout_canary.py: every figure derived from the run's JSON (its raw records and
the rollouts' states), the markdown tables and the plot. `python -m benchmarks.rollout_canary --report-only`
re-makes them from the JSON."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import MODEL
from loadtests.records import percentile
from router.routes import Route, assign

TARGETS = {"split_pp": 2.0, "abort_s": 90.0, "canary_share_pct": 1.0}
ENDED = ("promoted", "aborted")


def _end(state: dict[str, Any]) -> dict[str, Any]:
    """The event that ended a rollout (events are newest first)."""
    return next(e for e in state["events"] if e["status"] in ENDED)


def _share(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 3) if whole else None


def _interval(part: int, whole: int) -> list[float] | None:
    """A 95 % Wilson interval of the share part/whole, in percent."""
    if not whole:
        return None
    z, p = 1.96, part / whole
    centre = (p + z * z / (2 * whole)) / (1 + z * z / whole)
    half = z * math.sqrt(p * (1 - p) / whole + z * z / (4 * whole * whole)) / (1 + z * z / whole)
    return [round(100 * (centre - half), 3), round(100 * (centre + half), 3)]


def derive(doc: dict[str, Any]) -> dict[str, Any]:
    """Every figure of the report, from the raw records and the rollouts' states."""
    out: dict[str, Any] = {"split": [], "cases": {}, "aa": {}}
    for run_ in doc["split"]:
        route = Route(MODEL, tuple(run_["weights"].items()))
        counts = Counter(v for _, v in run_["answers"])
        n = len(run_["answers"])
        shares = {v: _share(counts[v], n) for v in run_["weights"]}
        off = max(abs((shares[v] or 0.0) - route.weight_of(v)) for v in run_["weights"])
        unlike = sum(1 for s, v in run_["answers"] if v != assign(route, b"s\x1f" + s.encode()))
        seen = [set(seq.split()) for _, seq in run_["sessions"]]
        out["split"].append(
            {
                "weights": run_["weights"],
                "requests": n,
                "failed": sum(c for v, c in counts.items() if v.startswith("!")),
                "shares_pct": shares,
                "max_off_pp": round(off, 3),
                "unlike_assign": unlike,
                "sessions": len(seen),
                "turns": len(run_["sessions"][0][1].split()) if seen else 0,
                "mixed_sessions": sum(1 for s in seen if len(s) > 1),
                "failed_turns": sum(1 for s in seen for v in s if v.startswith("!")),
            }
        )
    rows = [dict(zip(doc["records_fields"], r, strict=True)) for r in doc["records"]]
    for case, info in doc["cases"].items():
        state = info["state"]
        start, end = state["started"], _end(state)
        mine = [r for r in rows if r["phase"] == case]
        during = [r for r in mine if start <= r["at_unix"] < end["at"]]
        after = [r for r in mine if r["at_unix"] >= end["at"] + 1.0]  # every router re-read the route by then
        ttft = {
            v: percentile([r["ttft_ms"] for r in during if r["version"] == v and r["ttft_ms"]], 95)
            for v in ("v1", "v2")
        }
        canary = sum(1 for r in during if r["version"] == "v2")
        out["cases"][case] = {
            "status": state["status"],
            "by": end["by"],
            "reason": state["reason"],
            "seconds_to_end": round(end["at"] - start, 2),
            "step_at_end": end["step"],
            "requests_during": len(during),
            "canary_answers": canary,
            "canary_failed": sum(1 for r in during if r["version"] == "v2" and r["failed"]),
            "failed": sum(1 for r in during if r["failed"]),
            "canary_share_pct": _share(canary, len(during)),
            "canary_share_ci95_pct": _interval(canary, len(during)),
            "canary_failed_share_pct": _share(
                sum(1 for r in during if r["version"] == "v2" and r["failed"]), len(during)
            ),
            "canary_after_end": sum(1 for r in after if r["version"] == "v2"),
            "requests_after_end": len(after),
            "p95_ttft_ms_during": ttft,
            "p99_send_lag_ms": percentile([r["send_lag_ms"] for r in mine], 99),
            **{k: info[k] for k in ("baseline_p95_ttft_ms", "added_ttft_ms", "fault_error_ratio") if k in info},
        }
    runs = []
    for state in doc["aa"]:
        end = _end(state)
        runs.append(
            {
                "to": state["target"],
                "status": state["status"],
                "by": end["by"],
                "seconds": round(end["at"] - state["started"], 2),
                "reason": state["reason"],
            }
        )
    promoted = [r["seconds"] for r in runs if r["status"] == "promoted"]
    aa_rows = [r for r in rows if r["phase"] == "aa"]
    out["aa"] = {
        "rollouts": runs,
        "false_aborts": sum(1 for r in runs if r["status"] == "aborted"),
        "promotion_s": {q: percentile(promoted, p) for q, p in (("min", 0), ("p50", 50), ("max", 100))},
        "failed_requests": sum(1 for r in aa_rows if r["failed"]),
        "requests": len(aa_rows),
        "p99_send_lag_ms": percentile([r["send_lag_ms"] for r in aa_rows], 99),
    }
    return out


def _yes(ok: bool) -> str:
    return "met" if ok else "**missed**"


def markdown(doc: dict[str, Any], figures: dict[str, Any]) -> str:
    s, code = doc["settings"], doc.get("code", {})
    lines = [
        "# Rollouts: split, stickiness, injected regressions, A/A",
        "",
        f"{'Quick run' if s['quick'] else 'Full run'} of `python -m benchmarks.rollout_canary`, {doc['when']}, "
        f"{doc['machine']['cpus']} CPUs, Python {doc['machine']['python']}, {doc['run_seconds']:.0f} s. "
        f"One simulated replica per version ({', '.join(f'{k} {v:g}' for k, v in s['sim'].items())}), "
        f"real `qvl router`s, rollout state in Redis; router.rollout settings: "
        f"{', '.join(f'{k} {v}' for k, v in s['rollout'].items()) or 'the defaults'}.",
        "",
        f"Code: commit {str(code.get('commit', '?'))[:12]}"
        + (", with uncommitted changes in router/, serving/ or qvl/." if code.get("uncommitted") else "."),
        "",
        "## 1. Split and stickiness (static route, zero-delay replicas)",
        "",
        "| route | requests | share v1 % | share v2 % | max off (pp) | unlike `assign` | failed "
        "| sessions x turns | sessions on >1 version | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in figures["split"]:
        ok = r["max_off_pp"] <= TARGETS["split_pp"] and r["mixed_sessions"] == 0
        lines.append(
            f"| {' / '.join(f'{v} {w:g}' for v, w in r['weights'].items())} | {r['requests']} | "
            f"{r['shares_pct']['v1']:.2f} | {r['shares_pct']['v2']:.2f} | {r['max_off_pp']:.2f} | "
            f"{r['unlike_assign']} | "
            f"{r['failed'] + r['failed_turns']} | {r['sessions']} x {r['turns']} | {r['mixed_sessions']} | {_yes(ok)} |"
        )
    lines += [
        "",
        f"Targets: each share within {TARGETS['split_pp']:g} points of its weight; "
        "no session on more than one version.",
        "",
        f"## 2. Injected regressions (open loop, {s['rate']:g} requests/s, steps "
        f"{','.join(f'{x:g}' for x in s['regression']['steps'])}, min_requests {s['regression']['min_requests']}, "
        f"min_duration_s {s['regression']['min_duration_s']:g})",
        "",
        "| case | canary fault | end | by | start to end (s) | step | requests during | v2 answered "
        "| v2 share % (95 % interval) | v2 failed share % | v2 after the end | abort <= 90 s | v2 share <= 1 % |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for case, c in figures["cases"].items():
        fault = (
            f"{100 * c['fault_error_ratio']:g} % 500s"
            if case == "errors"
            else f"+{c['added_ttft_ms']:g} ms TTFT (v1 P95 {c['baseline_p95_ttft_ms']:.1f} ms)"
        )
        ci = "-".join(f"{x:.2f}" for x in c["canary_share_ci95_pct"] or [])
        quick = c["status"] == "aborted" and c["seconds_to_end"] <= TARGETS["abort_s"]
        small = (c["canary_share_pct"] or 0) <= TARGETS["canary_share_pct"]
        lines.append(
            f"| {case} | {fault} | {c['status']} | {c['by']} | {c['seconds_to_end']:.1f} | {c['step_at_end']:g} % | "
            f"{c['requests_during']} | {c['canary_answers']} | {c['canary_share_pct']:.2f} ({ci}) | "
            f"{c['canary_failed_share_pct']:.3f} | {c['canary_after_end']} of {c['requests_after_end']} | "
            f"{_yes(quick)} | {_yes(small)} |"
        )
    lines += [
        "",
        f"Targets: aborted within {TARGETS['abort_s']:g} s of the start; v2 answered at most "
        f"{TARGETS['canary_share_pct']:g} % of all requests sent during the rollout. At the first step v2 gets "
        f"{s['regression']['steps'][0]:g} % of the sessions (each request here is its own session), so while a "
        "rollout stays there its measured share scatters around that by chance (the interval): a first step of 1 % "
        "would meet the target only in expectation, hence the lower first step. The failed share is what clients "
        "lost; `v2 after the end` counts v2's answers to requests sent from 1 s after the abort on.",
        "",
    ]
    for case, c in figures["cases"].items():
        p95 = ", ".join(f"{v} {x:.1f} ms" for v, x in c["p95_ttft_ms_during"].items() if x is not None)
        lines.append(
            f"- {case}: {c['reason']} (client P95 TTFT during the rollout: {p95}; "
            f"P99 send lag {c['p99_send_lag_ms']:.1f} ms)"
        )
    a = figures["aa"]
    p = a["promotion_s"]
    lines += [
        "",
        f"## 3. A/A: {len(a['rollouts'])} rollouts between identical versions "
        f"(steps {','.join(f'{x:g}' for x in s['aa']['steps'])}, "
        f"min_requests {s['aa']['min_requests']}, min_duration_s {s['aa']['min_duration_s']:g})",
        "",
        f"False aborts: {a['false_aborts']} of {len(a['rollouts'])} (target 0: {_yes(a['false_aborts'] == 0)}). "
        + (
            f"Seconds to promotion: min {p['min']:.1f}, median {p['p50']:.1f}, max {p['max']:.1f}. "
            if p["max"] is not None
            else ""
        )
        + f"Failed requests: {a['failed_requests']} of {a['requests']}; P99 send lag {a['p99_send_lag_ms']:.1f} ms.",
        "",
        "| # | to | end | by | seconds | reason |",
        "|---:|---|---|---|---:|---|",
    ]
    lines += [
        f"| {i + 1} | {r['to']} | {r['status']} | {r['by']} | {r['seconds']:.1f} | {r['reason']} |"
        for i, r in enumerate(a["rollouts"])
    ]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], figures: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    rows = [dict(zip(doc["records_fields"], r, strict=True)) for r in doc["records"]]
    for ax, (case, info) in zip(axes, doc["cases"].items(), strict=False):
        state, start = info["state"], info["state"]["started"]
        mine = [r for r in rows if r["phase"] == case]
        bins: dict[int, Counter[str]] = {}
        for r in mine:
            bins.setdefault(int(r["at_unix"] - start), Counter())[r["version"]] += 1
        xs = sorted(bins)
        ax.plot(
            xs,
            [100 * bins[x]["v2"] / sum(bins[x].values()) for x in xs],
            lw=0.8,
            label="v2's share of answers, per second",
        )
        steps, weight, t = [], [], []
        for e in reversed(state["events"]):
            t.append(e["at"] - start)
            weight.append(0.0 if e["status"] == "aborted" else 100.0 if e["status"] == "promoted" else e["step"])
        steps = [*t, max(xs) if xs else t[-1]]
        ax.step(steps, [*weight, weight[-1]], where="post", color="black", label="v2's weight in the route")
        end = _end(state)
        ax.axvline(end["at"] - start, color="red", ls="--", label=f"{end['decision']} at {end['at'] - start:.0f} s")
        ax.set_title(f"case {case}")
        ax.set_xlabel("seconds since the rollout's start")
        ax.set_ylabel("%")
        ax.set_ylim(0, max(10.0, *weight) + 2)
        ax.legend(fontsize=7)
    runs = figures["aa"]["rollouts"]
    colors = ["tab:green" if r["status"] == "promoted" else "tab:red" for r in runs]
    axes[2].bar(range(1, len(runs) + 1), [r["seconds"] for r in runs], color=colors)
    axes[2].set_title(f"A/A: seconds to the end ({figures['aa']['false_aborts']} aborted, red)")
    axes[2].set_xlabel("rollout")
    axes[2].set_ylabel("s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def dump(doc: dict[str, Any]) -> str:
    """Pretty JSON with each raw record on one line of its own."""
    head = {k: v for k, v in doc.items() if k != "records"}
    body = ",\n".join("    " + json.dumps(r, separators=(",", ":")) for r in doc["records"])
    return json.dumps(head, indent=2)[:-2] + f',\n  "records": [\n{body}\n  ]\n}}\n'


def write_report(doc: dict[str, Any], path: Path) -> None:
    figures = derive(doc)
    path.with_suffix(".md").write_text(markdown(doc, figures))
    plot(doc, figures, path.with_suffix(".png"))
