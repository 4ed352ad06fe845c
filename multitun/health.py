"""Per-path health from probes: round-trip time, jitter, loss, up or down.

Each end probes every path it has an endpoint on (every --probe-interval); the
peer's engine echoes each probe at once. A path is up from its first answered
probe, and down once no probe has been answered for --down-after seconds.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field

# Loss is judged over the last this many probes (5 s at the default interval).
LOSS_WINDOW = 50
# A probe unanswered after this many intervals counts as lost.
LOST_AFTER_INTERVALS = 5


class State(str, enum.Enum):
    UP = "up"
    DOWN = "down"


@dataclass
class PathHealth:
    down_after_ns: int
    lost_after_ns: int
    state: State = State.DOWN
    rtt_ns: float | None = None        # smoothed (RFC 6298: 1/8 gain)
    rtt_min_ns: int | None = None
    jitter_ns: float = 0.0             # RFC 3550 style mean deviation of successive RTTs
    last_answer_ns: int = 0
    since_ns: int = 0
    changes: int = 0
    _last_rtt_ns: int | None = None
    # probe seq -> [sent time, answered], oldest first; settled in that order
    # into _outcomes, so the loss window is always the last probes sent
    _pending: dict[int, list] = field(default_factory=dict)
    _outcomes: collections.deque = field(
        default_factory=lambda: collections.deque(maxlen=LOSS_WINDOW))

    def sent(self, seq: int, now_ns: int) -> None:
        self._pending[seq] = [now_ns, False]

    def answered(self, seq: int, rtt_ns: int, now_ns: int) -> bool:
        """Record a reply; True if it brought the path up."""
        probe = self._pending.get(seq)
        if probe is None or probe[1] or rtt_ns <= 0:
            # A late reply already counted as lost, a repeat, a stray, or a
            # timestamp that is not ours (in clear anyone on the path could
            # send one from the future).
            return False
        probe[1] = True
        if self.rtt_ns is None:
            self.rtt_ns = float(rtt_ns)
        else:
            self.rtt_ns += (rtt_ns - self.rtt_ns) / 8
        self.rtt_min_ns = rtt_ns if self.rtt_min_ns is None else min(self.rtt_min_ns, rtt_ns)
        if self._last_rtt_ns is not None:
            self.jitter_ns += (abs(rtt_ns - self._last_rtt_ns) - self.jitter_ns) / 16
        self._last_rtt_ns = rtt_ns
        self.last_answer_ns = now_ns
        return self._set(State.UP, now_ns)

    def answering(self, now_ns: int) -> bool:
        """Up, and answered lately (within half the time after which a probe
        counts as lost): what it says of its delay holds now."""
        return self.state is State.UP and now_ns - self.last_answer_ns < self.lost_after_ns // 2

    def tick(self, now_ns: int) -> bool:
        """Age unanswered probes; True if the path just went down."""
        for seq, (sent, answered) in list(self._pending.items()):
            if not answered and now_ns - sent < self.lost_after_ns:
                break
            del self._pending[seq]
            self._outcomes.append(answered)
        if self.state is State.UP and now_ns - self.last_answer_ns >= self.down_after_ns:
            return self._set(State.DOWN, now_ns)
        return False

    def link_down(self, now_ns: int) -> bool:
        """The path's link went down or its interface went away: down now,
        not after --down-after (the kernel said so). True if it was up."""
        return self._set(State.DOWN, now_ns)

    def _set(self, state: State, now_ns: int) -> bool:
        if state is self.state:
            return False
        self.state, self.since_ns = state, now_ns
        self.changes += 1
        return True

    @property
    def loss_pct(self) -> float | None:
        # An answered probe is settled for good the moment it is answered; an
        # unanswered one only once it is LOST_AFTER_INTERVALS old.
        answered = sum(1 for _, ok in self._pending.values() if ok)
        known = len(self._outcomes) + answered
        if not known:
            return None
        return 100.0 * self._outcomes.count(False) / known

    def as_dict(self) -> dict:
        ms = lambda ns: None if ns is None else round(ns / 1e6, 3)  # noqa: E731
        loss = self.loss_pct
        return {
            "state": self.state.value,
            "rtt_ms": ms(self.rtt_ns),
            "rtt_min_ms": ms(self.rtt_min_ns),
            "jitter_ms": ms(self.jitter_ns) if self.rtt_ns is not None else None,
            "loss_pct": None if loss is None else round(loss, 2),
        }
