"""TUN offloads in the data plane, no root: two engines whose "TUN" is a
datagram socketpair carrying virtio-net headers, as a TUN opened with
IFF_VNET_HDR does. A TSO segment goes in at one end; checked packets cross
the wire; one coalesced segment comes out at the other."""

import os
import socket
import struct

import pytest
from hypothesis import given, strategies as st

from multitun import _testing, wire
from multitun._fastpath import LIMITS

from multitun.lab.engine_pair import EnginePair, udp4

VNET = struct.Struct("=BBHHHH")  # struct virtio_net_hdr, host byte order
NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4 = 1, 0, 1, 4, 5


def checksum(data: bytes) -> int:
    """RFC 1071, the plain way: the reference for the data plane's."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(st.binary(max_size=3000))
def test_checksum_agrees_with_rfc1071(data):
    assert _testing.internet_checksum(data) == struct.pack("!H", checksum(data))


def pseudo(src: bytes, dst: bytes, length: int, proto: int = 6) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


V4 = (socket.inet_aton("10.42.42.2"), socket.inet_aton("10.42.42.1"))
V6 = (socket.inet_pton(socket.AF_INET6, "fd42::2"), socket.inet_pton(socket.AF_INET6, "fd42::1"))


def tcp_packet(payload: bytes, v6: bool = False, seq: int = 1000, flags: int = 0x18,
               ip_id: int = 7, partial: bool = False, options: bytes = b"") -> bytes:
    """An IPv4 or IPv6 TCP packet; its TCP checksum complete, or (partial)
    the pseudo-header sum the kernel leaves for offload."""
    src, dst = V6 if v6 else V4
    tcp_len = 20 + len(options) + len(payload)
    offset = (5 + len(options) // 4) << 4
    tcp = struct.pack("!HHIIBBHHH", 40000, 5001, seq, 77, offset, flags, 512, 0, 0) + options
    if partial:
        folded = ~checksum(pseudo(src, dst, tcp_len)) & 0xFFFF
        tcp = tcp[:16] + struct.pack("!H", folded) + tcp[18:]
    else:
        c = checksum(pseudo(src, dst, tcp_len) + tcp + payload)
        tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    if v6:
        ip = struct.pack("!IHBB", 0x60000000, tcp_len, 6, 64) + src + dst
    else:
        ip = struct.pack("!BBHHHBBH", 0x45, 0, 20 + tcp_len, ip_id, 0x4000, 64, 6, 0) + src + dst
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp + payload


def check_segment(packet: bytes, v6: bool) -> tuple[int, int, bytes]:
    """Every checksum right; (seq, flags, payload)."""
    iphl = 40 if v6 else 20
    if not v6:
        assert checksum(packet[:20]) == 0, "IPv4 header checksum"
        assert struct.unpack_from("!H", packet, 2)[0] == len(packet)
    else:
        assert struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40
    src, dst = packet[iphl - 32:iphl - 16], packet[iphl - 16:iphl]
    if not v6:
        src, dst = packet[12:16], packet[16:20]
    tcp = packet[iphl:]
    assert checksum(pseudo(src, dst, len(tcp)) + tcp) == 0, "TCP checksum"
    thl = (tcp[12] >> 4) * 4
    return struct.unpack_from("!I", tcp, 4)[0], tcp[13], tcp[thl:]


@pytest.fixture
def pair():
    p = EnginePair(vnet_hdr=True)
    yield p
    p.close()


def wire_packets(pair) -> list[bytes]:
    """What engine 0 sent, taken off the wire (engine 1 does not see it)."""
    pair.engines[0].run(0)
    out = []
    while True:
        try:
            d = pair.udp[1].recv(65536)
        except BlockingIOError:
            return out
        out.append(d)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("size", [1, 999, 1000, 1001, 30000, 64000])
def test_tso_segment_split_and_coalesced_again(pair, v6, size):
    payload = os.urandom(size)
    mss = 1000
    options = bytes([1, 1, 8, 10]) + os.urandom(8)  # NOP NOP timestamp
    big = tcp_packet(payload, v6=v6, partial=True, flags=0x18, options=options)
    hdr_len = (40 if v6 else 20) + 20 + len(options)
    pair.send(0, [VNET.pack(NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hdr_len, mss,
                            40 if v6 else 20, 16) + big])
    datagrams = wire_packets(pair)
    assert len(datagrams) == -(-size // mss)
    segments = [check_segment(d[wire.HEADER_LEN:], v6) for d in datagrams]
    assert b"".join(p for _, _, p in segments) == payload
    assert [s for s, _, _ in segments] == [1000 + i * mss for i in range(len(segments))]
    flags = [f for _, f, _ in segments]
    assert flags[-1] & 0x08 and not any(f & 0x08 for f in flags[:-1])  # PSH: last only
    if not v6:
        ids = [struct.unpack_from("!H", d, wire.HEADER_LEN + 4)[0] for d in datagrams]
        assert ids == [7 + i for i in range(len(ids))]
    # The other end coalesces them back into one segment for its TUN.
    for d in datagrams:
        pair.udp[0].send(d)
    pair.engines[1].run(0)
    (out,) = pair.received(1)
    flags_, gso_type, hdr, gso_size, start, offset = VNET.unpack_from(out)
    packet = out[VNET.size:]
    iphl = 40 if v6 else 20
    assert packet[hdr_len:] == payload
    if len(segments) == 1:
        assert (flags_, gso_type) == (0, GSO_NONE)
        check_segment(packet, v6)
        return
    assert (flags_, gso_type, hdr, gso_size, start, offset) == (
        NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hdr_len, mss, iphl, 16)
    assert struct.unpack_from("!I", packet, iphl + 4)[0] == 1000
    assert packet[iphl + 13] & 0x08  # PSH of the last
    # The checksum is left partial: the folded pseudo-header sum of the whole.
    src, dst = (packet[8:24], packet[24:40]) if v6 else (packet[12:16], packet[16:20])
    partial = ~checksum(pseudo(src, dst, len(packet) - iphl)) & 0xFFFF
    assert struct.unpack_from("!H", packet, iphl + 16)[0] == partial
    if not v6:
        assert checksum(packet[:20]) == 0 and struct.unpack_from("!H", packet, 2)[0] == len(packet)
    stats = pair.engines[1].stats()
    assert stats["gro_writes"] == 1 and stats["gro_coalesced"] == len(segments)


def test_cwr_and_fin_where_the_kernel_puts_them(pair):
    big = tcp_packet(os.urandom(2500), partial=True, flags=0x10 | 0x80 | 0x01)  # ACK CWR FIN
    pair.send(0, [VNET.pack(NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16) + big])
    flags = [check_segment(d[wire.HEADER_LEN:], False)[1] for d in wire_packets(pair)]
    assert flags == [0x10 | 0x80, 0x10, 0x10 | 0x01]


def udp_packet(payload: bytes, v6: bool) -> bytes:
    """A UDP datagram as the kernel hands over a UDP GSO segment: lengths of
    the whole, the checksum field the pseudo-header sum."""
    src, dst = V6 if v6 else V4
    length = 8 + len(payload)
    folded = ~checksum(pseudo(src, dst, length, 17)) & 0xFFFF
    udp = struct.pack("!HHHH", 40000, 5002, length & 0xFFFF, folded)
    if v6:
        return struct.pack("!IHBB", 0x60000000, length, 17, 64) + src + dst + udp + payload
    ip = struct.pack("!BBHHHBBH", 0x45, 0, (20 + length) & 0xFFFF, 9, 0, 64, 17, 0) + src + dst
    return ip + udp + payload


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_uso_segment_split(pair, v6):
    mss, payload = 1200, os.urandom(1200 * 20 + 7)
    iphl = 40 if v6 else 20
    pair.send(0, [VNET.pack(NEEDS_CSUM, GSO_UDP_L4, iphl + 8, mss, iphl, 6)
                  + udp_packet(payload, v6)])
    datagrams = [d[wire.HEADER_LEN:] for d in wire_packets(pair)]
    assert [len(d) - iphl - 8 for d in datagrams] == [mss] * 20 + [7]
    for d in datagrams:
        src, dst = (d[8:24], d[24:40]) if v6 else (d[12:16], d[16:20])
        udp = d[iphl:]
        assert struct.unpack_from("!H", udp, 4)[0] == len(udp)
        assert checksum(pseudo(src, dst, len(udp), 17) + udp) == 0, "UDP checksum"
        if not v6:
            assert checksum(d[:20]) == 0 and struct.unpack_from("!H", d, 2)[0] == len(d)
    assert b"".join(d[iphl + 8:] for d in datagrams) == payload


def test_partial_checksum_completed(pair):
    # A packet that is not a segment but whose checksum the kernel left to us.
    big = tcp_packet(b"hello", partial=True)
    pair.send(0, [VNET.pack(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16) + big])
    (d,) = wire_packets(pair)
    assert check_segment(d[wire.HEADER_LEN:], False)[2] == b"hello"


def test_what_cannot_be_coalesced_arrives_as_it_was(pair):
    a = tcp_packet(os.urandom(1000), seq=1)
    gap = tcp_packet(os.urandom(1000), seq=5000)           # not the next sequence number
    syn = tcp_packet(os.urandom(10), seq=6000, flags=0x02)  # SYN
    other = tcp_packet(os.urandom(1000), seq=1, v6=True)    # another flow
    udp = bytes([0x45]) + bytes(39)
    packets = [a, gap, syn, other, udp]
    pair.send(0, [VNET.pack(0, GSO_NONE, 0, 0, 0, 0) + p for p in packets])
    pair.pump()
    got = pair.received(1)
    assert [g[VNET.size:] for g in got] == packets
    assert all(g[:VNET.size] == bytes(VNET.size) for g in got)


def test_malformed_segment_is_dropped_and_counted(pair):
    bad = VNET.pack(NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16) + bytes([0x45]) + bytes(100)
    pair.send(0, [bad])
    assert wire_packets(pair) == []
    assert pair.engines[0].stats()["tun_gso_dropped"] == 1


def test_coalescing_stops_at_the_largest_ip_packet(pair):
    # Jumbo segments (a 9000-byte MTU): the run closes before the IPv6
    # payload length would pass 65535, and the rest starts a new one.
    mss = 8940
    payloads = [os.urandom(mss) for _ in range(9)]
    segments = [tcp_packet(p, v6=True, seq=1 + i * mss, flags=0x10) for i, p in enumerate(payloads)]
    pair.send(0, [VNET.pack(0, GSO_NONE, 0, 0, 0, 0) + s for s in segments])
    pair.pump()
    out = pair.received(1)
    assert len(out) == 2
    first = out[0][VNET.size:]
    assert struct.unpack_from("!H", first, 4)[0] == 20 + 7 * mss <= 65535
    assert b"".join(o[VNET.size + 60:] for o in out) == b"".join(payloads)


def segment_reads(count: int, size: int = 20000) -> list[bytes]:
    """``count`` TSO segments of one stream, back to back, as the device
    queues them (mss 1000)."""
    return [VNET.pack(NEEDS_CSUM, GSO_TCPV4, 40, 1000, 20, 16)
            + tcp_packet(os.urandom(size), seq=1 + i * size, partial=True)
            for i in range(count)]


def plain_read(packet: bytes) -> bytes:
    return VNET.pack(0, GSO_NONE, 0, 0, 0, 0) + packet


def test_another_flow_goes_ahead_of_a_streams_queued_segments(pair):
    # A ping queued in the device behind a stream's segments leaves in the
    # first batch, ahead of them; a packet of the stream's own flow queued
    # behind them stays behind them; every segment leaves, in order.
    ping = udp4(5000, 53, size=84)
    tail = tcp_packet(b"tail", seq=60001, partial=True)
    pair.send(0, [*segment_reads(3), plain_read(ping),
                  VNET.pack(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16) + tail])
    sent = [d[wire.HEADER_LEN:] for _ in range(8) for d in wire_packets(pair)]
    assert sent[0] == ping
    segments = [check_segment(p, False) for p in sent[1:]]
    assert [s for s, _, _ in segments] == [1 + i * 1000 for i in range(60)] + [60001]
    assert segments[-1][2] == b"tail"
    assert pair.engines[0].stats()["tun_gso_reads"] == 3


def test_packets_ahead_of_segments_take_half_a_batch_at_most(pair):
    # A flood of small packets of other flows behind the segments: the first
    # batch is half theirs and half the segments', so neither starves.
    batch = LIMITS["BATCH"]
    flood = [plain_read(udp4(6000 + i, 53, size=100)) for i in range(200)]
    pair.send(0, [*segment_reads(2), *flood])
    first = [d[wire.HEADER_LEN:] for d in wire_packets(pair)]
    assert len(first) == batch
    assert sum(1 for p in first if p[9] == 17) == batch // 2
    assert [check_segment(p, False)[0] for p in first if p[9] == 6] == [
        1 + i * 1000 for i in range(batch // 2)]
