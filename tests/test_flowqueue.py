"""A paced path's own queue (multitun/fastpath/flowqueue.pxd): sparse flows
ahead of bulk, urgent DSCP ahead of all, CoDel's drops at the times RFC 8289
gives, and overflow taken from the fattest flow."""

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multitun._testing import FLOW_SETS, FLOW_WAYS, URGENT, FairQueue
from multitun.lab.engine_pair import seq_of, udp4

MS = 1_000_000
TARGET, INTERVAL, MAXPACKET = 5 * MS, 100 * MS, 1514


def udp6(sport: int, dport: int, size: int = 1400, tclass: int = 0) -> bytes:
    ip = struct.pack("!IHBB16s16s", (6 << 28) | (tclass << 20), size - 40, 17, 64,
                     bytes(15) + b"\x01", bytes(15) + b"\x02")
    return (ip + struct.pack("!HHHH", sport, dport, size - 40, 0)).ljust(size, b".")


def test_a_sparse_flow_goes_ahead_of_a_bulk_flow():
    q = FairQueue()
    for i in range(100):
        q.enqueue(udp4(5000, 80, seq=i), 0)
    for _ in range(10):
        assert q.dequeue(MS)[22:24] == struct.pack("!H", 80)
    q.enqueue(udp4(5001, 53, size=80), 2 * MS)  # a DNS query, say
    assert q.dequeue(2 * MS)[22:24] == struct.pack("!H", 53)
    # Then the bulk flow again, in order.
    assert seq_of(q.dequeue(2 * MS)) == 10


def test_two_bulk_flows_share_by_bytes():
    q = FairQueue()
    for i in range(200):
        q.enqueue(udp4(5000, 80, size=1500, seq=i), 0)
        q.enqueue(udp4(5002, 81, size=500, seq=i), 0)
    sent = {80: 0, 81: 0}
    for _ in range(200):
        p = q.dequeue(0)
        sent[struct.unpack_from("!H", p, 22)[0]] += len(p)
    assert sent[80] == pytest.approx(sent[81], rel=0.05)


@pytest.mark.parametrize("dscp,urgent", [(46, True), (40, True), (48, True), (56, True),
                                         (34, False), (0, False), (8, False)])
def test_urgent_dscp_goes_first(dscp, urgent):
    q = FairQueue()
    for i in range(20):
        q.enqueue(udp4(5000 + i % 3, 80, seq=i), 0)
    marked = udp4(6000, 5060, size=200, tos=dscp << 2, seq=999)
    assert (q.flow_of(marked) == URGENT) is urgent
    assert (q.flow_of(udp6(6000, 5060, tclass=dscp << 2)) == URGENT) is urgent
    q.enqueue(marked, MS)
    first = q.dequeue(MS)
    assert (seq_of(first) == 999) is urgent


def test_the_urgent_band_cannot_starve_the_flows():
    # Everything marked EF by one host: the urgent band still goes first,
    # but no more than a quantum (and the packet that crosses it) between
    # two of the flows' packets.
    q = FairQueue()
    for i in range(100):
        q.enqueue(udp4(6000, 5060, size=1000, tos=46 << 2, seq=i), 0)
        q.enqueue(udp4(5000, 80, size=1000, seq=1000 + i), 0)
    out = [seq_of(q.dequeue(0)) for _ in range(100)]
    urgent = sum(1 for s in out if s < 1000)
    assert out[0] == 0 and 50 <= urgent <= 67
    # Alone, the urgent band has the path to itself.
    q = FairQueue()
    for i in range(10):
        q.enqueue(udp4(6000, 5060, size=1000, tos=46 << 2, seq=i), 0)
    assert [seq_of(q.dequeue(0)) for _ in range(10)] == list(range(10))


def test_flows_spread_over_the_sets():
    # Ports one apart must not share a set of buckets more than chance says
    # (a hash whose top bits ignore the last byte put every such pair
    # together): 64 flows in 128 sets fill about 50.
    q = FairQueue(key=12345)
    sets = {q.flow_of(udp4(40000, 9000 + i)) % FLOW_SETS for i in range(64)}
    assert len(sets) >= 40
    assert q.flow_of(udp4(40000, 9010)) % FLOW_SETS != q.flow_of(udp4(40000, 9011)) % FLOW_SETS \
        or q.flow_of(udp4(40001, 9010)) % FLOW_SETS != q.flow_of(udp4(40001, 9011)) % FLOW_SETS


