"""The de-duplication window: a numbered table and properties, run against the
compiled window and its pure-Python reference alike."""

import array

import pytest
from hypothesis import given, settings, strategies as st

from multitun import _reference, _testing
from multitun._reference import DUPLICATE, NEW, TOO_OLD

BITS = _testing.ReplayWindow.bits
LIMIT = BITS - 64


@pytest.fixture(params=["compiled", "reference"])
def window(request):
    return _testing.ReplayWindow() if request.param == "compiled" else _reference.ReplayWindow(BITS)


# (number, sequence numbers fed in order, verdict of the last)
TABLE = [
    (1, [0], NEW),
    (2, [0, 0], DUPLICATE),
    (3, [1, 2, 3, 2], DUPLICATE),
    (4, [5, 3], NEW),                                   # late but inside the window
    (5, [5, 3, 3], DUPLICATE),
    (6, [LIMIT + 10, 10], TOO_OLD),                     # exactly the limit behind
    (7, [LIMIT + 10, 11], NEW),                         # one inside the limit
    (8, [LIMIT + 10, 11, 11], DUPLICATE),
    (9, [1, 10**12], NEW),                              # a jump far past the window
    (10, [1, 10**12, 1], TOO_OLD),
    (11, [1, 10**12, 10**12 - 1], NEW),                 # words cleared by the jump
    (12, [63, 64, 63], DUPLICATE),                      # either side of a word edge
    (13, [64, 127, 128, 64], DUPLICATE),
    (14, [100, 100 + BITS], NEW),                       # jump of exactly the window
    (15, [100, 100 + BITS, 100], TOO_OLD),
    (16, [100, 100 + BITS, 100 + 64], TOO_OLD),         # exactly LIMIT behind the new top
    (17, [100, 100 + BITS, 100 + 65], NEW),             # one inside: its old word was cleared
    (18, [2**64 - 1], NEW),                             # the largest sequence number
    (19, [2**64 - 1, 2**64 - 1], DUPLICATE),
    (20, [2**64 - 1, 0], TOO_OLD),
    (21, list(range(1, 5000)) + [4000], DUPLICATE),
]


@pytest.mark.parametrize("number,seqs,verdict", TABLE, ids=[str(t[0]) for t in TABLE])
def test_table(window, number, seqs, verdict):
    for seq in seqs[:-1]:
        window.check(seq)
    assert window.check(seqs[-1]) == verdict


def test_reset_forgets(window):
    window.check(10**9)
    window.reset()
    assert window.check(1) == NEW


class Model:
    """What the window promises, stated as plainly as possible: a number is new
    once; numbers more than LIMIT behind the newest seen are too old."""

    def __init__(self):
        self.seen, self.top = set(), 0

    def check(self, seq):
        self.top = max(self.top, seq)
        if self.top - seq >= LIMIT:
            return TOO_OLD
        if seq in self.seen:
            return DUPLICATE
        self.seen.add(seq)
        return NEW


# Sequences shaped like the traffic: mostly increasing, copies, some far jumps.
steps = st.lists(st.one_of(st.integers(-200, 200), st.integers(-3 * BITS, 3 * BITS),
                           st.just(0)), max_size=400)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**40), steps)
def test_matches_model(start, deltas):
    compiled, reference, model = _testing.ReplayWindow(), _reference.ReplayWindow(BITS), Model()
    seq = start
    for d in deltas:
        seq = max(0, seq + d)
        expected = model.check(seq)
        assert compiled.check(seq) == expected
        assert reference.check(seq) == expected


@given(st.lists(st.integers(0, 2**20), max_size=300))
def test_check_many_counts_new(seqs):
    one_by_one = _testing.ReplayWindow()
    fresh = sum(one_by_one.check(s) == NEW for s in seqs)
    assert _testing.ReplayWindow().check_many(array.array("Q", seqs)) == fresh


def test_two_paths_interleaved_deliver_each_once(window):
    # Two paths, the second 300 packets behind: every number new exactly once.
    verdicts = []
    for seq in range(1, 3001):
        verdicts.append(window.check(seq))
        if seq > 300:
            verdicts.append(window.check(seq - 300))
    for seq in range(2701, 3001):
        verdicts.append(window.check(seq))
    assert verdicts.count(NEW) == 3000
    assert verdicts.count(DUPLICATE) == 3000
