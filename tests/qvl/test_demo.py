"""`make demo` runs `python -m qvl.demo`: it brings a cluster up, asks one image question, and shuts down."""

import subprocess
import sys

from support import ROOT


def test_the_demo_answers_an_image_question_and_stops_its_cluster() -> None:
    # The simulated engine keeps this to seconds; `make demo` itself uses real vLLM replicas.
    done = subprocess.run(
        [sys.executable, "-m", "qvl.demo", "--engine", "sim", "--replicas", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "qvl: ready at " in done.stdout
    assert "\nA: " in done.stdout and "replica 127.0.0.1:" in done.stdout
    assert "qvl: stopped 2 replica(s)" in done.stdout
