"""A fleet on one server, for real: a server namespace and several client
namespaces, each client with two veth paths of its own, one multitun server
with a [[peer]] per client, a multitun client in each namespace."""

import contextlib
import os
import socket
import threading
import time

import pytest

from multitun import status
from multitun.lab import TUN_SERVER, TUN_SERVER6, tcp_transfer, udp_stream, wait_udp
from multitun.lab.fleet import Fleet, FleetBed, client_tun, client_tun6

from .conftest import requires_root

pytestmark = [requires_root, pytest.mark.netns]

STREAM_RATE, STREAM_COUNT = 500, 2500  # 5 s at 500 packets/s


def ask(bed, ns, dev="multitun0"):
    return status.query(dev, sock=bed.socket(ns, socket.AF_UNIX, socket.SOCK_STREAM))


def fresh(bed, settled, timeout=3.0):
    """The server's status once ``settled(status)`` holds: a fleet server
    publishes at most once a second."""
    deadline = time.monotonic() + timeout
    while not settled(st := ask(bed, bed.server)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return st


def names(st):
    return [v["name"] for v in st["peers"]]


def peer_view(st, name):
    return next(v for v in st["peers"] if v["name"] == name)


@contextlib.contextmanager
def streaming(bed, ks):
    """Clients ``ks`` each stream numbered datagrams to the server, 500 a
    second for 5 s, while the body runs (from 1 s in); after it, every one
    of them must have arrived, once."""
    results = {}

    def stream(k):
        results[k] = udp_stream(bed, bed.clients[k], bed.server, TUN_SERVER, STREAM_RATE,
                                STREAM_COUNT, port=9100 + k)

    threads = [threading.Thread(target=stream, args=(k,)) for k in ks]
    for t in threads:
        t.start()
    time.sleep(1.0)
    yield
    for t in threads:
        t.join()
    for k in ks:
        assert sorted(results[k]) == list(range(STREAM_COUNT)), f"robot{k} lost packets"


def wait_all(bed, ks, timeout=10.0):
    for k in ks:
        wait_udp(bed, bed.clients[k], bed.server, TUN_SERVER, timeout)


def checked(transfer, size):
    assert transfer.received == transfer.sent == size
    assert transfer.received_sha256 == transfer.sent_sha256


@pytest.fixture
def fleet3(tmp_path):
    with FleetBed(3) as bed, Fleet(bed, tmp_path) as fleet:
        wait_all(bed, range(3))
        yield bed, fleet


def test_each_client_reaches_the_server_and_through_it_another(fleet3):
    bed, fleet = fleet3
    data = os.urandom(4 << 20)
    for k in range(3):
        checked(tcp_transfer(bed, bed.clients[k], bed.server, TUN_SERVER, data), len(data))
        checked(tcp_transfer(bed, bed.server, bed.clients[k], client_tun(k), data), len(data))
    checked(tcp_transfer(bed, bed.clients[1], bed.server, TUN_SERVER6, data), len(data))
    checked(tcp_transfer(bed, bed.server, bed.clients[2], client_tun6(2), data), len(data))
    bed.forwarding(True)
    checked(tcp_transfer(bed, bed.clients[0], bed.clients[2], client_tun(2), data), len(data))
    checked(tcp_transfer(bed, bed.clients[2], bed.clients[1], client_tun(1), data), len(data))
    # A path that missed its probes while the transfers loaded the machine
    # is down for a moment, and up again at its next probe.
    st = fresh(bed, lambda st: all(v["delivered"] and v["paths_up"] == 2 for v in st["peers"]))
    assert names(st) == ["robot0", "robot1", "robot2"]
    for v in st["peers"]:
        assert v["paths_up"] == 2 and v["delivered"] > 0 and v["security"]["cipher"]
        assert v["source_refused"] == 0
    assert "peer robot1: client confirmed keys" in fleet.logs("server")
    table = status.render(st)
    rows = table.splitlines()[3:6]
    assert [r.split()[:2] for r in rows] == [["robot0", "2"], ["robot1", "2"], ["robot2", "2"]]
    assert "allowed 10.42.42.11/32, fd42::11/128" in status.render(st, "robot1")


def test_a_client_posing_as_another_gets_nothing_through(fleet3):
    bed, fleet = fleet3
    # Client 0 takes client 1's address on its own TUN and sends from it:
    # authentic, sealed with robot0's keys, from an address that is robot1's.
    from pyroute2 import IPRoute
    with IPRoute(netns=bed.clients[0]) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="multitun0")[0], address=client_tun(1),
                 prefixlen=32)
    with bed.socket(bed.server) as rx, bed.socket(bed.clients[0]) as tx:
        rx.bind((TUN_SERVER, 0))
        rx.settimeout(0.5)
        tx.bind((client_tun(1), 0))
        for _ in range(50):
            tx.sendto(b"posing", (TUN_SERVER, rx.getsockname()[1]))
        with pytest.raises(TimeoutError):
            rx.recv(64)
    st = fresh(bed, lambda st: peer_view(st, "robot0")["source_refused"])
    assert peer_view(st, "robot0")["source_refused"] == 50
    wait_udp(bed, bed.clients[1], bed.server, TUN_SERVER, 2)  # robot1 itself still gets through


