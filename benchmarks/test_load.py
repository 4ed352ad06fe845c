"""The tunnel owns its queue: video and control over a failing best path and a
capacity-limited, bufferbloated backup (multitun/lab/load.py), per phase:

    python3 -m pytest benchmarks/test_load.py -s
    python3 -m pytest benchmarks/test_load.py -s --baseline-python /tmp/prev/bin/python

With --baseline-python, the other version runs the same scenario on the same
kind of bed first, for its figures beside these. It runs in clear and sealed
(--key-file): sealed, the copies that lose the race are dropped before
decryption, and the feedback must still count them.
"""

import json

import pytest

from multitun.lab import TunnelPair
from multitun.lab.tunnel_pair import key_args
from multitun.lab.load import Scenario, run, table

from .conftest import requires_root

pytestmark = requires_root


def scenario_on(python, logs, extra):
    scenario = Scenario()
    with scenario.bed() as bed, TunnelPair(bed, logs, python=python, server_extra=extra,
                                           client_extra=extra) as pair:
        pair.wait_carrying()
        return scenario, run(bed, scenario).phases


@pytest.mark.parametrize("sealed", [False, True], ids=["clear", "sealed"])
def test_video_and_control_through_a_failure(benchmark, request, tmp_path, sealed):
    baseline = request.config.getoption("--baseline-python")
    extra = key_args(tmp_path) if sealed else ()
    results = {}

    def measure():
        if baseline:
            (tmp_path / "other").mkdir()
            results["other"] = scenario_on(baseline, tmp_path / "other", extra)[1]
        (tmp_path / "this").mkdir()
        results["scenario"], results["this"] = scenario_on(None, tmp_path / "this", extra)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    scenario, phases = results["scenario"], results["this"]
    if baseline:
        print("\nother version\n" + table(results["other"]))
        benchmark.extra_info["other"] = results["other"]
    print("\nthis version\n" + table(phases))
    benchmark.extra_info["this"] = phases
    print(json.dumps(phases))
    before, outage, after = phases["before"], phases["outage"], phases["after"]
    # The figures.
    assert outage["control_p99_ms"] is not None
    assert outage["control_p99_ms"] <= scenario.backup_delay_ms + 30
    assert after["control_p99_ms"] <= scenario.best_delay_ms + 10
    assert before["video_delivered_pct"] >= 95
    assert outage["video_mbit_s"] >= 0.8 * scenario.backup_rate_bps / 1e6
