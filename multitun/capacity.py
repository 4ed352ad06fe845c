"""Each path's capacity and queueing delay, estimated from probe feedback, and
the rate to pace it at so that its bottleneck keeps no standing queue.

A probe reply carries the peer's feedback (docs/PROTOCOL.md): when the peer
received the probe, by its clock, and how many bytes it had received on the
path. From successive replies:

- the forward one-way delay, up to the two clocks' unknown offset: the
  peer's receive time less our send time. Its ``BASE_PERCENTILE``th
  percentile over the last ``MIN_WINDOW_NS`` is the path's base; what lies
  above it is the queue on the way there (a queue on the way back does not
  count, as it would in the round trip). Not the minimum: with jitter, the
  minimum of a hundred samples lies two or three deviations below the
  typical delay, and jitter alone would read as a queue and pace the path
  down;
- the delivery rate: bytes the peer received between two replies, over the
  time between them on its clock.

The control law, once per reply (every probe interval): a proportional
controller on the queueing delay, anchored to what the path delivered (as
BBR anchors its pacing to the delivery rate; Cardwell et al., ACM Queue
14(5), 2016):

- a path is paced once its queue has stood above ``target`` for
  ``ENTER_SAMPLES`` replies in a row: a queue, not a late reply;
- while paced, whenever the queue is above target or the pacer held packets
  back, the next rate is the delivery rate times
  ``1 + GAIN * (setpoint - queue) / setpoint``, within ``DRAIN_FLOOR`` and
  ``1 + GAIN``, where the setpoint is half the target: more while the queue
  is shorter, less once it is longer, so that it stays within the target
  as it swings (the feedback is a round trip and a probe interval late).
  Never below ``DRAIN_FLOOR`` of the most the path delivered lately: where
  the delivery rate only follows our own pacing, cuts must not compound;
- paced, and for ``RELEASE_NS`` neither a queue above target nor a held
  packet: the path is not the bottleneck any more; stop pacing;
- paced, holding packets back, and the window's minimum is
  ``PROBE_BASE_AFTER_NS`` old: a paced path's queue seldom empties, so its
  base may include a queue, or hide a base that rose (a new route). Drain,
  at ``DRAIN_FLOOR`` of its capacity, until the one-way delay stops
  falling: the queue is empty then, and the sample shows the base, from
  which the window's minimum starts again (BBR's PROBE_RTT, for the same
  reason). Then the rate from before the drain is back at once (the delivery
  rate of the drain is no anchor). It costs a few probe intervals at half
  rate every few seconds;
- a queue that has not fallen over a round trip and ``STUCK_NS`` while we
  pace at most ``STUCK_GAIN`` of the delivery rate is no queue of ours
  (ours would drain by a twentieth of the rate a second at least): the base rose
  (a new route), or others hold the bottleneck's queue, which our backing
  off would not drain. The window restarts from the current sample instead
  of pacing the path down to nothing. The stretch is judged from the queue's
  highest point: while it still rises, what was sent before the pacing is
  still arriving.

A --rate cap paces the path at no more than the cap, always.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

# The base one-way delay is taken over this long (as BBR's min RTT): long
# enough to see the path empty now and then, short enough to follow a route
# that changed.
MIN_WINDOW_NS = 10_000_000_000
# Delivery-rate samples span at least this long (shorter ones are noise).
MIN_SAMPLE_NS = 50_000_000
# The capacity shown is the largest delivery rate over this long.
CAPACITY_WINDOW_NS = 2_000_000_000
# The controller's gain, and how far below the delivery rate it may pace
# (a long standing queue drains at half the rate at most). Never below
# MIN_RATE (bytes/s, 128 kbit/s): control traffic must always get through.
GAIN = 0.1
DRAIN_FLOOR = 0.5
MIN_RATE = 16_000
RELEASE_NS = 2_000_000_000
PROBE_BASE_AFTER_NS = 8_000_000_000
# The one-way delay still falls while a sample is this much below the last.
FALLING_NS = 1_000_000
STUCK_NS = 300_000_000
ENTER_SAMPLES = 3
BASE_PERCENTILE = 10
STUCK_GAIN = 0.95


@dataclass
class PathCapacity:
    target_ns: int
    # --rate: bytes/s, or None.
    cap: int | None = None
    # The pacing rate in bytes/s; None: not paced.
    rate: float | None = None
    queue_delay_ns: int | None = None
    delivery_rate: float | None = None
    rtt_min_ns: int | None = None
    # Probe number -> when it left.
    _sent: dict[int, int] = field(default_factory=dict)
    # (time, one-way delay): every sample of the window, and those that may
    # still be its minimum (a monotonic deque: the minimum is at its left).
    _window: collections.deque = field(default_factory=collections.deque)
    _owd: collections.deque = field(default_factory=collections.deque)
    # The last reply a delivery rate was measured from: peer_rx_ns, peer_rx_bytes.
    _last: tuple[int, int] | None = None
    _rates: collections.deque = field(default_factory=collections.deque)
    _calm_since_ns: int | None = None
    # Replies in a row with the queue above target.
    _above: int = 0
    # The pacer held packets back since the last sample.
    _held: bool = False
    # The last sample's one-way delay; whether a drain to find the base is
    # on, and how many samples it has seen.
    _last_owd_ns: int | None = None
    _finding_base: int = 0
    # The rate before that drain, to go back to.
    _before_drain: float | None = None
    # While we pace below STUCK_GAIN of the delivery rate: since when the
    # queue is judged, and the queueing delay then.
    _draining: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.cap is not None:
            self.rate = float(self.cap)

    def sent(self, number: int, now_ns: int) -> None:
        """Probe ``number`` left now."""
        self._sent[number] = now_ns
        while len(self._sent) > 64:  # unanswered ones
            del self._sent[next(iter(self._sent))]

    def feedback(self, number: int, rtt_ns: int, peer_rx_ns: int, peer_rx_bytes: int,
                 held: bool) -> None:
        """The reply to probe ``number``, with the peer's feedback; ``held``:
        the pacer held packets back since the last reply."""
        sent_ns = self._sent.pop(number, None)
        if sent_ns is None or rtt_ns <= 0:
            return  # not a reply to a probe of ours, or a timestamp from the future
        # Held packets since the last sample, not only since the last reply
        # (replies may come faster than samples are taken).
        self._held = self._held or held
        now_ns = sent_ns + rtt_ns
        self.rtt_min_ns = rtt_ns if self.rtt_min_ns is None else min(self.rtt_min_ns, rtt_ns)
        self._queue_delay(now_ns, peer_rx_ns - sent_ns, rtt_ns)
        if (self._last is None or peer_rx_ns < self._last[0]
                or peer_rx_bytes < self._last[1]):
            # The first reply, or the peer's clock or count started again (it
            # restarted, or another host answers): measure from here.
            self._last = (peer_rx_ns, peer_rx_bytes)
        elif peer_rx_ns - self._last[0] >= MIN_SAMPLE_NS:
            span = (peer_rx_ns - self._last[0]) / 1e9
            self.delivery_rate = (peer_rx_bytes - self._last[1]) / span
            self._rates.append((now_ns, self.delivery_rate))
            while self._rates and now_ns - self._rates[0][0] > CAPACITY_WINDOW_NS:
                self._rates.popleft()
            self._last = (peer_rx_ns, peer_rx_bytes)
            self._control(now_ns, self._held)
            self._held = False

    def _queue_delay(self, now_ns: int, owd_ns: int, rtt_ns: int) -> None:
        owd = self._owd
        while owd and owd[-1][1] >= owd_ns:
            owd.pop()
        owd.append((now_ns, owd_ns))
        while now_ns - owd[0][0] > MIN_WINDOW_NS and len(owd) > 1:
            owd.popleft()
        window = self._window
        window.append((now_ns, owd_ns))
        while now_ns - window[0][0] > MIN_WINDOW_NS:
            window.popleft()
        values = sorted(v for _, v in window)
        self.queue_delay_ns = max(0, owd_ns - values[len(values) * BASE_PERCENTILE // 100])
        falling = self._last_owd_ns is not None and owd_ns < self._last_owd_ns - FALLING_NS
        self._last_owd_ns = owd_ns
        if self._finding_base:
            self._finding_base = 0 if self._finding_base > 1 and not falling \
                else self._finding_base + 1
            if not self._finding_base:
                # Drained: this sample is the base now, whatever the old
                # minimum was (the window's minimum starts again from it).
                owd.clear()
                owd.append((now_ns, owd_ns))
        if self._draining is not None and self.queue_delay_ns > self._draining[1]:
            # Still rising: the feedback lags by the queue itself, so what
            # was sent before the pacing is still arriving. The stretch is
            # judged from the highest point (else a path paced into a
            # filling modem took the top of the fill for its base).
            self._draining = (now_ns, self.queue_delay_ns)
        elif self._draining is not None and now_ns - self._draining[0] >= rtt_ns + STUCK_NS:
            if self.queue_delay_ns >= self._draining[1] - FALLING_NS:
                owd.clear()
                owd.append((now_ns, owd_ns))
                self._window.clear()
                self._window.append((now_ns, owd_ns))
                self.queue_delay_ns = 0
                self._draining = None
            else:  # it fell: judge the next stretch from here
                self._draining = (now_ns, self.queue_delay_ns)

    def _control(self, now_ns: int, held: bool) -> None:
        q, delivered = self.queue_delay_ns or 0, self.delivery_rate or 0.0
        self._above = self._above + 1 if q > self.target_ns else 0
        if self.rate is not None and held and not self._finding_base \
                and now_ns - self._owd[0][0] >= PROBE_BASE_AFTER_NS:
            self._finding_base = 1
            self._before_drain = self.rate
        if self._finding_base:
            self.rate = (self.capacity or delivered) * DRAIN_FLOOR
            self._calm_since_ns = None
        elif self._before_drain is not None:
            self.rate, self._before_drain = self._before_drain, None
        elif (self._above >= ENTER_SAMPLES if self.rate is None
              else q > self.target_ns or held):
            setpoint = self.target_ns / 2
            gain = min(1.0 + GAIN, max(DRAIN_FLOOR, 1.0 + GAIN * (setpoint - q) / setpoint))
            self.rate = max(delivered * gain, (self.capacity or 0.0) * DRAIN_FLOOR)
            self._calm_since_ns = None
            if gain > STUCK_GAIN:
                self._draining = None
            elif self._draining is None:
                self._draining = (now_ns, q)
        elif self.rate is not None:
            if self._calm_since_ns is None:
                self._calm_since_ns = now_ns
            elif now_ns - self._calm_since_ns >= RELEASE_NS:
                self.rate = None
        if self.rate is not None:
            self.rate = max(self.rate, MIN_RATE)
        if self.cap is not None:
            self.rate = min(self.rate if self.rate is not None else self.cap, self.cap)

    @property
    def pacing_rate(self) -> int:
        """Bytes/s to pace at; 0: not paced."""
        return int(self.rate) if self.rate is not None else 0

    @property
    def capacity(self) -> float | None:
        """The largest delivery rate lately (bytes/s): what the path carried
        at best, its capacity when it was the bottleneck."""
        return max(r for _, r in self._rates) if self._rates else None

    @property
    def delay_ns(self) -> int:
        """The path's one-way delay estimate: half the least round trip, and
        the queue on the way; 0 if not known yet."""
        if self.rtt_min_ns is None:
            return 0
        return self.rtt_min_ns // 2 + (self.queue_delay_ns or 0)

    def as_dict(self) -> dict:
        mbit = lambda r: None if r is None else round(r * 8 / 1e6, 3)  # noqa: E731
        return {
            "capacity_mbit": mbit(self.capacity),
            "delivery_mbit": mbit(self.delivery_rate),
            "queue_delay_ms": (None if self.queue_delay_ns is None
                               else round(self.queue_delay_ns / 1e6, 3)),
        }
