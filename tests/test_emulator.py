"""The lab's path emulator, measured against its configuration: path 0 of each
bed is emulated, path 1 is a plain veth pair for comparison."""

import statistics
import struct
import threading
import time

import pytest

from multitun.lab.emulator import Impairment
from multitun.lab import Bed, latency_probe, udp_stream

from .conftest import requires_root

pytestmark = [requires_root, pytest.mark.netns]

PLAIN = Impairment()


def emulated(up: Impairment, down: Impairment = PLAIN) -> Bed:
    return Bed(2, emulate=[(up, down), None], seed=1)


def probe(bed, rate, duration, **kw):
    p0, p1 = bed.paths
    return latency_probe(bed, {"emulated": (p0.client_ip, p0.server_ip),
                               "plain": (p1.client_ip, p1.server_ip)}, rate, duration, **kw)


def test_delay_and_jitter():
    # Jitter is correlated over 20 ms, so 6 s at 200/s hold about 150
    # independent looks at it: the mean is within 1.5 ms (3.5 standard errors).
    with emulated(Impairment(delay_ms=20, jitter_ms=5, reorder=True)) as bed:
        got = [v for v in probe(bed, 200, 6)["emulated"] if v is not None]
    assert len(got) == 1200
    assert statistics.mean(got) == pytest.approx(20, abs=1.5)
    assert statistics.stdev(got) == pytest.approx(5, rel=0.3)


def test_jitter_is_correlated_in_time():
    # Datagrams sent together see nearly the same delay; far apart, unrelated.
    with emulated(Impairment(delay_ms=30, jitter_ms=10)) as bed:
        result = probe(bed, 1000, 3)["emulated"]
    close = [abs(a - b) for a, b in zip(result, result[1:]) if a is not None and b is not None]
    far = [abs(a - b) for a, b in zip(result, result[200:]) if a is not None and b is not None]
    assert statistics.median(close) < 2.0 < statistics.median(far)


def test_jitter_keeps_order_unless_told():
    # Without reorder, a datagram never overtakes the one sent before it.
    with emulated(Impairment(delay_ms=10, jitter_ms=8)) as bed:
        order = arrival_order(bed, count=1000, rate=500)
    assert len(order) == 1000 and order == sorted(order)
    with emulated(Impairment(delay_ms=10, jitter_ms=8, reorder=True)) as bed:
        order = arrival_order(bed, count=1000, rate=500)
    assert len(order) == 1000 and order != sorted(order)


def arrival_order(bed, count, rate):
    p0 = bed.paths[0]
    return [seq for seq in udp_stream(bed, bed.client, bed.server, p0.server_ip,
                                      rate=rate, count=count, quiet=0.5)]


def test_random_loss():
    with emulated(Impairment(loss_pct=10)) as bed:
        result = probe(bed, 1000, 3)
    lost = result["emulated"].count(None) / len(result["emulated"])
    assert 0.07 < lost < 0.13, lost  # Binomial(3000, 0.1): sd 0.55%
    assert result["plain"].count(None) == 0


def test_gilbert_elliott_bursts():
    p, r = 0.01, 0.25  # stationary loss p/(p+r) = 3.8%, mean burst 1/r = 4
    with emulated(Impairment(burst=(p, r))) as bed:
        result = probe(bed, 1000, 4)["emulated"]
    runs, run = [], 0
    for v in result:
        if v is None:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    lost = result.count(None) / len(result)
    assert 0.015 < lost < 0.07, lost
    assert 2.5 < statistics.mean(runs) < 6.5, runs


def test_outage_timing():
    outage = (1.5, 2.5)
    sent_ns = []
    with emulated(Impairment(outages=(outage,))) as bed:
        result = probe(bed, 200, 3.5, sent_ns=sent_ns)["emulated"]
    for v, ns in zip(result, sent_ns, strict=True):
        t = (ns - bed.emulator_start_ns) / 1e9  # when it was sent, on the emulator's clock
        if outage[0] + 0.03 < t < outage[1] - 0.03:
            assert v is None, f"datagram sent at {t:.3f}s came through the outage"
        elif t < outage[0] - 0.03 or t > outage[1] + 0.03:
            assert v is not None, f"datagram sent at {t:.3f}s lost outside the outage"


def test_rate_limit():
    with emulated(Impairment(rate_bps=10e6, queue=100)) as bed:
        p0 = bed.paths[0]
        rx = bed.socket(bed.server)
        rx.bind((p0.server_ip, 9010))
        rx.setsockopt(1, 33, 8 << 20)  # SO_RCVBUFFORCE: the reader must not be what drops
        rx.settimeout(0.5)
        received = []

        def catch():
            try:
                while True:
                    received.append((time.monotonic(), len(rx.recv(2048))))
            except TimeoutError:
                pass

        catcher = threading.Thread(target=catch)
        catcher.start()
        with bed.socket(bed.client) as tx:
            for _ in range(200):  # 20 Mbit/s offered for 2 s: twice the bottleneck
                for _ in range(25):
                    tx.sendto(bytes(1000), (p0.server_ip, 9010))
                time.sleep(0.01)
        catcher.join()
        rx.close()
    span = received[-1][0] - received[0][0]
    mbit = sum(n + 28 + 14 for _, n in received) * 8 / span / 1e6  # + IP, UDP, Ethernet
    assert mbit == pytest.approx(10, rel=0.15)


def test_zero_impairment_adds_under_50us():
    # One datagram at a time, alternating paths: the one-way delay of each
    # path alone, without the test's own threads in the way.
    with emulated(PLAIN) as bed:
        delays = {}
        with bed.socket(bed.client) as tx:
            for p in bed.paths:
                rx = bed.socket(bed.server)
                rx.bind((p.server_ip, 9012))
                rx.settimeout(1.0)
                delays[p.index] = (rx, [])
            for _ in range(1000):
                for p in bed.paths:
                    rx, got = delays[p.index]
                    tx.sendto(struct.pack("!Q", time.monotonic_ns()), (p.server_ip, 9012))
                    got.append(time.monotonic_ns() - struct.unpack("!Q", rx.recv(64))[0])
                time.sleep(0.001)
            for rx, _ in delays.values():
                rx.close()
    added_us = (statistics.median(delays[0][1]) - statistics.median(delays[1][1])) / 1000
    assert added_us < 50, f"{added_us:.0f} us"


def test_keeps_up_with_50k_packets_per_second():
    with emulated(PLAIN) as bed:
        p0 = bed.paths[0]
        rx = bed.socket(bed.server)
        rx.bind((p0.server_ip, 9011))
        rx.setsockopt(1, 33, 64 << 20)  # SO_RCVBUFFORCE: the reader must not be what drops
        rx.setblocking(False)
        count = 0

        def drain():
            nonlocal count
            try:
                while True:
                    rx.recv(2048)
                    count += 1
            except BlockingIOError:
                pass

        with bed.socket(bed.client) as tx:
            start = time.monotonic()
            for burst in range(200):  # 200 x 500 datagrams, one burst per 10 ms: 50k/s
                for _ in range(500):
                    tx.sendto(b"x" * 64, (p0.server_ip, 9011))
                drain()
                time.sleep(max(0.0, start + (burst + 1) * 0.01 - time.monotonic()))
            offered_for = time.monotonic() - start
        time.sleep(1.0)
        drain()
        rx.close()
    assert offered_for < 2.2  # the sender did offer ~50k/s
    assert count >= 0.99 * 100_000, count
