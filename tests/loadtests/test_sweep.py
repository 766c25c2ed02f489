"""The knee of a rate sweep and its table; scaling a workload to a rate and a duration."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import ROOT

from loadtests.arrivals import duration_s, max_rate
from loadtests.sweep import Level, SweepResult, knee, markdown
from loadtests.workload import ClosedLoop, Spike, Stages, WorkloadError, load_workload, with_load

WORKLOADS = ROOT / "loadtests" / "workloads"


def level(rate: float, valid: bool = True, held: bool | None = True) -> Level:
    return Level(rate, f"rate-{rate:g}", valid, held, rate, rate, 100.0, 200.0, 0.0)


def test_the_knee_is_the_highest_valid_rate_that_held() -> None:
    assert knee([level(10), level(20), level(40, held=False), level(80, held=False)]) == 20
    # An invalid level says nothing about the cluster: a higher level that held is the knee.
    assert knee([level(10), level(20, valid=False, held=False), level(40)]) == 40
    assert knee([level(10, held=False)]) is None
    assert knee([]) is None


def test_the_sweep_table_names_the_knee_and_the_invalid_levels() -> None:
    text = markdown(SweepResult([level(10), level(20, valid=False), level(40, held=False)], 10, [80]))
    assert "| 10 | yes | held |" in text and "| 20 | INVALID |" in text and "| 40 | yes | missed |" in text
    assert "**10 requests/s**" in text and "Skipped after a miss: 80" in text and "INVALID levels" in text


def test_a_rate_and_duration_apply_to_each_arrival_process() -> None:
    storefront = with_load(load_workload(WORKLOADS / "storefront.yaml"), 50, 30)
    assert (storefront.arrivals.rate, storefront.arrivals.duration_s) == (50, 30)  # type: ignore[union-attr]
    flash = with_load(load_workload(WORKLOADS / "flash_sale.yaml"), rate=12)
    assert flash.arrivals.rate == 12 and flash.arrivals.cv == 3  # type: ignore[union-attr]
    base = load_workload(WORKLOADS / "catalogue.yaml")
    stages = base.model_copy(
        update={
            "arrivals": Stages.model_validate(
                {
                    "process": "stages",
                    "stages": [{"duration_s": 10, "rate": 5, "to_rate": 20}, {"duration_s": 5, "rate": 10}],
                }
            )
        }
    )
    scaled = with_load(stages, rate=40)
    assert isinstance(scaled.arrivals, Stages) and max_rate(scaled.arrivals) == 40
    assert [(s.rate, s.to_rate) for s in scaled.arrivals.stages] == [(10, 40), (20, None)]
    assert duration_s(scaled.arrivals) == 15
    spike = base.model_copy(
        update={"arrivals": Spike(process="spike", base_rate=5, multiplier=4, start_s=10, length_s=5, duration_s=60)}
    )
    assert with_load(spike, 8, 20).arrivals == Spike(
        process="spike", base_rate=8, multiplier=4, start_s=10, length_s=5, duration_s=20
    )
    assert with_load(base) is base


@pytest.mark.parametrize(
    ("arrivals", "rate", "length", "message"),
    [
        ({"process": "closed", "users": 4, "requests": 10}, 5.0, None, "a closed loop has no rate"),
        ({"process": "stages", "stages": [{"duration_s": 5, "rate": 1}]}, None, 30.0, "stages set their own length"),
        ({"process": "constant", "rate": 1, "duration_s": 5}, -1.0, None, "must be positive"),
    ],
)
def test_a_knob_the_arrivals_lack_is_refused(
    arrivals: dict[str, object], rate: float | None, length: float | None, message: str
) -> None:
    data = load_workload(WORKLOADS / "catalogue.yaml").model_dump()
    data["arrivals"] = arrivals
    from loadtests.workload import parse_workload

    with pytest.raises(WorkloadError, match=message):
        with_load(parse_workload(data), rate, length)


def test_every_shipped_open_loop_workload_scales(tmp_path: Path) -> None:
    for path in sorted(WORKLOADS.glob("*.yaml")):
        workload = load_workload(path)
        if isinstance(workload.arrivals, ClosedLoop):
            with pytest.raises(WorkloadError, match="a closed loop has no rate"):
                with_load(workload, 3, 7)
            continue
        assert duration_s(with_load(workload, 3, 7).arrivals) == 7, path.name
