"""The tunnel owns its queue: video and control over a failing best path and a
capacity-limited, bufferbloated backup (multitun/lab/load.py), per phase:

    python3 -m pytest benchmarks/test_load.py -s
    python3 -m pytest benchmarks/test_load.py -s --baseline-python /tmp/prev/bin/python

With --baseline-python, the other version runs the same scenario on the same
kind of bed first, for its figures beside these.
"""

import json

import pytest

from multitun.lab import TunnelPair
from multitun.lab.load import Scenario, run

from .conftest import requires_root

pytestmark = requires_root


def scenario_on(python, logs):
    scenario = Scenario()
    with scenario.bed() as bed, TunnelPair(bed, logs, python=python) as pair:
        pair.wait_carrying()
        return scenario, run(bed, scenario)


def print_table(name, phases):
    print(f"\n{name}")
    print(f"{'phase':8} {'control p50':>12} {'control p99':>12} {'lost':>5} "
          f"{'video %':>8} {'video Mbit/s':>13}")
    for phase, f in phases.items():
        p50 = "-" if f["control_p50_ms"] is None else f"{f['control_p50_ms']:.1f} ms"
        p99 = "-" if f["control_p99_ms"] is None else f"{f['control_p99_ms']:.1f} ms"
        print(f"{phase:8} {p50:>12} {p99:>12} {f['control_lost']:>5} "
              f"{f['video_delivered_pct']:>8} {f['video_mbit_s']:>13}")


def test_video_and_control_through_a_failure(benchmark, request, tmp_path):
    baseline = request.config.getoption("--baseline-python")
    results = {}

    def measure():
        if baseline:
            (tmp_path / "other").mkdir()
            results["other"] = scenario_on(baseline, tmp_path / "other")[1]
        (tmp_path / "this").mkdir()
        results["scenario"], results["this"] = scenario_on(None, tmp_path / "this")

    benchmark.pedantic(measure, rounds=1, iterations=1)
    scenario, phases = results["scenario"], results["this"]
    if baseline:
        print_table("other version", results["other"])
        benchmark.extra_info["other"] = results["other"]
    print_table("this version", phases)
    benchmark.extra_info["this"] = phases
    print(json.dumps(phases))
    before, outage, after = phases["before"], phases["outage"], phases["after"]
    # The figures.
    assert outage["control_p99_ms"] is not None
    assert outage["control_p99_ms"] <= scenario.backup_delay_ms + 30
    assert after["control_p99_ms"] <= scenario.best_delay_ms + 10
    assert before["video_delivered_pct"] >= 95
    assert outage["video_mbit_s"] >= 0.8 * scenario.backup_rate_bps / 1e6
