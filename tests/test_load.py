"""The tunnel owns its queue, on emulated links (multitun/lab/load.py): video
and 100 Hz control traffic from client to server over a fast path that
fails for 3 s and an LTE-like backup with a modem's buffer and less capacity
than the video needs. benchmarks/test_load.py holds the same scenario to the
issue's figures; this test holds it to what must never regress."""

import pytest

from multitun.lab import TunnelPair
from multitun.lab.load import Scenario, run

from .conftest import requires_root

pytestmark = requires_root


def test_control_stays_fast_through_a_failure_while_video_degrades(tmp_path):
    scenario = Scenario()
    with scenario.bed() as bed, TunnelPair(bed, tmp_path) as pair:
        pair.wait_carrying()
        phases = run(bed, scenario)
    before, outage, after = phases["before"], phases["outage"], phases["after"]
    # The best path carries everything while it is up.
    assert before["video_delivered_pct"] >= 95 and before["control_lost"] == 0
    # While it is down, control still arrives, in a round trip of the backup,
    # not behind a modem's buffer full of video (1.27 s without pacing)...
    assert outage["control_lost"] == 0
    assert outage["control_p99_ms"] < scenario.backup_delay_ms + 70
    # ... and video goes on at most of what the backup carries.
    assert outage["video_mbit_s"] >= 0.7 * scenario.backup_rate_bps / 1e6
    # Back on the best path, nothing of the failure lingers.
    assert after["control_p99_ms"] < scenario.best_delay_ms + 20
    assert after["video_delivered_pct"] >= 95
    status = pair.logs("client")
    assert "Traceback" not in status
