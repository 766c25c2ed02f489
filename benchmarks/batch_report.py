"""The batch-priority benchmark's figures and report, derived from the raw records and samples alone (so
`python -m benchmarks.batch_priority --report-only` re-makes the report from the JSON)."""

from __future__ import annotations

import bisect
from collections import Counter
from pathlib import Path
from typing import Any

from loadtests.records import percentile

TARGET_P99_RISE = 0.10
TARGET_BUSY = 0.90
TARGET_BATCH_SHARE = 0.80
TARGET_BACKOFF_S = 2.0
MAX_SEND_LAG_P99_MS = 10.0
"""A phase whose requests went out later than this (P99) measured the load machine, not the cluster: the same
validity rule as `qvl loadtest` (the machine is shared; another process can stall everything for a second)."""


def _capacity(cap: dict[str, Any]) -> dict[str, Any]:
    seconds = cap["seconds"]
    since = seconds / 4
    ended = [r for r in cap["requests"] if r[2] == 200 and since <= r[1] <= seconds]
    ttfts = [r[3] * 1000 for r in cap["requests"] if r[3] is not None and r[0] >= since]
    return {
        "rps": len(ended) / (seconds - since),
        "window_s": [since, seconds],
        "answers_in_window": len(ended),
        "refused": sum(1 for r in cap["requests"] if r[2] != 200),
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _steady(records: list[dict[str, Any]], phase: dict[str, Any], name: str, warm: float) -> dict[str, Any]:
    mine = [r for r in records if r["phase"] == name and r["class"] == "interactive" and r["at_s"] >= warm]
    ttfts = [r["ttft_ms"] for r in mine if r["ttft_ms"] is not None]
    return {
        "requests": len(mine),
        "rate_rps": len(mine) / (phase["seconds"] - warm),
        "refused_or_failed": sum(1 for r in mine if r["status"] != 200 or r["error_code"]),
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "send_lag_p99_ms": _ms(percentile([r["send_lag_ms"] for r in mine], 99)),
        "valid": (percentile([r["send_lag_ms"] for r in mine], 99) or 0.0) <= MAX_SEND_LAG_P99_MS,
    }


def _engines(samples: list[list[Any]], lo: float, hi: float, max_running: int, k: int) -> dict[str, Any]:
    """Per replica, over the samples taken in [lo, hi]: the share in which its engine ran anything, its mean
    running requests as a share of M, the share with a request waiting, and the router's batch lines."""
    window = [s for s in samples if lo <= s[0] <= hi]
    out: dict[str, Any] = {}
    for name in window[0][1] if window else []:
        rows = [s[1][name] for s in window if name in s[1]]
        n = len(rows)
        out[name] = {
            "samples": n,
            "busy_share": sum(1 for r in rows if r[0] > 0) / n,
            "mean_running": sum(r[0] for r in rows) / n,
            "slot_share": sum(r[0] for r in rows) / n / max_running,
            "waiting_share": sum(1 for r in rows if r[1] > 0) / n,
            "waiting_with_free_slot_share": sum(1 for r in rows if r[1] > 0 and r[0] < max_running) / n,
            "waiting_when_full_share": sum(1 for r in rows if r[1] > 0 and r[0] >= max_running) / n,
            "router_saw_waiting_share": sum(1 for r in rows if r[4] > 0) / n,
            "mean_batch_in_flight": sum(r[2] for r in rows) / n,
            "batch_at_k_share": sum(1 for r in rows if r[2] >= k) / n,
            "idle_slots_mean": sum(max_running - r[0] for r in rows) / n,
            "idle_slot_seconds_share_router_saw_waiting": _share(
                sum(max_running - r[0] for r in rows if r[4] > 0), sum(max_running - r[0] for r in rows)
            ),
        }
    return out


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _full_at_arrival(
    records: list[dict[str, Any]], samples: list[list[Any]], phase: dict[str, Any], name: str, warm: float, m: int
) -> dict[str, Any]:
    """Interactive requests of a phase split by whether their replica's engine ran all M slots at the sample
    just before they were sent: how many, and each group's TTFT."""
    times = [s[0] for s in samples]
    groups: dict[bool, list[float]] = {True: [], False: []}
    for r in records:
        if r["phase"] != name or r["class"] != "interactive" or r["at_s"] < warm or r["ttft_ms"] is None:
            continue
        i = bisect.bisect_right(times, phase["start"] + r["at_s"]) - 1
        engine = samples[i][1].get(r.get("replica") or "") if i >= 0 else None
        if engine is not None:
            groups[engine[0] >= m].append(r["ttft_ms"])
    total = len(groups[True]) + len(groups[False])
    return {
        "share_sent_to_full_engine": _share(len(groups[True]), total),
        "full": {"p50_ms": _ms(percentile(groups[True], 50)), "p99_ms": _ms(percentile(groups[True], 99))},
        "not_full": {"p50_ms": _ms(percentile(groups[False], 50)), "p99_ms": _ms(percentile(groups[False], 99))},
    }


def _batch_rate(samples: list[list[Any]], lo: float, hi: float) -> float | None:
    window = [s for s in samples if lo <= s[0] <= hi]
    if len(window) < 2:
        return None
    return float((window[-1][2] - window[0][2]) / (window[-1][0] - window[0][0]))


def _backoff(samples: list[list[Any]], jump: dict[str, Any]) -> dict[str, Any]:
    start, end = jump["start"], jump["start"] + jump["seconds"]
    before = [s for s in samples if start - 2.0 <= s[0] < start]
    after = [s for s in samples if start <= s[0] <= end]

    def top(s: list[Any]) -> float:
        return float(max(v[2] for v in s[1].values()))

    first = next((s for s in after if top(s) <= 1), None)
    backoff = None if first is None else round(first[0] - start, 3)
    held = [s for s in after if first is not None and s[0] >= first[0]]
    return {
        "backoff_s": backoff,
        "batch_in_flight_before": {
            name: round(sum(s[1][name][2] for s in before) / len(before), 2)
            for name in (before[0][1] if before else [])
        },
        "share_of_later_samples_at_most_1": (sum(1 for s in held if top(s) <= 1) / len(held)) if held else None,
        "max_batch_in_flight_after_backoff": max((top(s) for s in held), default=None),
    }


def _statuses(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """Per phase and class: answers by status (200 with an error event counts as its error code)."""
    out: dict[str, dict[str, Counter[str]]] = {}
    for r in records:
        key = f"{r['status']} {r['error_code']}" if r["error_code"] else str(r["status"])
        out.setdefault(r["phase"], {}).setdefault(r["class"], Counter())[key] += 1
    return {p: {k: dict(c) for k, c in by.items()} for p, by in out.items()}


def _decisions(doc: dict[str, Any], start: str, end: str) -> dict[str, float]:
    a, b = doc["counters"].get(start, {}).get("router", {}), doc["counters"].get(end, {}).get("router", {})
    out = {}
    for series, value in b.items():
        if series.startswith("qvl_admission_decisions_total"):
            labels = series.split("{", 1)[1].rstrip("}")
            delta = value - a.get(series, 0.0)
            if delta:
                out[labels.replace('"', "")] = delta
    return out


SPANS = {
    "no_batch": ("no_batch_start", "no_batch_end"),
    "with_batch": ("with_batch_start", "jump_start"),
    "jump": ("jump_start", "jump_end"),
    "control": ("control_start", "control_end"),
}


def _work(doc: dict[str, Any], start: str, end: str, tokens: int) -> dict[str, Any]:
    """Per engine, between two counter snapshots: tokens generated per second, requests finished and
    aborted, the share of generated tokens no finished request kept (aborted work), and the share of
    inter-token gaps above 50 and 100 ms (steps made long by prefills)."""
    a, b = doc["counters"].get(start), doc["counters"].get(end)
    if a is None or b is None:
        return {}
    seconds = b["t"] - a["t"]
    out = {}
    for name, page in b["sims"].items():
        before = a["sims"][name]

        def delta(series: str, page: dict[str, float] = page, before: dict[str, float] = before) -> float:
            return sum(v - before.get(k, 0.0) for k, v in page.items() if k.startswith(series))

        generated = delta("vllm:generation_tokens_total")
        finished = delta('vllm:request_success_total{finished_reason="length"') + delta(
            'vllm:request_success_total{finished_reason="stop"'
        )
        gaps = delta('vllm:inter_token_latency_seconds_bucket{le="+Inf"')
        out[name] = {
            "generated_tokens_per_s": generated / seconds,
            "finished": finished,
            "aborted": delta('vllm:request_success_total{finished_reason="abort"'),
            "aborted_work_share": 1 - finished * tokens / generated if generated else None,
            "gaps_over_50ms": 1 - delta('vllm:inter_token_latency_seconds_bucket{le="0.05"') / gaps if gaps else None,
            "gaps_over_100ms": 1 - delta('vllm:inter_token_latency_seconds_bucket{le="0.1"') / gaps if gaps else None,
        }
    return out


def _cpu(doc: dict[str, Any], start: str, end: str) -> dict[str, float]:
    """Cores each process used on average between two snapshots, and the whole machine's busy cores."""
    a, b = doc["counters"].get(start), doc["counters"].get(end)
    if a is None or b is None or "cpu" not in a:
        return {}
    seconds = b["t"] - a["t"]
    return {name: round((b["cpu"][name] - a["cpu"][name]) / seconds, 2) for name in b["cpu"]}


def derive(doc: dict[str, Any], partial: bool = False) -> dict[str, Any]:
    """Every figure of the report; `partial`: the capacity alone (while the run goes on)."""
    figures: dict[str, Any] = {"capacity": _capacity(doc["capacity"])}
    if partial:
        return figures
    capacity = figures["capacity"]["rps"]
    warm = doc["phase_settings"]["warm_s"]
    max_running = doc["settings"]["sim"]["max_running"]
    k = doc["settings"]["router"]["batch"]["in_flight_per_replica"]
    records = [dict(zip(doc["records_fields"], row, strict=True)) for row in doc["records"]]
    samples = doc["samples"]
    for name in ("no_batch", "with_batch", "control"):
        if name not in doc["phases"]:
            continue
        phase = doc["phases"][name]
        lo, hi = phase["start"] + warm, phase["start"] + phase["seconds"]
        figures[name] = {
            **_steady(records, phase, name, warm),
            "engines": _engines(samples, lo, hi, max_running, k),
            "by_engine_state": _full_at_arrival(records, samples, phase, name, warm, max_running),
        }
    # The baseline: every valid phase without a batch (the first, and the control run last), pooled.
    base = [n for n in ("no_batch", "control") if n in figures and figures[n]["valid"]]
    pooled = [
        r["ttft_ms"]
        for r in records
        if r["phase"] in base and r["class"] == "interactive" and r["at_s"] >= warm and r["ttft_ms"] is not None
    ]
    figures["baseline"] = {
        "phases": base,
        "ttft_p50_ms": _ms(percentile(pooled, 50)),
        "ttft_p99_ms": _ms(percentile(pooled, 99)),
    }
    with_batch = figures["with_batch"]
    phase = doc["phases"]["with_batch"]
    batch_rps = _batch_rate(samples, phase["start"] + warm, phase["start"] + phase["seconds"])
    left_over = capacity - with_batch["rate_rps"]
    figures["batch"] = {
        "rate_rps": batch_rps,
        "tokens_per_s": None if batch_rps is None else batch_rps * doc["settings"]["request"]["max_tokens"],
        "left_over_rps": left_over,
        "share_of_left_over": None if batch_rps is None or left_over <= 0 else batch_rps / left_over,
    }
    jump = doc["phases"]["jump"]
    jumped = [r for r in records if r["phase"] == "jump" and r["class"] == "interactive"]
    ttfts = [r["ttft_ms"] for r in jumped if r["ttft_ms"] is not None]
    figures["jump"] = {
        **_backoff(samples, jump),
        "interactive_requests": len(jumped),
        "interactive_ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "interactive_ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "engines": _engines(samples, jump["start"], jump["start"] + jump["seconds"], max_running, k),
    }
    tokens = doc["settings"]["request"]["max_tokens"]
    figures["work"] = {phase: _work(doc, a, b, tokens) for phase, (a, b) in SPANS.items()}
    figures["cpu"] = {phase: _cpu(doc, a, b) for phase, (a, b) in SPANS.items()}
    figures["statuses"] = _statuses(records)
    figures["decisions"] = {
        "no_batch": _decisions(doc, "no_batch_start", "no_batch_end"),
        "with_batch": _decisions(doc, "with_batch_start", "jump_start"),
        "jump": _decisions(doc, "jump_start", "jump_end"),
    }
    jump_failed = sum(
        n for status, n in figures["statuses"].get("jump", {}).get("interactive", {}).items() if status != "200"
    )
    figures["targets"] = _targets(figures, jump_failed)
    return figures


def _targets(f: dict[str, Any], jump_failed: int) -> list[dict[str, Any]]:
    a, b = f["baseline"]["ttft_p99_ms"], f["with_batch"]["ttft_p99_ms"]
    rise: float | str | None = None if not a or b is None else b / a - 1
    if not f["with_batch"]["valid"] or not f["baseline"]["phases"]:
        rise = "INVALID (send lag)"
    busy = min((e["busy_share"] for e in f["with_batch"]["engines"].values()), default=None)
    share = f["batch"]["share_of_left_over"]
    backoff = f["jump"]["backoff_s"]
    shed_classes = sorted(
        {k for by in f["statuses"].values() for k, st in by.items() if any(s[:3] in ("429", "503") for s in st)}
        | {d.split(",")[0].split("=")[1] for ph in f["decisions"].values() for d in ph if not d.endswith("=admitted")}
    )
    rows = [
        (
            "interactive P99 TTFT rise with the batch (against the valid no-batch phases, pooled)",
            f"< {TARGET_P99_RISE:.0%}",
            rise,
            isinstance(rise, float) and rise < TARGET_P99_RISE,
            "ratio",
        ),
        (
            "least busy engine's share of time running > 0 (with the batch)",
            f"> {TARGET_BUSY:.0%}",
            busy,
            busy is not None and busy > TARGET_BUSY,
            "ratio",
        ),
        (
            "batch rate / left-over capacity",
            f">= {TARGET_BATCH_SHARE:.0%}",
            share,
            share is not None and share >= TARGET_BATCH_SHARE,
            "ratio",
        ),
        (
            "time from the jump to qvl_batch_in_flight <= 1 on every replica",
            f"<= {TARGET_BACKOFF_S:g} s",
            backoff,
            backoff is not None and backoff <= TARGET_BACKOFF_S,
            "s",
        ),
        (
            "interactive requests without a 200 in the jump phase",
            "0",
            jump_failed,
            jump_failed == 0,
            "count",
        ),
        (
            "classes ever refused with 429/503 (any phase), or batch lines taken back",
            "flex, batch only",
            ", ".join(shed_classes) or "none",
            "interactive" not in shed_classes,
            "text",
        ),
    ]
    return [{"name": n, "target": t, "measured": m, "pass": p, "unit": u} for n, t, m, p, u in rows]


def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if unit == "ratio":
        return f"{value:.1%}"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:g} ms"
    return str(value)


def write_report(doc: dict[str, Any], path: Path) -> None:
    f = derive(doc)
    s = doc["settings"]
    cap = f["capacity"]
    lines = [
        "# Batch jobs on spare capacity",
        "",
        f"{doc['when']}, {doc['machine']['cpus']} CPUs (shared), run time {doc['run_seconds']:.0f} s. "
        f"{s['replicas']} `qvl sim` replicas (M = {s['sim']['max_running']} running, priority scheduling, step "
        f"{s['sim']['step_base_ms']} ms + {s['sim']['per_decode_ms']} ms/decode, prefill "
        f"{s['sim']['prefill_base_ms']} ms + {s['sim']['per_text_token_ms']} ms/token), one `qvl router` "
        f"(K = {s['router']['batch']['in_flight_per_replica']} batch lines per replica, scrape every "
        f"{s['router']['load_scrape_interval_s']} s, "
        + "".join(f"batch.{k} {v}, " for k, v in s["router"]["batch"].items() if k != "in_flight_per_replica")
        + f"the rest the router's defaults at commit {doc.get('code', {}).get('commit', '?')[:7]}). "
        f"Every request: 50 prompt tokens, {s['request']['max_tokens']} output tokens; interactive and flex "
        "streamed, batch lines not.",
        "",
        f"**Capacity** C = **{cap['rps']:.1f} requests/s** ({doc['capacity']['clients']} closed-loop clients, "
        f"{cap['answers_in_window']} answers in {cap['window_s'][1] - cap['window_s'][0]:.0f} s; TTFT at "
        f"saturation p50 {cap['ttft_p50_ms']:.0f} ms, p99 {cap['ttft_p99_ms']:.0f} ms).",
        "",
        "## Targets",
        "",
        "| target | bound | measured | result |",
        "|---|---|---:|:---:|",
    ]
    for t in f["targets"]:
        measured = f"{t['measured']:+.1%}" if "rise" in t["name"] and isinstance(t["measured"], float) else None
        lines.append(
            f"| {t['name']} | {t['target']} | {measured or _fmt(t['measured'], t['unit'])} | "
            f"{'PASS' if t['pass'] else 'FAIL'} |"
        )
    lines += [
        "",
        "## Interactive traffic at 60 % of C, without and with the batch",
        "",
        "The same Poisson schedule in each phase (control: last, after the batch was cancelled and its lines had "
        f"ended); figures after each phase's first {doc['phase_settings']['warm_s']:g} s.",
        "",
        "| phase | requests | rate/s | TTFT p50 ms | TTFT p99 ms | refused | send lag p99 ms | valid |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for name in ("no_batch", "with_batch", "control"):
        if name not in f:
            continue
        p = f[name]
        lines.append(
            f"| {name.replace('_', ' ')} | {p['requests']} | {p['rate_rps']:.1f} | {p['ttft_p50_ms']} | "
            f"{p['ttft_p99_ms']} | {p['refused_or_failed']} | {p['send_lag_p99_ms']} | "
            f"{'yes' if p['valid'] else 'INVALID'} |"
        )
    base, wb = f["baseline"], f["with_batch"]
    if base["ttft_p99_ms"] and base["ttft_p50_ms"] and wb["ttft_p50_ms"] and wb["ttft_p99_ms"]:
        lines += [
            "",
            f"Baseline (valid phases without a batch, pooled: {', '.join(base['phases'])}): TTFT p50 "
            f"{base['ttft_p50_ms']} ms, p99 {base['ttft_p99_ms']} ms. With the batch: p50 "
            f"{wb['ttft_p50_ms'] / base['ttft_p50_ms'] - 1:+.1%}, "
            f"p99 {wb['ttft_p99_ms'] / base['ttft_p99_ms'] - 1:+.1%}.",
        ]
    for name in ("no_batch", "control"):
        if name in f and not f[name]["valid"]:
            lines.append(
                f"The {name.replace('_', ' ')} phase is INVALID: its requests went out late (send lag p99 "
                f"{f[name]['send_lag_p99_ms']} ms > {MAX_SEND_LAG_P99_MS:g} ms), the load machine stalled; it is "
                "left out of the baseline."
            )
    if "control" in f and f["no_batch"]["valid"] and f["control"]["valid"]:
        a, c = f["no_batch"]["ttft_p99_ms"], f["control"]["ttft_p99_ms"]
        lines.append(f"The two runs without a batch differ by {c / a - 1:+.1%} in p99 (control against the first).")
    b = f["batch"]
    rate = "-" if b["rate_rps"] is None else f"{b['rate_rps']:.1f}"
    lines += [
        "",
        f"Batch: {rate} lines/s over the window ({(b['tokens_per_s'] or 0):.0f} tokens/s), left-over capacity "
        f"{b['left_over_rps']:.1f} requests/s (C minus the interactive rate).",
        "",
        "Engines (sampled every "
        f"{doc['sample_s']} s from each simulator's own gauges; `router saw waiting`: the router's last scrape):",
        "",
        "| phase | replica | busy (running > 0) | mean running | of M | idle slots | waiting > 0 | waiting, all M "
        "running | waiting, slot free | router saw waiting | idle slots while router saw waiting | batch in flight "
        "| batch at K |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("no_batch", "with_batch", "jump", "control"):
        for replica, e in f.get(name, {}).get("engines", {}).items():
            lines.append(
                f"| {name.replace('_', ' ')} | {replica} | {e['busy_share']:.1%} | {e['mean_running']:.1f} | "
                f"{e['slot_share']:.0%} | {e['idle_slots_mean']:.1f} | {e['waiting_share']:.1%} | "
                f"{e['waiting_when_full_share']:.1%} | {e['waiting_with_free_slot_share']:.1%} | "
                f"{e['router_saw_waiting_share']:.1%} | "
                f"{_fmt(e['idle_slot_seconds_share_router_saw_waiting'], 'ratio')} | "
                f"{e['mean_batch_in_flight']:.2f} | {e['batch_at_k_share']:.1%} |"
            )
    lines += ["", "Interactive requests by the state of their engine when sent (the sample just before):", ""]
    for name in ("no_batch", "with_batch", "control"):
        if name not in f:
            continue
        st = f[name]["by_engine_state"]
        lines.append(
            f"- {name.replace('_', ' ')}: {_fmt(st['share_sent_to_full_engine'], 'ratio')} sent to an engine running "
            f"all M (TTFT p50 {_fmt(st['full']['p50_ms'], 'ms')} / p99 {_fmt(st['full']['p99_ms'], 'ms')}); the "
            f"others p50 {_fmt(st['not_full']['p50_ms'], 'ms')} / p99 {_fmt(st['not_full']['p99_ms'], 'ms')}"
        )
    lines += [
        "",
        f"CPU cores in use ({doc['machine']['cpus']} on the machine; machine busy counts every process on it, "
        "other work included):",
        "",
    ]
    for phase, cores in f["cpu"].items():
        text = ", ".join(f"{name} {value:.2f}" for name, value in cores.items())
        lines.append(f"- {phase.replace('_', ' ')}: {text}")
    j = f["jump"]
    lines += [
        "",
        "## The jump to 100 % of C (plus flex) with the batch running",
        "",
        f"- the jump started {doc['phases']['jump'].get('bridge_s', 0):.1f} s after the batch phase's schedule "
        f"(steady traffic went on until every replica had {doc['phase_settings'].get('jump_when', '-')} batch lines "
        f"in flight); batch lines in flight per replica in the 2 s before it: {j['batch_in_flight_before']}",
        f"- time until every replica had at most 1: {_fmt(j['backoff_s'], 's')}; afterwards "
        f"{_fmt(j['share_of_later_samples_at_most_1'], 'ratio')} of the samples stayed at <= 1 "
        f"(max {j['max_batch_in_flight_after_backoff']})",
        f"- interactive: {j['interactive_requests']} requests, TTFT p50 {j['interactive_ttft_p50_ms']} ms, "
        f"p99 {j['interactive_ttft_p99_ms']} ms",
        "",
        "| phase | class | answers by status |",
        "|---|---|---|",
    ]
    for phase, by in f["statuses"].items():
        for klass, counts in sorted(by.items()):
            text = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
            lines.append(f"| {phase} | {klass} | {text} |")
    lines += ["", "Router admission decisions (qvl_admission_decisions_total, change over the phase):", ""]
    for phase, decisions in f["decisions"].items():
        text = ", ".join(f"{k}: {v:g}" for k, v in sorted(decisions.items())) or "none"
        lines.append(f"- {phase.replace('_', ' ')}: {text}")
    lines += ["", NOTES]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


NOTES = """\
## Notes on the committed run (2026-11-29 16:50 UTC; the router's batch code of commit b4c69fb)

- **What changed since the 13:30 run** (P99 +26.0 %, share 57.9 %, 430 lines taken back): a new setting
  `router.batch.quiet_after_interactive_s` (50 ms). No new batch line goes to a replica that soon after an
  interactive request was sent there, so a batch prefill rarely shares the engine step that prefills an
  interactive request. P99 rise +14.5 % at a share of 54.0 %; 109 lines taken back.
- **What holds.** The jump: every replica was at most one batch line 0.51 s after interactive load went
  to 100 % of C, from 4.2 and 2.1 lines, and 99.3 % of later samples stayed there. All 1,402 interactive
  requests of the jump got a 200; flex was shed (109 of 128 got 429 `flex_shed`); nothing else was
  refused. "Busy" holds trivially: 7.8 of 16 slots run without a batch; slot use is 49 % without the
  batch and 76 % with it.
- **P99 TTFT +14.5 % (73.8 -> 84.5 ms) and a batch share of 54.0 % (9.9 lines/s of 18.3): both missed.
  On this engine even a perfect router of the kinds studied cannot meet both.** `benchmarks/batch_frontier.py`
  (`batch_frontier.md`) runs the same engine core in virtual time. In the router's place is an oracle that
  sees each engine exactly and takes lines back at no delay. It sweeps every fill level from 8 to 16 under
  three policies: make room; make room, paced (as the quiet rule does); and no make room. The model
  matches this run: C is within 1.0 %; the no-batch P99, plus the fixed 3.3 ms of router and network, is
  within 4.2 %.
  - None of the 27 policies meets both targets.
  - The largest share with the P99 rise under 10 % is 51.8 % (paced, F = 10).
  - An 80 % share costs at least +24.4 %.
  - Cause: every batch line costs a 13 ms prefill, as long as a decode step. A fuller engine makes more
    interactive arrivals find all 16 slots taken, which costs an aborted line or a wait.
  - A 2 ms prefill does not change the verdict: 69.9 % under 10 %, and +85.9 % at 80 %.
  - The router measured here lies between the perfect router's paced curve (+8.2 % at 51.8 %) and its
    unpaced one (+17.8 % at 53.2 %).
"""
