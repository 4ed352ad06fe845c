"""Paced paths through real engines on loopback (multitun/fastpath/shaper.pxi):
the pacer holds a path to its rate, its queue serves a sparse flow first,
stale copies are dropped only when another path delivers sooner, and
nothing is lost or altered on the way."""

import socket
import time

import pytest

from multitun._fastpath import Engine
from multitun.lab.engine_pair import seq_of, udp4

MS = 1_000_000


class Bed:
    """Engine ``a`` (a client, ``npaths`` sockets) facing engine ``b`` (a
    server, one socket), each with a socketpair for its TUN."""

    def __init__(self, npaths: int, stale_margin_us: int = 20_000) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self.server.bind(("127.0.0.1", 0))
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.paths = []
        for _ in range(npaths):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            s.bind(("127.0.0.1", 0))
            s.connect(self.server.getsockname())
            self.paths.append(s)
        self.tun = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
        for inner, outer in self.tun:
            for s in (inner, outer):
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.a = Engine(self.tun[0][0].fileno(), [s.fileno() for s in self.paths], False, 0xA,
                        stale_margin_us=stale_margin_us)
        self.b = Engine(self.tun[1][0].fileno(), [self.server.fileno()], True, 0xB)
        for i in range(npaths):
            self.a.set_remote(i, socket.inet_aton("127.0.0.1"), self.server.getsockname()[1],
                              True)
            self.a.send_probe(i, i + 1, 0)  # b learns every path's endpoint
        self.b.run(0)
        self.a.run(0)
        self.a.take_control()

    def send(self, packets: list[bytes]) -> None:
        for p in packets:
            self.tun[0][1].send(p)

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.a.run(1)
            self.b.run(0)

    def received(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.tun[1][1].recv(65536))
            except BlockingIOError:
                return out

    def path(self, i: int) -> dict:
        return next(p for p in self.a.paths() if p["path"] == i)

    def close(self) -> None:
        for s in [self.server, *self.paths, *(s for pair in self.tun for s in pair)]:
            s.close()


@pytest.fixture
def bed_of():
    beds = []

    def make(npaths, **kw):
        beds.append(Bed(npaths, **kw))
        return beds[-1]

    yield make
    for bed in beds:
        bed.close()


def test_a_paced_path_sends_at_its_rate_and_loses_nothing(bed_of):
    bed = bed_of(1)
    bed.a.shape(0, 200_000, 0)  # 200 kB/s: 1000-byte packets 5 ms apart
    assert bed.path(0)["paced_rate"] == 1_600_000
    packets = [udp4(5000, 80, size=1000, seq=i) for i in range(60)]
    before = bed.path(0)["tx_packets"]
    bed.send(packets)
    bed.run(0.1)
    sent = bed.path(0)["tx_packets"] - before
    # 100 ms at the rate, and the burst allowed after a pause; never all.
    assert 15 <= sent <= 30, sent
    assert bed.path(0)["queue_packets"] == 60 - sent - bed.path(0)["aqm_dropped"]
    bed.a.shape(0, 0, 0)  # no longer paced: what it holds leaves at once
    bed.run(0.05)
    got = bed.received()
    assert bed.path(0)["queue_packets"] == 0
    assert len(got) + bed.path(0)["aqm_dropped"] == 60
    assert set(got) <= set(packets) and len(set(got)) == len(got)


def test_a_sparse_flow_is_not_held_behind_a_bulk_one(bed_of):
    bed = bed_of(1)
    bed.a.shape(0, 200_000, 0)
    bed.send([udp4(5000, 80, size=1400, seq=i) for i in range(40)])
    bed.run(0.02)
    bed.send([udp4(5001, 53, size=100, seq=999)])
    bed.run(0.02)
    got = [seq_of(p) for p in bed.received()]
    assert 999 in got
    # Out before the bulk flow's packets that were queued ahead of it.
    assert got.index(999) < 10
    assert len(got) < 40


def test_stale_copies_are_dropped_when_another_path_is_faster(bed_of):
    bed = bed_of(2)
    bed.a.shape(0, 0, 10 * MS)          # unpaced, 10 ms
    bed.a.shape(1, 100_000, 10 * MS)    # paced to 100 kB/s, 10 ms
    packets = [udp4(5000, 80, size=1000, seq=i) for i in range(100)]
    bed.send(packets)
    bed.run(0.2)
    one = bed.path(1)
    # Path 1 holds a copy at most 20 ms (the margin): the rest are stale.
    assert one["stale_dropped"] > 50
    assert one["tx_packets"] - 1 + one["stale_dropped"] + one["aqm_dropped"] == 100
    got = bed.received()
    assert sorted(got) == sorted(packets)  # all, once each, by path 0


def test_no_copy_is_stale_without_a_faster_path(bed_of):
    bed = bed_of(2)
    bed.a.shape(0, 0, 0)                # its delay unknown: down, say
    bed.a.shape(1, 400_000, 10 * MS)
    bed.send([udp4(5000, 80, size=1000, seq=i) for i in range(50)])
    bed.run(0.3)
    one = bed.path(1)
    assert one["stale_dropped"] == 0
    assert one["queue_packets"] == 0
    assert one["tx_packets"] - 1 + one["aqm_dropped"] == 50


def test_a_path_too_slow_to_be_in_time_keeps_no_queue(bed_of):
    bed = bed_of(2)
    bed.a.shape(0, 0, 10 * MS)
    bed.a.shape(1, 100_000, 200 * MS)   # 200 ms: later than 10 + 20 even at once
    bed.send([udp4(5000, 80, size=1000, seq=i) for i in range(30)])
    bed.run(0.1)
    one = bed.path(1)
    assert one["queue_packets"] == 0
    assert one["stale_dropped"] >= 25


def test_a_detached_path_drops_what_it_held(bed_of):
    bed = bed_of(2)
    bed.a.shape(1, 50_000, 0)
    bed.send([udp4(5000, 80, size=1000, seq=i) for i in range(30)])
    bed.run(0.01)
    held = bed.path(1)["queue_packets"]
    assert held > 20
    bed.a.detach(1)
    bed.send([udp4(5000, 80, size=1000, seq=100)])
    bed.run(0.01)
    assert bed.path(1)["queue_packets"] == 0
    assert bed.path(1)["stale_dropped"] == held


def test_a_path_gone_for_good_is_paced_no_more(bed_of):
    bed = bed_of(2)
    bed.a.shape(1, 50_000, 10 * MS)
    bed.send([udp4(5000, 80, size=1000, seq=i) for i in range(30)])
    bed.run(0.01)
    assert bed.path(1)["queue_packets"] > 20
    bed.a.detach(1, forget=True)
    one = bed.path(1)
    assert (one["paced_rate"], one["queue_packets"], one["queue_bytes"]) == (None, 0, 0)


def test_shape_refuses_a_path_out_of_range(bed_of):
    bed = bed_of(1)
    with pytest.raises(ValueError):
        bed.a.shape(16, 1000, 0)
    with pytest.raises(ValueError):
        bed.a.held(-1)
