"""`qvl loadtest`: one headless locust run of a workload against a router, leaving a run folder.

Steps: check the target answers and every tenant has its key; write the workload as run (rate and
duration applied) and run.json; print the workload and its expected cache hit ratios; start the scraper
(loadtests/scrape.py); start headless locust (one process, or a master and N local workers); show a
progress line until locust ends; then summarise the merged records (loadtests/summary.py) into
summary.json and print the verdict.

Exit status: 0 valid (and the SLO held, when given); 3 INVALID, the generator fell behind; 4 the SLO
was missed; 1 the run could not be made (target unreachable, locust failed, no request recorded); 2 bad
arguments or workload.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

import loadtests
from loadtests import runfolder as rf
from loadtests.arrivals import duration_s as schedule_length
from loadtests.arrivals import expected_count, max_rate
from loadtests.popularity import RoutingPolicy, describe, engine_hit_ratio_by_policy, expected_hit_ratios
from loadtests.progress import Progress
from loadtests.records import DEFAULT_MAX_SEND_LAG_MS
from loadtests.schedule import api_key, build_schedule
from loadtests.scrape import DEFAULT_INTERVAL_S, Scraper, discover
from loadtests.slo import Objective
from loadtests.summary import RunSummary, summarise_run
from loadtests.workload import ClosedLoop, Constant, Gamma, Poisson, Workload

LOCUSTFILE = Path(loadtests.__file__).resolve().parent / "locustfile.py"
INVALID, SLO_MISSED, FAILED, USAGE = 3, 4, 1, 2
MAX_DEFAULT_USERS = 1024


class LoadtestError(Exception):
    """The run could not be made; the message says why. `code` is the exit status."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LoadtestOptions:
    """One run, as `qvl loadtest` flags give it."""

    workload: Workload
    workload_file: str
    target: str
    out: Path
    users: int | None = None
    """Requests that may be in flight at once (open loop) or users (closed loop); None: from the rate."""
    processes: int = 1
    objectives: tuple[Objective, ...] = ()
    slo_text: str | None = None
    max_send_lag_ms: float = DEFAULT_MAX_SEND_LAG_MS
    drain_s: float = 120.0
    """How long answers may still arrive after the schedule's last send."""
    run_time_s: float | None = None
    """A closed loop's time limit (it otherwise ends when its requests are done)."""
    scrape_interval_s: float = DEFAULT_INTERVAL_S
    model: str | None = None
    label: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
    """More facts for run.json (a sweep's level, the policy under test)."""


def default_users(workload: Workload) -> int:
    """In-flight slots for an open-loop workload: four seconds of the peak rate (answers of a few seconds
    at the peak still find a free user), at least 16, at most 1024; a closed loop's own user count."""
    arrivals = workload.arrivals
    if isinstance(arrivals, ClosedLoop):
        return arrivals.users
    peak = arrivals.rate if isinstance(arrivals, Constant | Poisson | Gamma) else max_rate(arrivals)
    return min(MAX_DEFAULT_USERS, max(16, math.ceil(peak * 4)))


def run_loadtest(options: LoadtestOptions, say: Callable[[str], None]) -> RunSummary:
    """Make one run into `options.out`; returns its summary. Raises LoadtestError when it cannot be made."""
    workload = options.workload
    keys = _keys(workload)
    target = options.target.rstrip("/")
    _check_target(target, next(iter(keys.values())))
    out = options.out
    if out.exists() and any(out.iterdir()):
        raise LoadtestError(f"{out} exists and is not empty: give a new --out folder", USAGE)
    out.mkdir(parents=True, exist_ok=True)
    folder = rf.RunFolder(out)

    plans = build_schedule(workload)
    users = options.users or default_users(workload)
    if isinstance(workload.arrivals, ClosedLoop) and options.users:
        workload = workload.model_copy(update={"arrivals": workload.arrivals.model_copy(update={"users": users})})
    folder.file(rf.WORKLOAD).write_text(yaml.safe_dump(workload.model_dump(exclude_none=True), sort_keys=False))
    length = schedule_length(workload.arrivals)
    say(describe(workload, len(plans)))
    cluster = discover(target, next(iter(keys.values())))
    if cluster.warning:
        say(f"warning: {cluster.warning}")
    predicted = expected_hit_ratios(workload, len(plans))
    engine_predicted = predicted.engine_image_cache
    if cluster.replicas > 0:
        # Session and least-loaded routing ignore the image as round-robin does.
        policy: RoutingPolicy = "image-affinity" if cluster.policy == "image-affinity" else "round-robin"
        engine_predicted = engine_hit_ratio_by_policy(workload, cluster.replicas, policy, len(plans))
        say(
            f"  expected engine image-cache hit ratio over {cluster.replicas} replicas behind {cluster.policy}, "
            f"from empty caches: {engine_predicted:.1%} (if every request reaches an engine)"
        )
    meta: dict[str, object] = {
        "label": options.label or out.name,
        "workload": workload.name,
        "workload_file": options.workload_file,
        "target": target,
        "rate": _offered_rate(workload),
        "duration_s": length,
        "planned_requests": len(plans),
        "users": users,
        "processes": options.processes,
        "slo": options.slo_text,
        "max_send_lag_ms": options.max_send_lag_ms,
        "policy": cluster.policy,
        "replicas": cluster.replicas,
        "predicted": {
            "answer_cache_hit_ratio": predicted.answer_cache,
            "engine_image_cache_hit_ratio": engine_predicted,
        },
        "scrape_interval_s": options.scrape_interval_s,
        "scrape_sources": [s.name for s in cluster.sources],
        **options.extra,
        "started_unix": time.time(),
    }
    folder.file(rf.RUN).write_text(json.dumps(meta, indent=2) + "\n")

    scraper = Scraper(cluster.sources, folder.file(rf.METRICS), options.scrape_interval_s)
    scraper.start()
    progress = Progress(folder, len(plans), say)
    try:
        code = _locust(options, folder, users, length, len(plans), progress)
    finally:
        scraper.stop()
        progress.close()
    meta["ended_unix"] = time.time()
    meta["locust_exit_code"] = code
    folder.file(rf.RUN).write_text(json.dumps(meta, indent=2) + "\n")
    if code not in (0, INVALID):
        tail = folder.file(rf.LOCUST_LOG).read_text()[-2000:]
        raise LoadtestError(f"locust exited with status {code}; the end of {folder.file(rf.LOCUST_LOG)}:\n{tail}")
    try:
        records = folder.records()
    except rf.RunFolderError as exc:
        raise LoadtestError(f"no request was recorded: {exc}") from None
    if not records:
        tail = folder.file(rf.LOCUST_LOG).read_text()[-2000:]
        raise LoadtestError(f"no request was recorded; the end of {folder.file(rf.LOCUST_LOG)}:\n{tail}")
    if len(records) < len(plans):
        say(f"warning: {len(plans) - len(records)} of {len(plans)} planned requests were not answered in time")
    summary = summarise_run(records, folder.process_summaries(), options.objectives, options.max_send_lag_ms)
    folder.file(rf.SUMMARY).write_text(summary.to_json() + "\n")
    if scraper.failures:
        total = scraper.failures + scraper.pages
        say(f"warning: {scraper.failures} of {total} metric scrapes failed (see {rf.METRICS})")
    return summary


