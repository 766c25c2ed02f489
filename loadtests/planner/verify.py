"""`qvl plan verify`: run the recommended N, and N - 1, through the real router, and check the simulation.

Without `--target`, each fleet is `qvl up --engine sim --profile P --replicas K` on free ports (simulated
replicas that run the profile in real time, behind a real router); with `--target` the user's own cluster
is measured as it is (then only N is run: a planner cannot take one of a user's replicas away). Each run
is an ordinary load-test run folder, and the same scenario is simulated in virtual time: the two must
agree within the bounds (the virtual-time simulation is checked against a real-time run, not trusted).
Verified when the SLO holds at N, fails at N - 1, and every bounded error is within its bound.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtests.planner.validate import metrics_of, predict, relative_errors
from loadtests.runner import LoadtestOptions, run_loadtest
from loadtests.scrape import discover
from loadtests.slo import Objective
from loadtests.workload import Workload, with_load
from qvl.procs import free_port, spawn
from serving.sim.profile import CapacityProfile

Say = Callable[[str], None]
VERIFY_JSON = "verify.json"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class VerifyOptions:
    profile_path: Path
    profile: CapacityProfile
    workload: Workload
    workload_file: str
    objectives: tuple[Objective, ...]
    slo_text: str
    rate: float
    replicas: int
    out: Path
    bounds: dict[str, float]
    duration_s: float = 60.0
    target: str | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class FleetRun:
    replicas: int
    folder: str
    slo_held: bool | None
    valid: bool
    measured: dict[str, float | None]
    predicted: dict[str, float | None]
    predicted_slo_held: bool | None
    error: dict[str, float | None]


@dataclass
class Verification:
    rate: float
    replicas: int
    runs: list[FleetRun]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> str:
        data = asdict(self)
        data["passed"] = self.passed
        return json.dumps(data, indent=2)


def verify(options: VerifyOptions, say: Say) -> Verification:
    """Run the fleets, compare with virtual time, write verify.json."""
    out = options.out
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: give a new --out folder")
    workload = with_load(options.workload, options.rate, options.duration_s)
    sizes = [options.replicas] if options.target else [options.replicas, options.replicas - 1]
    sizes = [n for n in sizes if n >= 1]
    runs: list[FleetRun] = []
    for n in sizes:
        folder = out / f"replicas-{n}"
        say(f"verify: {n} replica{'s' if n != 1 else ''} at {options.rate:g} req/s for {options.duration_s:.0f} s")
        with _fleet(options, n, out / f"fleet-{n}") as (target, policy, answer_cache):
            summary = run_loadtest(
                LoadtestOptions(
                    workload=workload,
                    workload_file=options.workload_file,
                    target=target,
                    out=folder,
                    objectives=options.objectives,
                    slo_text=options.slo_text,
                    label=f"verify {n} replicas",
                    drain_s=60.0,
                    scrape_interval_s=1.0,
                ),
                say,
            )
        predicted, _, _ = predict(workload, options.profile, n, policy, options.objectives, answer_cache)
        p, m = metrics_of(predicted), metrics_of(summary)
        runs.append(
            FleetRun(n, str(folder), summary.slo_held, summary.valid, m, p, predicted.slo_held, relative_errors(p, m))
        )
    result = Verification(options.rate, options.replicas, runs, _failures(runs, options))
    out.mkdir(parents=True, exist_ok=True)
    (out / VERIFY_JSON).write_text(result.to_json() + "\n")
    return result


def _failures(runs: Sequence[FleetRun], options: VerifyOptions) -> list[str]:
    """What keeps N from being verified. Virtual and real time must agree at N; at N - 1 the fleet is
    overloaded, where percentiles run away in both and only the verdict (missed) is compared."""
    failures = []
    at_n = runs[0]
    if not at_n.slo_held:
        failures.append(f"the SLO did not hold at N = {at_n.replicas} replicas (measured)")
    if not at_n.valid:
        failures.append(f"the run with {at_n.replicas} replicas is INVALID: the generator fell behind")
    for name, bound in options.bounds.items():
        error = at_n.error.get(name)
        if error is not None and error > bound:
            failures.append(
                f"{at_n.replicas} replicas: virtual time and real time differ by {error:.1%} in {name} "
                f"(bound {bound:.0%})"
            )
    if len(runs) > 1:
        below = runs[1]
        if below.slo_held:
            failures.append(f"the SLO also held at N - 1 = {below.replicas}: N is not the smallest (measured)")
        if below.predicted_slo_held:
            failures.append(f"virtual time says the SLO holds at N - 1 = {below.replicas}: the sizing is stale")
    return failures


@contextmanager
def _fleet(options: VerifyOptions, replicas: int, workdir: Path) -> Iterator[tuple[str, str, bool]]:
    """(router URL, its routing policy, whether its answer cache is on) for `replicas` replicas."""
    if options.target:
        cluster = discover(options.target, options.api_key)
        yield options.target, cluster.policy or "least-loaded", True
        return
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "qvl",
        "up",
        "--engine",
        "sim",
        "--profile",
        str(options.profile_path.resolve()),
        "--replicas",
        str(replicas),
        "--port",
        str(port),
        "--cache",
        "off",
        "--no-auth",
        "--no-gpu-exporter",
        "--run-dir",
        str(workdir / "run"),
    ]
    child = spawn(
        f"qvl up ({replicas} sim replicas)",
        argv,
        url=f"http://127.0.0.1:{port}",
        log=workdir / "up.log",
        env=dict(os.environ),
    )
    try:
        child.wait_ready(START_TIMEOUT_S, "/ready")
        cluster = discover(child.url, options.api_key)
        yield child.url, cluster.policy or "least-loaded", False
    finally:
        child.stop()
