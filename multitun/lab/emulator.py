"""A path emulator in user space, for kernels without netem (containers, CI VMs).

It runs in a middle network namespace and bridges each emulated path's two veth
ends through AF_PACKET sockets (packet(7)), frame by frame, so the endpoints keep
their addresses, ARP and neighbour discovery, and see one plain link. Each
direction of each path has its own impairments:

- ``delay``: fixed one-way delay;
- ``jitter``: a deviation from it, normal with this standard deviation and
  correlated in time (an Ornstein-Uhlenbeck process with a correlation time of
  ``jitter_tau_ms``, 20 ms by default): frames sent close together see close
  delays, as behind a real queue, instead of independent draws. The delay is
  cut at zero. Frames keep their order (a frame never leaves before the one
  ahead of it, as on a real link) unless ``reorder`` is set;
- ``loss``: random loss, each frame on its own;
- ``burst``: Gilbert-Elliott burst loss: ``p`` is the chance per frame of going
  from the good state to the bad one, ``r`` of coming back; every frame in the
  bad state is lost (mean burst 1/r frames);
- ``rate``: a bottleneck of this many bit/s, with a queue of ``queue`` frames
  (tail drop);
- ``outages``: ``[[start, end], ...]`` seconds after the emulator started, during
  which every frame is lost.

Impairments apply to IP packets. ARP frames pass untouched: the links emulated
are WAN paths (a modem, an ISP line), which have no ARP to lose, and a lost ARP
exchange would hold a link's packets back for a second, which no such path does.

Timers have the resolution of epoll_wait(2): a frame leaves within half a
millisecond of its time.

Run as ``python -m multitun.lab.emulator CONFIG_JSON``; multitun.lab starts it.
"""

from __future__ import annotations

import collections
import heapq
import json
import math
import random
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from ..paths import SO_RCVBUFFORCE

# <linux/if_ether.h>, <linux/if_packet.h>
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
ETHERTYPE_ARP = b"\x08\x06"
MS = 1_000_000
# epoll_wait(2) counts in whole milliseconds and Python rounds the wait up, so a
# timer fires 0..1 ms late; releasing what is due within half a millisecond
# centres that error on zero.
SLACK_NS = MS // 2


@dataclass(frozen=True)
class Impairment:
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    jitter_tau_ms: float = 20.0
    loss_pct: float = 0.0
    burst: tuple[float, float] | None = None   # Gilbert-Elliott (p, r)
    rate_bps: float | None = None
    queue: int = 1000
    outages: tuple[tuple[float, float], ...] = ()
    reorder: bool = False

    def __post_init__(self) -> None:
        if (self.delay_ms < 0 or self.jitter_ms < 0 or self.jitter_tau_ms <= 0
                or not 0 <= self.loss_pct <= 100):
            raise ValueError(f"impossible impairment: {self}")
        if self.burst and not all(0 <= x <= 1 for x in self.burst):
            raise ValueError("burst probabilities must be within 0..1")

    @property
    def passthrough(self) -> bool:
        return self == Impairment()

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if v != getattr(Impairment(), k)}

    @classmethod
    def from_json(cls, d: dict) -> Impairment:
        d = dict(d)
        if "burst" in d:
            d["burst"] = tuple(d["burst"])
        if "outages" in d:
            d["outages"] = tuple(tuple(o) for o in d["outages"])
        return cls(**d)