def test_a_key_the_server_does_not_know_gets_nothing(tmp_path):
    with FleetBed(3) as bed, Fleet(bed, tmp_path) as fleet:
        wait_all(bed, range(2))
        fleet.stop_client(2)
        fleet.start_client(2, key=fleet.key("stranger"))
        received = udp_stream(bed, bed.clients[0], bed.server, TUN_SERVER, STREAM_RATE, 1000)
        assert sorted(received) == list(range(1000))
        with pytest.raises(TimeoutError):
            wait_udp(bed, bed.clients[2], bed.server, TUN_SERVER, 2)
        st = fresh(bed, lambda st: st["security"]["handshake_unknown_key"]
                   and not peer_view(st, "robot2")["paths_up"])
        assert st["security"]["handshake_unknown_key"] > 0
        assert peer_view(st, "robot2")["paths_up"] == 0
        assert peer_view(st, "robot0")["security"]["handshake_auth_failed"] == 0


def test_one_client_restarting_costs_the_others_nothing(fleet3):
    bed, fleet = fleet3
    with streaming(bed, (0, 1)):
        fleet.stop_client(2)
        fleet.start_client(2)
    wait_all(bed, [2], timeout=5)


def test_one_client_roaming_costs_no_one_anything(fleet3):
    # Client 0's first modem re-attaches with a new address while clients 0
    # and 1 stream: the server follows robot0's path from its next
    # authentic probe, and nobody loses a packet (robot0's other path
    # carries its stream meanwhile).
    bed, fleet = fleet3
    with streaming(bed, (0, 1)):
        new = bed.move(0, 0, 7)
        fleet.wait_log("server", f"peer robot0: path 0: peer endpoint {new}:")
    # The other peers' endpoints were learned once each, and never moved.
    moves = [line for line in fleet.logs("server").splitlines() if "peer endpoint" in line]
    assert sum("robot0" not in line for line in moves) == 4, moves


def test_sighup_adds_and_removes_peers_while_others_stream(tmp_path):
    with FleetBed(4) as bed, Fleet(bed, tmp_path) as fleet:
        # Four peers at first; a reload then removes robot3, whose client
        # keeps running.
        fleet.wait_log("server", "a fleet of 4 peers")  # SIGHUP is taken from here on
        fleet.write_peers({k: fleet.keys[k] for k in range(3)})
        fleet.reload()
        fleet.wait_log("server", "1 removed (robot3)")
        wait_all(bed, range(3))
        with streaming(bed, (0, 1)):
            # robot3 in, robot2 out, in one reload.
            fleet.write_peers({k: fleet.keys[k] for k in (0, 1, 3)})
            fleet.reload()
            fleet.wait_log("server", "1 added (robot3), 1 removed (robot2)")
            wait_all(bed, [3], timeout=5)
        with pytest.raises(TimeoutError):
            wait_udp(bed, bed.clients[2], bed.server, TUN_SERVER, 1.5)
        assert names(fresh(bed, lambda st: "robot3" in names(st))) == [
            "robot0", "robot1", "robot3"]
        # A bad set is refused, and the peers stay as they were.
        fleet.config.write_text(fleet.config.read_text() + '[[peer]]\nname = "robot0"\n')
        fleet.reload()
        fleet.wait_log("server", "reload refused, the peers stay as they were")
        time.sleep(1.1)  # a publish
        assert names(ask(bed, bed.server)) == ["robot0", "robot1", "robot3"]
        wait_all(bed, [0, 1, 3], timeout=2)
