"""Video and control traffic over a failing best path and a capacity-limited
backup: the scenario where a duplicating tunnel must own its queue.

Path 0 is a fast line (15 ms, 40 Mbit/s) that fails for a while; path 1 is
LTE-like (30 ms, 6 Mbit/s, a modem's 1000-frame buffer). Through the tunnel,
from client to server: a video stream (constant bit rate, more than path 1
carries) and 100 Hz control datagrams. Each datagram carries its number and
the CLOCK_MONOTONIC time it left at (both namespaces read the same clock), so
its one-way delay is exact. Results are per phase of the send time: before
the outage, during it, and after it.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..paths import SO_RCVBUFFORCE
from .bed import Bed
from .emulator import Impairment
from .traffic import percentile
from .tunnel_pair import TUN_CLIENT, TUN_SERVER

MS = 1_000_000
_STAMP = struct.Struct("!IQ")
VIDEO_PORT, CONTROL_PORT = 9010, 9011
# The IPv4 and UDP headers around a datagram's payload: what the tunnel carries.
INNER_HEADERS = 28


@dataclass(frozen=True)
class Scenario:
    best_delay_ms: float = 15.0
    best_rate_bps: float = 40e6
    backup_delay_ms: float = 30.0
    backup_rate_bps: float = 6e6
    backup_queue: int = 1000
    backup_jitter_ms: float = 0.0
    # Seconds after the emulator started.
    outage: tuple[float, float] = (10.0, 13.0)
    end: float = 18.0
    video_bps: float = 9.6e6
    video_payload: int = 1200
    control_hz: float = 100.0
    control_payload: int = 64
    # The phases start this long after the change that begins them, so that
    # each phase shows a state, not the moment of the change.
    settle: float = 0.5

    def bed(self) -> Bed:
        best = Impairment(delay_ms=self.best_delay_ms, rate_bps=self.best_rate_bps,
                          outages=(self.outage,))
        backup = Impairment(delay_ms=self.backup_delay_ms, rate_bps=self.backup_rate_bps,
                            queue=self.backup_queue, jitter_ms=self.backup_jitter_ms)
        return Bed(2, emulate=[(best, best), (backup, backup)])

    def phases(self, start: float) -> dict[str, tuple[float, float]]:
        """Each phase's span of send times, in seconds after the emulator
        started; ``start``: when the traffic began."""
        down, up = self.outage
        return {"before": (start + self.settle, down), "outage": (down, up),
                "after": (up + self.settle, self.end)}


@dataclass
class Phase:
    seconds: float
    control: list[float | None] = field(default_factory=list)
    video_sent: int = 0
    video_received: int = 0

    def summary(self, payload: int) -> dict:
        got = [v for v in self.control if v is not None]
        pct = {q: percentile(got, q, len(self.control)) if got else None for q in (50, 99)}
        carried = self.video_received * (payload + INNER_HEADERS) * 8
        return {
            "control_sent": len(self.control),
            "control_lost": len(self.control) - len(got),
            "control_p50_ms": None if pct[50] is None else round(pct[50], 2),
            "control_p99_ms": None if pct[99] is None else round(pct[99], 2),
            "video_delivered_pct": round(100 * self.video_received / self.video_sent, 2)
            if self.video_sent else None,
            "video_mbit_s": round(carried / self.seconds / 1e6, 3),
        }


@dataclass
class Run:
    """What a run measured: per phase, and per datagram (for plots): when
    each control datagram left (s on the emulator's clock) and its one-way
    delay in ms (None: lost), and when each video datagram left and whether
    it arrived."""

    phases: dict[str, dict]
    control: list[tuple[float, float | None]]
    video: list[tuple[float, bool]]


def table(phases: dict[str, dict]) -> str:
    """The phases as a table."""
    lines = [f"{'phase':8} {'control p50':>12} {'control p99':>12} {'lost':>5} "
             f"{'video %':>8} {'video Mbit/s':>13}"]
    for phase, f in phases.items():
        p50 = "-" if f["control_p50_ms"] is None else f"{f['control_p50_ms']:.1f} ms"
        p99 = "-" if f["control_p99_ms"] is None else f"{f['control_p99_ms']:.1f} ms"
        lines.append(f"{phase:8} {p50:>12} {p99:>12} {f['control_lost']:>5} "
                     f"{f['video_delivered_pct']:>8} {f['video_mbit_s']:>13}")
    return "\n".join(lines)


def run(bed: Bed, scenario: Scenario = Scenario(),
        progress: Callable[[float, list[float | None], float], None] | None = None) -> Run:
    """Send both streams from now until ``scenario.end``; what arrived. The
    tunnel must already carry traffic. ``progress`` is called about once a
    second with the time (s on the emulator's clock), the control delays of
    the last second (ms, None: not arrived) and the video Mbit/s of the
    second before it."""
    origin = bed.emulator_start_ns
    start = (time.monotonic_ns() - origin) / 1e9
    spans = scenario.phases(start)
    sent: dict[tuple[int, int], int] = {}
    arrived: dict[tuple[int, int], int] = {}
    video_gap = scenario.video_payload * 8 / scenario.video_bps
    control_gap = 1 / scenario.control_hz
    with bed.socket(bed.server) as video_rx, bed.socket(bed.server) as control_rx, \
            bed.socket(bed.client) as tx:
        for rx, port in ((video_rx, VIDEO_PORT), (control_rx, CONTROL_PORT)):
            rx.bind((TUN_SERVER, port))
            rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        tx.bind((TUN_CLIENT, 0))
        stop = threading.Event()

        def receive() -> None:
            kinds = {video_rx: VIDEO_PORT, control_rx: CONTROL_PORT}
            while not stop.is_set():
                for rx in select.select(list(kinds), [], [], 0.1)[0]:
                    seq, _ = _STAMP.unpack_from(rx.recv(2048))
                    arrived.setdefault((kinds[rx], seq), time.monotonic_ns())

        catcher = threading.Thread(target=receive, daemon=True)
        catcher.start()
        video = b"v" * scenario.video_payload
        control = b"c" * scenario.control_payload
        t0 = time.monotonic()
        counts = {VIDEO_PORT: 0, CONTROL_PORT: 0}
        gaps = {VIDEO_PORT: video_gap, CONTROL_PORT: control_gap}
        bodies = {VIDEO_PORT: video, CONTROL_PORT: control}
        end = origin / 1e9 + scenario.end
        next_progress = t0 + 1
        while time.monotonic() < end:
            now = time.monotonic()
            if progress and now >= next_progress:
                progress(*_last_second(sent, arrived, origin, scenario))
                next_progress += 1
            for port in (CONTROL_PORT, VIDEO_PORT):
                while t0 + counts[port] * gaps[port] <= now:
                    seq = counts[port]
                    stamp = time.monotonic_ns()
                    try:
                        tx.sendto(_STAMP.pack(seq, stamp) + bodies[port][_STAMP.size:],
                                  (TUN_SERVER, port))
                    except OSError:
                        pass  # the TUN's queue was full: a loss like any other
                    sent[(port, seq)] = stamp
                    counts[port] += 1
            time.sleep(0.0005)
        time.sleep(2.0)  # what is still queued somewhere arrives or never will
        stop.set()
        catcher.join()
    phases = {name: Phase(b - a) for name, (a, b) in spans.items()}
    control, video = [], []
    for (port, seq), stamp in sent.items():
        at = (stamp - origin) / 1e9
        got = arrived.get((port, seq))
        delay = None if got is None else (got - stamp) / MS
        if port == CONTROL_PORT:
            control.append((at, delay))
        else:
            video.append((at, got is not None))
        for name, (a, b) in spans.items():
            if a <= at < b:
                phase = phases[name]
                if port == CONTROL_PORT:
                    phase.control.append(delay)
                else:
                    phase.video_sent += 1
                    phase.video_received += got is not None
    return Run({name: phase.summary(scenario.video_payload) for name, phase in phases.items()},
               control, video)


def _last_second(sent: dict, arrived: dict, origin: int,
                 scenario: Scenario) -> tuple[float, list[float | None], float]:
    now = time.monotonic_ns()
    # Control datagrams of the last second but the newest 200 ms (still on
    # their way); video of the second before that, so that it had time to come.
    control = [None if (got := arrived.get(key)) is None else (got - stamp) / MS
               for key, stamp in list(sent.items())
               if key[0] == CONTROL_PORT and 200 * MS < now - stamp <= 1200 * MS]
    video = sum(1 for key, stamp in list(sent.items()) if key[0] == VIDEO_PORT
                and 1000 * MS < now - stamp <= 2000 * MS and key in arrived)
    mbit = video * (scenario.video_payload + INNER_HEADERS) * 8 / 1e6
    return (now - origin) / 1e9, control, mbit
