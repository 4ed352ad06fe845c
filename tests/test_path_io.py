"""Path I/O against the kernel's own behaviour: control data cut short, and a
path whose socket buffer is full (a real qdisc holding a real queue)."""

import socket
import subprocess

import pytest

from multitun._fastpath import Engine
from multitun.lab import Bed
from multitun.lab.engine_pair import EnginePair, ipv4

from .conftest import requires_root

# Each adds a control message to every datagram received (socket(7), ip(7);
# the values are <asm-generic/socket.h>'s and <linux/in.h>'s, which Python 3.11
# lacks): SO_TIMESTAMPNS, IP_RECVTTL, IP_RECVTOS, IP_PKTINFO,
# IP_RECVORIGDSTADDR take 32 + 24 + 24 + 32 + 32 bytes, more than the engine's
# room for control data.
EXTRA_CMSGS = [(socket.SOL_SOCKET, 35), (socket.IPPROTO_IP, 12), (socket.IPPROTO_IP, 13),
               (socket.IPPROTO_IP, 8), (socket.IPPROTO_IP, 20)]


def test_truncated_control_data_is_dropped_and_counted():
    pair = EnginePair()
    try:
        for level, option in EXTRA_CMSGS:
            pair.udp[1].setsockopt(level, option, 1)
        packets = [ipv4(i) for i in range(20)]
        pair.send(0, packets)
        pair.pump()
        stats = pair.engines[1].stats()
        assert pair.received(1) == []
        assert stats["truncated"] == 20 and stats["delivered"] == 0
        # With room for what the kernel sends, the same packets go through.
        pair.udp[1].setsockopt(*EXTRA_CMSGS[0], 0)
        pair.send(0, packets)
        pair.pump()
        assert pair.received(1) == packets
    finally:
        pair.close()


@requires_root
@pytest.mark.netns
def test_socket_full_drops_are_counted_per_path():
    # Path 0 leaves through a token bucket of 1 Mbit/s with a long queue
    # (tc-tbf(8)): the socket's small send buffer fills, sendmmsg() says
    # EAGAIN, and the engine drops rather than waits, counting on that path.
    with Bed(1) as bed:
        path = bed.paths[0]
        subprocess.run(["tc", "-n", bed.client, "qdisc", "add", "dev", path.client_if, "root",
                        "tbf", "rate", "1mbit", "burst", "16k", "latency", "10s"], check=True)
        sink = bed.socket(bed.server)
        sink.bind((path.server_ip, 0))
        sock = bed.socket(bed.client)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        sock.bind((path.client_ip, 0))
        sock.connect(sink.getsockname())
        sock.setblocking(False)
        tun, app = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tun.setblocking(False)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        engine = Engine(tun.fileno(), [sock.fileno()], False, 0x1000)
        engine.set_remote(0, socket.inet_aton(path.server_ip), sink.getsockname()[1], True)
        try:
            for burst in range(10):
                for i in range(200):
                    app.send(ipv4(burst * 200 + i))
                while engine.stats()["tun_rx_packets"] < (burst + 1) * 200:
                    engine.run(0)  # a batch (64) a call
            stats, (p,) = engine.stats(), engine.paths()
            assert stats["tun_rx_packets"] == 2000
            assert p["send_dropped"] > 1000 and p["send_errors"] == 0
            assert p["tx_packets"] + p["send_dropped"] == 2000
        finally:
            for s in (tun, app, sock, sink):
                s.close()