def test_flows_of_one_set_keep_buckets_of_their_own():
    # Set-associative buckets: up to FLOW_WAYS flows whose tags fall in one
    # set each get a bucket, even flows that plain hashing into as many
    # buckets would put in one. The sparse one goes first, and the bulk ones
    # share the path evenly (one bucket for all would be neither).
    q = FairQueue(key=777)
    ports, want = [], None
    for port in range(1000, 65536):
        s = q.flow_of(udp4(port, 80)) % (FLOW_SETS * FLOW_WAYS)
        if want is None:
            want = s
        if s == want:
            ports.append(port)
        if len(ports) == FLOW_WAYS:
            break
    *bulk, sparse = ports
    for i in range(30):
        for port in bulk:
            q.enqueue(udp4(port, 80, seq=i), 0)
    for _ in range(2 * len(bulk)):  # each bulk flow spends its first quantum
        q.dequeue(0)
    q.enqueue(udp4(sparse, 80, size=100, seq=999), MS)
    first = q.dequeue(MS)
    assert seq_of(first) == 999 and len(first) == 100
    sent = [struct.unpack_from("!H", q.dequeue(MS), 20)[0] for _ in range(10 * len(bulk))]
    assert all(9 <= sent.count(port) <= 11 for port in bulk), sent


def test_overflow_drops_from_the_fattest_flow():
    q = FairQueue(limit_bytes=20 * 1400)
    q.enqueue(udp4(7000, 53, size=100, seq=7), 0)
    for i in range(40):
        q.enqueue(udp4(5000, 80, seq=i), 0)
    assert q.bytes <= 20 * 1400 and q.dropped == 21
    out = [q.dequeue(0) for _ in range(q.packets)]
    assert any(seq_of(p) == 7 and len(p) == 100 for p in out)
    bulk = [seq_of(p) for p in out if len(p) == 1400]
    assert bulk == list(range(21, 40))  # its oldest went


class ReferenceCoDel:
    """RFC 8289 section 5, transcribed: one queue, the Linux variant of the
    count's reuse. The standard the data plane's CoDel is held to."""

    def __init__(self):
        self.queue, self.bytes = [], 0
        self.first_above = self.drop_next = self.count = self.lastcount = 0
        self.dropping = False
        self.dropped = []

    def enqueue(self, seq, size, now):
        self.queue.append((seq, size, now))
        self.bytes += size

    def _dodequeue(self, now):
        if not self.queue:
            self.first_above = 0
            return None, False
        seq, size, stamp = self.queue.pop(0)
        self.bytes -= size
        ok = False
        if now - stamp < TARGET or self.bytes <= MAXPACKET:
            self.first_above = 0
        elif self.first_above == 0:
            self.first_above = now + INTERVAL
        elif now >= self.first_above:
            ok = True
        return seq, ok

    def _control_law(self, t):
        return t + int(INTERVAL / math.sqrt(self.count))

    def dequeue(self, now):
        p, ok = self._dodequeue(now)
        if self.dropping:
            if not ok:
                self.dropping = False
            while self.dropping and now >= self.drop_next:
                self.dropped.append(p)
                self.count += 1
                p, ok = self._dodequeue(now)
                if not ok:
                    self.dropping = False
                else:
                    self.drop_next = self._control_law(self.drop_next)
        elif ok:
            self.dropped.append(p)
            p, ok = self._dodequeue(now)
            self.dropping = True
            delta = self.count - self.lastcount
            self.count = delta if delta > 1 and now - self.drop_next < 16 * INTERVAL else 1
            self.drop_next = self._control_law(now)
            self.lastcount = self.count
        return p


def run_both(arrivals_per_ms: list[int], dequeues_per_ms: list[int]):
    """Feed one flow into both: per millisecond, that many 1400-byte packets
    in, then that many out. The sequence numbers each sent."""
    ours, ref = FairQueue(limit_bytes=1 << 40), ReferenceCoDel()  # CoDel alone
    sent_ours, sent_ref, seq = [], [], 0
    for ms, (arrive, leave) in enumerate(zip(arrivals_per_ms, dequeues_per_ms)):
        now = ms * MS
        for _ in range(arrive):
            ours.enqueue(udp4(5000, 80, seq=seq), now)
            ref.enqueue(seq, 1400, now)
            seq += 1
        for _ in range(leave):
            p = ours.dequeue(now)
            if p is not None:
                sent_ours.append(seq_of(p))
            r = ref.dequeue(now)
            if r is not None:
                sent_ref.append(r)
    return sent_ours, sent_ref, ours.dropped, ref.dropped


def test_codel_drops_when_the_reference_does():
    # 3 packets in, 2 out each ms for 2 s: a standing queue that grows; then
    # a second of 1 in, 2 out: it drains and dropping stops.
    arrivals = [3] * 2000 + [1] * 1000 + [3] * 1000
    leaves = [2] * 4000
    sent_ours, sent_ref, dropped, ref_dropped = run_both(arrivals, leaves)
    assert sent_ours == sent_ref
    assert dropped == len(ref_dropped) > 50
    # The first drop comes an interval after the sojourn went above target.
    assert 100 <= ref_dropped[0] <= 400


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=50, max_size=600),
       st.lists(st.integers(0, 3), min_size=50, max_size=600))
def test_codel_matches_the_reference_on_any_load(arrivals, leaves):
    n = min(len(arrivals), len(leaves))
    # Stretched in time so that intervals pass: each step is a millisecond.
    sent_ours, sent_ref, dropped, ref_dropped = run_both(arrivals[:n] * 4, leaves[:n] * 4)
    assert sent_ours == sent_ref
    assert dropped == len(ref_dropped)
