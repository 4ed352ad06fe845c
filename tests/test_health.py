"""Path health from probes, without a network: the state machine and figures."""

import pytest

from multitun.health import LOSS_WINDOW, PathHealth, State

MS = 1_000_000


def health():
    return PathHealth(down_after_ns=500 * MS, lost_after_ns=500 * MS)


def test_down_until_the_first_answer():
    h = health()
    h.sent(1, 0)
    assert h.state is State.DOWN and h.as_dict()["rtt_ms"] is None
    assert h.answered(1, 2 * MS, 2 * MS) is True
    assert h.state is State.UP
    assert h.answered(1, 2 * MS, 3 * MS) is False  # the same reply again: ignored


def test_a_timestamp_from_the_future_is_no_answer():
    h = health()
    h.sent(1, 0)
    assert h.answered(1, -3 * MS, MS) is False
    assert h.state is State.DOWN and h.as_dict()["rtt_ms"] is None


def test_goes_down_after_silence_and_up_on_the_next_answer():
    h = health()
    h.sent(1, 0)
    h.answered(1, MS, MS)
    for seq, t in enumerate(range(100 * MS, 500 * MS, 100 * MS), start=2):
        h.sent(seq, t)
        assert h.tick(t) is False
    assert h.tick(501 * MS) is True and h.state is State.DOWN
    assert h.tick(600 * MS) is False  # going down is said once
    h.sent(9, 600 * MS)
    assert h.answered(9, MS, 601 * MS) is True and h.state is State.UP


def test_rtt_smoothing_minimum_and_jitter():
    h = health()
    for seq, rtt in enumerate([10, 10, 18, 10], start=1):
        h.sent(seq, seq * 100 * MS)
        h.answered(seq, rtt * MS, seq * 100 * MS + rtt * MS)
    d = h.as_dict()
    assert d["rtt_min_ms"] == 10
    assert d["rtt_ms"] == pytest.approx(10 + 8 / 8 - (10 + 8 / 8 - 10) / 8, abs=1e-3)
    # |0| then |8| then |8|, each with gain 1/16
    assert d["jitter_ms"] == pytest.approx(((8 / 16) * 15 / 16 + 8 / 16), abs=1e-3)


def test_loss_over_the_recent_window():
    h = health()
    for seq in range(1, 101):
        h.sent(seq, seq * 100 * MS)
        if seq % 4:  # one in four never answered
            h.answered(seq, MS, seq * 100 * MS + MS)
    h.tick(200 * 100 * MS)
    assert h.as_dict()["loss_pct"] == pytest.approx(25.0, abs=100 / LOSS_WINDOW)


def test_no_loss_figure_before_any_outcome():
    h = health()
    h.sent(1, 0)
    assert h.as_dict()["loss_pct"] is None
    h.answered(1, MS, MS)  # known at once, before any tick
    assert h.as_dict()["loss_pct"] == 0
