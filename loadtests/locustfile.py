"""Locust drives a workload file against a qvl router:

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --workload loadtests/workloads/storefront.yaml \\
        --records runs/storefront.jsonl [--headless -u 16 -r 16 -t 60s] [--csv runs/storefront]

Open-loop workloads follow their schedule: each user takes the next planned request, waits for its send
time and sends it, so -u sets how many requests may be in flight, not the rate (too few users and the
run is INVALID: the generator fell behind). Closed-loop workloads run one locust user per -u with the
workload's think time. Besides one entry per task (request_type POST), time to first token (TTFT) and
every inter-token gap (ITL) are their own entries in the UI and CSV. Each process writes its records
(loadtests/records.py) and a summary; a P99 send lag over --max-send-lag-ms exits 3.
Distributed: `--master --expect-workers N` and N `--worker`s; worker i takes every N-th request.

This file only wires locust to loadtests/driver.py; nothing else may import it (it monkey-patches gevent).
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import httpx
from locust import User, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.event import EventHook
from locust.exception import StopUser
from locust.runners import LocalRunner, MasterRunner, WorkerRunner

from loadtests.driver import Dispatcher, RunClock, Sent, send
from loadtests.records import DEFAULT_MAX_SEND_LAG_MS, RecordWriter, Summary, records_path, summarise, summary_path
from loadtests.schedule import ImageStore, PlannedRequest, api_key, build_body, build_schedule
from loadtests.workload import ClosedLoop, Workload, load_workload

INVALID_EXIT_CODE = 3
LEAD_IN_S = 0.5


class RequestFailed(Exception):
    """A request that got no answer or an error answer; its message is the error type locust groups by."""


def _arguments(parser: LocustArgumentParser) -> None:
    group = parser.add_argument_group("qvl workload")
    group.add_argument(
        "--workload",
        default=os.environ.get("QVL_WORKLOAD", ""),
        help="workload YAML file (loadtests/workloads/); env QVL_WORKLOAD",
    )
    group.add_argument(
        "--records",
        default=os.environ.get("QVL_RECORDS", "loadtest-records.jsonl"),
        help="per-request JSON lines; workers write PATH.w<i>; a .summary.json lands beside; env QVL_RECORDS",
    )
    group.add_argument(
        "--max-send-lag-ms",
        type=float,
        default=DEFAULT_MAX_SEND_LAG_MS,
        help="P99 send lag above which the run is INVALID (exit code 3)",
    )
    group.add_argument(
        "--render-ahead-s",
        type=float,
        default=60.0,
        help="render the images of the schedule's first seconds before the clock starts (the whole -t when given "
        "to a single process); later ones are rendered on first use, which can delay sends",
    )
    group.add_argument("--model", default="", help="model name to request; empty: the first of GET /v1/models")


class Run:
    """One process's part of a run: its share of the schedule, the clock, the record file."""

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        assert options is not None
        if not options.workload:
            raise SystemExit("qvl: give the workload: --workload PATH or QVL_WORKLOAD")
        self.environment = environment
        self.workload: Workload = load_workload(Path(options.workload))
        self.max_lag_ms = float(options.max_send_lag_ms)
        runner = environment.runner
        distributed = isinstance(runner, WorkerRunner)
        self.worker = runner.worker_index if isinstance(runner, WorkerRunner) else 0
        workers = max(1, int(options.expect_workers)) if distributed else 1
        plans = build_schedule(self.workload)
        self.closed = isinstance(self.workload.arrivals, ClosedLoop)
        self.think_s = self.workload.arrivals.think_s if isinstance(self.workload.arrivals, ClosedLoop) else 0.0
        self.done = False
        self.dispatcher = Dispatcher(plans, self.worker, workers)
        self.keys = {t.id: api_key(t) for t in self.workload.tenants}
        self.tokens = {b.name: b.tokens for b in self.workload.images.buckets}
        self.images = ImageStore(self.workload)
        self.model = options.model or self._served_model(environment.host or "")
        self.writer = RecordWriter(records_path(Path(options.records), self.worker if distributed else None))
        # threading is monkey-patched by locust: this Event and time.sleep only pause one greenlet.
        self.started = threading.Event()
        self.clock = RunClock()
        self.in_flight = 0
        self.users_ready = 0
        self.users_expected: int | None = None
        # One TLS context for all users: building one per client costs ~50 ms of CPU each.
        self.tls = ssl.create_default_context()
        # Workers are not told -t: they render --render-ahead-s worth.
        ahead = float(options.run_time) if options.run_time and not distributed else float(options.render_ahead_s)
        self._warm(plans[self.worker :: workers], ahead)

    def _served_model(self, host: str) -> str:
        key = next(iter(self.keys.values()))
        answer = httpx.get(f"{host}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=30)
        answer.raise_for_status()
        return str(answer.json()["data"][0]["id"])

    def _warm(self, plans: list[PlannedRequest], horizon_s: float) -> None:
        # Rendering a large PNG blocks the event loop for tens of milliseconds: render the images the run
        # will send before the clock starts, so no send is late for it.
        refs = {ref for p in plans if p.send_at is None or p.send_at <= horizon_s for ref in p.images}
        print(f"qvl: rendering {len(refs)} images of workload {self.workload.name} before the run starts", flush=True)
        for ref in refs:
            self.images.get(ref)

    def user_ready(self) -> None:
        self.users_ready += 1
        self._maybe_start()

    def spawned(self, user_count: int) -> None:
        # On a worker, spawning_complete carries the whole run's count: wait for this process's users only.
        runner = self.environment.runner
        self.users_expected = runner.user_count if runner is not None else user_count
        self._maybe_start()

    def _maybe_start(self) -> None:
        """Start the schedule's clock once every user is spawned and connected, so that no early send waits."""
        expected = self.users_expected
        if expected is not None and self.users_ready >= expected and not self.started.is_set():
            # A short lead-in: the users woken together settle before the first planned send.
            self.clock = RunClock(lead_s=0.0 if self.closed else LEAD_IN_S)
            self.started.set()

    def body(self, plan: PlannedRequest) -> bytes:
        return json.dumps(build_body(plan, self.workload, self.model, self.images)).encode()

    def finish(self) -> Summary:
        self.writer.close()
        start = self.clock.start_unix if self.started.is_set() else None
        summary = summarise(self.writer.records, self.max_lag_ms, start, self.worker)
        summary_path(self.writer.path).write_text(summary.to_json() + "\n")
        return summary


class WorkloadUser(User):
    """Sends the workload's planned requests: open loop on the schedule's clock, or closed loop with think time."""

    # Locust builds users itself, from the class: the process's Run reaches them here, as `host` does.
    shared: ClassVar[Run | None] = None

    def wait_time(self) -> float:
        return self.shared.think_s if self.shared is not None else 0.0

    def on_start(self) -> None:
        run = self.shared
        assert run is not None
        timeout = httpx.Timeout(600, connect=10)
        self.client = httpx.Client(base_url=self.environment.host or "", timeout=timeout, verify=run.tls)
        # Open the connection now, while users spawn: a first request costs the generator tens of
        # milliseconds (connection, lazy set-up), which on the schedule's clock would be send lag.
        with contextlib.suppress(httpx.HTTPError):
            self.client.get("/health")
        run.user_ready()

    def on_stop(self) -> None:
        self.client.close()

    @task
    def next_request(self) -> None:
        run = self.shared
        assert run is not None
        run.started.wait()
        plan = run.dispatcher.take()
        if plan is None:
            self._schedule_done(run)
        # Taken counts as in flight: the schedule is done only when no user still waits to send either.
        run.in_flight += 1
        try:
            body = run.body(plan)
            if plan.send_at is not None:
                run.clock.sleep_until(plan.send_at, time.sleep)
            tokens = sum(run.tokens[ref.bucket] for ref in plan.images)
            done = send(self.client, plan, body, run.keys[plan.tenant], run.clock, tokens, run.worker)
        finally:
            run.in_flight -= 1
        run.writer.write(done.record)
        self._report(done)

    def _schedule_done(self, run: Run) -> NoReturn:
        if run.in_flight == 0 and not run.done and isinstance(self.environment.runner, LocalRunner):
            options = self.environment.parsed_options
            if options is not None and options.headless:
                run.done = True
                print("qvl: the schedule is done", flush=True)
                # Not from this greenlet: quitting kills every user, this one included.
                threading.Thread(target=self.environment.runner.quit).start()
        raise StopUser()

    def _report(self, done: Sent) -> None:
        record, fire = done.record, self.environment.events.request.fire
        error = None if record.error_type is None else RequestFailed(record.error_type)
        fire(request_type="POST", name=record.task, response_time=record.e2e_ms, response_length=0, exception=error)
        if record.ttft_ms is not None:
            fire(request_type="TTFT", name=record.task, response_time=record.ttft_ms, response_length=0, exception=None)
        for gap in done.gaps_s:
            fire(request_type="ITL", name=record.task, response_time=gap * 1000, response_length=0, exception=None)


def _test_start(environment: Environment, **_: object) -> None:
    if isinstance(environment.runner, MasterRunner):
        return
    WorkloadUser.shared = Run(environment)


def _spawned(user_count: int, **_: object) -> None:
    if WorkloadUser.shared is not None:
        WorkloadUser.shared.spawned(user_count)


def _test_stop(environment: Environment, **_: object) -> None:
    run, WorkloadUser.shared = WorkloadUser.shared, None
    if run is None:
        return
    summary = run.finish()
    _verdict(environment, summary)
    if isinstance(environment.runner, WorkerRunner):
        environment.runner.send_message("qvl_summary", asdict(summary))


def _init(environment: Environment, **_: object) -> None:
    if isinstance(environment.runner, MasterRunner):
        # The workers judge their own share; the master's exit code carries the worst verdict.
        def _worker_summary(msg: Any, **_: object) -> None:
            _verdict(environment, Summary(**msg.data))

        environment.runner.register_message("qvl_summary", _worker_summary)


def _verdict(environment: Environment, summary: Summary) -> None:
    print(f"qvl: {summary.verdict()}", flush=True)
    if not summary.valid:
        environment.process_exit_code = INVALID_EXIT_CODE


def _listen(hook: EventHook, handler: Callable[..., None]) -> None:
    hook.add_listener(handler)  # type: ignore[no-untyped-call]  # locust's EventHook.add_listener is unannotated


_listen(events.init_command_line_parser, _arguments)
_listen(events.init, _init)
_listen(events.test_start, _test_start)
_listen(events.spawning_complete, _spawned)
_listen(events.test_stop, _test_stop)