def exit_status(summary: RunSummary) -> int:
    """0 valid and SLO held (or none given); 3 invalid; 4 SLO missed."""
    if not summary.valid:
        return INVALID
    if summary.slo_held is False:
        return SLO_MISSED
    return 0


def _keys(workload: Workload) -> dict[str, str]:
    keys = {}
    for tenant in workload.tenants:
        try:
            keys[tenant.id] = api_key(tenant)
        except KeyError:
            raise LoadtestError(f"tenant {tenant.id}: set {tenant.key_env} to its API key", USAGE) from None
    return keys


def _check_target(target: str, key: str) -> None:
    try:
        answer = httpx.get(f"{target}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10)
    except httpx.HTTPError as exc:
        raise LoadtestError(f"cannot reach the router at {target}: {exc}") from None
    if answer.status_code != 200:
        raise LoadtestError(f"GET {target}/v1/models answered {answer.status_code}: {answer.text[:300]}")
    if not answer.json().get("data"):
        raise LoadtestError(f"the router at {target} serves no model yet (no healthy replica)")


def _offered_rate(workload: Workload) -> float | None:
    arrivals = workload.arrivals
    if isinstance(arrivals, ClosedLoop):
        return None
    length = schedule_length(arrivals) or 0.0
    return expected_count(arrivals) / length if length else None


def _locust(
    options: LoadtestOptions, folder: rf.RunFolder, users: int, length: float | None, planned: int, progress: Progress
) -> int:
    """Run locust headless (a master and local workers when processes > 1); returns its exit status.

    No `-t`: its timer starts before the processes have rendered their images (tens of seconds for a fast
    schedule of large PNGs), and a distributed master's runs out while its workers still render. Instead
    the run's time counts from its first answer: the schedule plus the drain (or a closed loop's
    --duration); then locust is stopped (SIGTERM: users stop, every process writes its records' summary).
    A single process ends itself once its schedule is done; a master is stopped once all are answered."""
    limit = length + options.drain_s if length is not None else options.run_time_s
    ahead = str(length if length is not None else (limit or 60.0))
    common = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
    run_flags = [
        *("--headless", "--only-summary", "--exit-code-on-error", "0"),
        *("-u", str(users), "-r", str(users), "--host", options.target, "--render-ahead-s", ahead),
        *("--workload", str(folder.file(rf.WORKLOAD)), "--records", str(folder.file(rf.RECORDS))),
        *("--csv", str(folder.file(rf.LOCUST_CSV)), "--max-send-lag-ms", str(options.max_send_lag_ms)),
        *(("--model", options.model) if options.model else ()),
    ]
    env = {**os.environ}
    workers: list[subprocess.Popen[bytes]] = []
    with folder.file(rf.LOCUST_LOG).open("wb") as log:
        if options.processes > 1:
            from qvl.procs import free_port

            port = str(free_port())
            master_argv = [*common, "--master", "--master-bind-port", port, "--expect-workers", str(options.processes)]
            main = subprocess.Popen([*master_argv, *run_flags], stdout=log, stderr=subprocess.STDOUT, env=env)
            worker_flags = ["--worker", "--master-port", port, "--render-ahead-s", ahead]
            workers = [
                subprocess.Popen([*common, *worker_flags], stdout=log, stderr=subprocess.STDOUT, env=env)
                for _ in range(options.processes)
            ]
        else:
            main = subprocess.Popen([*common, *run_flags], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            first_answer: float | None = None
            stopped = False
            while main.poll() is None:
                done = progress.update()
                now = time.monotonic()
                if done and first_answer is None:
                    first_answer = now
                over_time = limit is not None and first_answer is not None and now - first_answer > limit
                if not stopped and ((workers and done >= planned) or over_time):
                    if over_time:
                        progress.say(f"qvl loadtest: time is up ({limit:.0f} s from the first answer): stopping locust")
                    main.send_signal(signal.SIGTERM)
                    stopped = True
                time.sleep(1.0)
            code = main.wait()
            for worker in workers:
                worker.wait(timeout=60)
            return 0 if stopped and code in (0, -signal.SIGTERM) else code
        except BaseException:
            for proc in (main, *workers):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            for proc in (main, *workers):
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            raise