@dataclass
class Direction:
    """One direction of one path: decides each frame's fate and departure."""

    out: socket.socket
    imp: Impairment
    rng: random.Random
    start_ns: int
    bad: bool = False
    wander: float | None = None        # the jitter process's deviation now, ms
    last_arrival: int = 0
    last_release: int = 0
    link_free: int = 0                 # when the bottleneck has sent what it holds
    queue: collections.deque = field(default_factory=collections.deque)
    heap: list = field(default_factory=list)
    forwarded: int = 0
    dropped: int = 0

    def admit(self, frame: bytes, now: int) -> int | None:
        """The time ``frame`` should leave, or None if it is lost."""
        imp = self.imp
        t = (now - self.start_ns) / 1e9
        if any(a <= t < b for a, b in imp.outages):
            return None
        if imp.burst:
            p, r = imp.burst
            self.bad = (self.rng.random() >= r) if self.bad else (self.rng.random() < p)
            if self.bad:
                return None
        if imp.loss_pct and self.rng.random() * 100 < imp.loss_pct:
            return None
        ready = now
        if imp.rate_bps:
            if len(self.queue) + len(self.heap) >= imp.queue:
                return None  # the bottleneck's queue is full: tail drop
            self.link_free = max(self.link_free, now) + int(len(frame) * 8 * 1e9 / imp.rate_bps)
            ready = self.link_free
        delay = imp.delay_ms
        if imp.jitter_ms:
            delay = max(0.0, delay + self._wander(now))
        release = ready + int(delay * MS)
        if not imp.reorder:
            release = max(release, self.last_release)
        self.last_release = release
        return release

    def _wander(self, now: int) -> float:
        """Step the Ornstein-Uhlenbeck process to ``now``: it keeps a normal
        distribution of deviation jitter_ms, and frames dt apart are
        correlated by exp(-dt / tau)."""
        imp = self.imp
        if self.wander is None:
            self.wander = self.rng.gauss(0.0, imp.jitter_ms)
        else:
            rho = math.exp(-(now - self.last_arrival) / (imp.jitter_tau_ms * MS))
            self.wander = (self.wander * rho
                           + imp.jitter_ms * math.sqrt(1 - rho * rho) * self.rng.gauss(0.0, 1.0))
        self.last_arrival = now
        return self.wander

    def push(self, frame: bytes, release: int) -> None:
        if self.imp.reorder:
            heapq.heappush(self.heap, (release, self.forwarded + self.dropped, frame))
        else:
            self.queue.append((release, frame))

    def next_release(self) -> int | None:
        if self.queue:
            return self.queue[0][0]
        return self.heap[0][0] if self.heap else None

    def release_due(self, now: int) -> None:
        while self.queue and self.queue[0][0] <= now:
            self.send(self.queue.popleft()[1])
        while self.heap and self.heap[0][0] <= now:
            self.send(heapq.heappop(self.heap)[2])

    def send(self, frame: bytes | memoryview) -> None:
        try:
            self.out.send(frame)
            self.forwarded += 1
        except OSError:
            self.dropped += 1


def packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                      socket.htons(ETH_P_ALL))
    s.bind((ifname, ETH_P_ALL))
    # Frames we send out of this interface must not come back to us as input.
    s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    return s


def run(config: dict) -> None:
    """Bridge every configured link until SIGTERM/SIGINT.

    ``config``: {"seed": int, "links": [{"a": IF, "b": IF, "ab": {...}, "ba": {...}}]}
    where "ab" impairs frames from interface a to interface b.
    """
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(1))
    rng = random.Random(config.get("seed"))
    start = time.monotonic_ns()
    routes: dict[int, Direction] = {}    # fd read from -> where its frames go
    readers: dict[int, socket.socket] = {}
    for link in config["links"]:
        a, b = packet_socket(link["a"]), packet_socket(link["b"])
        for src, dst, key in ((a, b, "ab"), (b, a, "ba")):
            readers[src.fileno()] = src
            routes[src.fileno()] = Direction(dst, Impairment.from_json(link.get(key, {})),
                                             random.Random(rng.random()), start)
    poller = select.epoll()
    for fd in routes:
        poller.register(fd, select.EPOLLIN)
    buf = bytearray(65536)  # one receive buffer; frames are copied only to be queued
    view = memoryview(buf)
    print(json.dumps({"ready": True, "start_ns": start}), flush=True)
    while not stop:
        now = time.monotonic_ns()
        due = [t for d in routes.values() if (t := d.next_release()) is not None]
        timeout = max(0.0, (min(due) - SLACK_NS - now) / 1e9) if due else 1.0
        try:
            events = poller.poll(timeout)
        except InterruptedError:
            continue
        now = time.monotonic_ns()
        for fd, _ in events:
            direction, sock = routes[fd], readers[fd]
            passthrough = direction.imp.passthrough
            while True:
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    break
                if passthrough or view[12:14] == ETHERTYPE_ARP:  # straight through
                    direction.send(view[:n])
                    continue
                frame = bytes(view[:n])
                release = direction.admit(frame, now)
                if release is None:
                    direction.dropped += 1
                elif release <= now and direction.next_release() is None:
                    direction.send(frame)  # nothing ahead of it and nothing to wait for
                else:
                    direction.push(frame, release)
        for direction in routes.values():
            direction.release_due(time.monotonic_ns() + SLACK_NS)


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
