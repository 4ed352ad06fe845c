"""The compiled engine end to end without devices or root: two engines on
loopback, socketpairs for TUNs (multitun/lab/engine_pair.py), in clear and sealed.
tests/test_sealed.py has what only sealed mode does."""

import os

import pytest

from multitun import wire

from multitun._fastpath import LIMITS
from multitun.lab.engine_pair import EnginePair, ipv4, udp4
from multitun.paths import enable_udp_gro


@pytest.fixture(params=[(True, False), (False, False), (True, True), (False, True)],
                ids=["gso", "no-gso", "gso-sealed", "no-gso-sealed"])
def pair(request):
    gso, keyed = request.param
    p = EnginePair(gso=gso, keyed=keyed)
    yield p
    p.close()


@pytest.fixture
def plain_pair():
    p = EnginePair()
    yield p
    p.close()


def test_sessions_adopted_by_probes(plain_pair):
    a, b = plain_pair.engines
    assert a.peer_session == b.session and b.peer_session == a.session


def test_batch_arrives_intact_in_order(pair):
    packets = [ipv4(i, size) for i, size in enumerate([1400] * 40 + [700, 1400, 60, 1400])]
    pair.send(0, packets)
    pair.pump()
    assert pair.received(1) == packets
    stats = pair.engines[1].stats()
    assert stats["delivered"] == len(packets) and stats["duplicates"] == 0


def test_identical_packets_all_delivered(pair):
    packets = [ipv4(7)] * 50
    pair.send(0, packets)
    pair.pump()
    assert pair.received(1) == packets


def test_both_directions(pair):
    pair.send(0, [ipv4(1)])
    pair.send(1, [ipv4(2)])
    pair.pump()
    assert pair.received(1) == [ipv4(1)] and pair.received(0) == [ipv4(2)]


def test_not_an_ip_packet_never_leaves_as_one(pair):
    # Whatever the TUN hands over is sent; the receiver checks it is an IP packet.
    pair.send(0, [b"\x00" * 100, ipv4(3)])
    pair.pump()
    assert pair.received(1) == [ipv4(3)]
    assert pair.engines[1].stats()["malformed"] == 1


def test_stale_session_after_peer_restart(plain_pair):
    # A datagram of the peer's previous session is dropped, not delivered.
    a, b = plain_pair.engines
    old = wire.pack_header(wire.PacketType.DATA, 0, 0x7777, 1) + ipv4(9)
    plain_pair.udp[0].send(old)
    plain_pair.pump()
    assert plain_pair.received(1) == []
    assert b.stats()["wrong_session"] == 1


def test_random_datagrams_never_reach_the_tun(pair):
    for _ in range(500):
        pair.udp[0].send(os.urandom(int.from_bytes(os.urandom(2), "big") % 1500))
    pair.pump()
    assert pair.received(1) == []
    assert pair.engines[1].stats()["delivered"] == 0


def test_largest_packets_the_mtu_allows(pair):
    # --mtu's bounds (multitun/config.py): in clear the packet and our header
    # fill the largest UDP datagram; sealed, the tag takes 16 of it.
    largest = wire.MAX_DATAGRAM - wire.HEADER_LEN - (wire.TAG_LEN if pair.keyed else 0)
    packets = [ipv4(1, largest), ipv4(2, 1400)]
    pair.send(0, packets)
    pair.pump()
    assert pair.received(1) == packets


@pytest.mark.parametrize("keyed", [False, True], ids=["clear", "sealed"])
def test_a_sparse_flow_goes_ahead_of_a_backlog_for_the_tun(keyed):
    # A backlog of one flow in the receiving socket (UDP GRO trains of a
    # batch each), then a packet of another flow. In one turn the receiver
    # writes its share of the backlog (and one more: the flow had nothing
    # waiting yet), then the other flow's packet; the rest of the backlog
    # waits for the next turn, in order.
    share, batch = LIMITS["RX_TURN"], LIMITS["BATCH"]
    pair = EnginePair(keyed=keyed)
    try:
        enable_udp_gro(pair.udp[1])
        a, b = pair.engines
        bulk = [udp4(7000, 5001, seq=i) for i in range(share + batch)]
        pair.send(0, bulk)
        for _ in range(len(bulk) // batch):
            a.run(0)
        ping = udp4(7001, 53, size=84)
        pair.send(0, [ping])
        a.run(0)
        b.run(0)
        assert pair.received(1) == bulk[:share + 1] + [ping]
        b.run(0)
        assert pair.received(1) == bulk[share + 1:]
    finally:
        pair.close()
