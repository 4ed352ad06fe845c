"""A fleet server's data plane and its peers on loopback, without root: one
server engine with a peer per client engine, each pair under keys of its
own; routing by allowed IPs, the source check, key ids, and reloading the
peers (multitun/peers.py) on a real engine."""

import dataclasses
import ipaddress
import os
import socket
from ipaddress import ip_address, ip_interface

import pytest

from multitun._fastpath import Engine
from multitun.config import Config
from multitun.keying import ServerKeying, fingerprint
from multitun.lab.engine_pair import session_keys, udp4
from multitun.peerconfig import PeerSpec
from multitun.peers import Peers


def host(k):
    return f"10.0.0.{10 + k}"


def packed(addr):
    return ipaddress.ip_address(addr).packed


class Fleet:
    """A fleet server engine and ``n`` client engines on loopback; client
    k's inner address is host(k), its key id 0x100 + k."""

    def __init__(self, n=2):
        self.socks, self.tuns = [], []
        self.server_udp = self._udp()
        self.server = Engine(self._tun(), [self.server_udp.fileno()], True, 1, keyed=True,
                             fleet=True)
        self.clients = []
        for k in range(n):
            udp = self._udp()
            udp.connect(self.server_udp.getsockname())
            client = Engine(self._tun(), [udp.fileno()], False, 2 + k, keyed=True)
            client.set_remote(0, socket.inet_aton("127.0.0.1"),
                              self.server_udp.getsockname()[1], True)
            (c_send, c_receive), (s_send, s_receive) = session_keys(bytes([k]) * 32)
            client.install_keys(0x100 + k, c_send, c_receive, True)
            self.server.add_peer(k)
            self.server.install_keys(0x100 + k, s_send, s_receive, True, peer=k)
            self.clients.append(client)
        self.server.set_routes([(k, packed(host(k)), 32) for k in range(n)])
        for k, client in enumerate(self.clients):
            client.send_probe(0, 1, 0)  # the server learns its endpoint from it
        self.pump()

    def _udp(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        s.bind(("127.0.0.1", 0))
        self.socks.append(s)
        return s

    def _tun(self):
        inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        inner.setblocking(False)
        outer.setblocking(False)
        self.socks += [inner, outer]
        self.tuns.append(outer)
        return inner.fileno()

    def pump(self):
        for _ in range(3):
            for e in (self.server, *self.clients):
                e.run(0)
                e.take_control()

    def to_tun(self, i, packet):
        """A packet into engine i's TUN (0: the server, k + 1: client k)."""
        self.tuns[i].send(packet)

    def from_tun(self, i):
        out = []
        while True:
            try:
                out.append(self.tuns[i].recv(65536))
            except BlockingIOError:
                return out

    def close(self):
        for s in self.socks:
            s.close()


@pytest.fixture
def fleet():
    f = Fleet()
    yield f
    f.close()


def test_each_peer_gets_its_own_packets(fleet):
    to = [udp4(9, 9, 100, seq=k, src="10.0.0.1", dst=host(k)) for k in range(2)]
    fleet.to_tun(0, to[1])
    fleet.to_tun(0, to[0])
    fleet.to_tun(0, udp4(9, 9, 100, src="10.0.0.1", dst="10.0.0.99"))  # nobody's
    fleet.pump()
    assert fleet.from_tun(1) == [to[0]] and fleet.from_tun(2) == [to[1]]
    assert fleet.server.stats()["no_route"] == 1
    assert [fleet.server.peer_stats(k)["routed_packets"] for k in range(2)] == [1, 1]


def test_a_peer_sends_only_from_its_own_addresses(fleet):
    mine = udp4(9, 9, 100, src=host(0), dst="10.0.0.1")
    posing = udp4(9, 9, 100, src=host(1), dst="10.0.0.1")
    fleet.to_tun(1, mine)
    fleet.to_tun(1, posing)
    fleet.pump()
    assert fleet.from_tun(0) == [mine]
    assert fleet.server.peer_stats(0)["source_refused"] == 1
    assert fleet.server.peer_stats(0)["delivered"] == 1
    assert fleet.server.peer_stats(1)["delivered"] == 0


def test_a_key_id_is_one_peers(fleet):
    (_, _), (send, receive) = session_keys(bytes(32))
    with pytest.raises(ValueError, match="another peer's"):
        fleet.server.install_keys(0x100, send, receive, False, peer=1)
    # Peer 0 still works under it.
    fleet.to_tun(1, udp4(9, 9, 100, src=host(0), dst="10.0.0.1"))
    fleet.pump()
    assert len(fleet.from_tun(0)) == 1


def test_a_peer_leaves_only_without_routes(fleet):
    with pytest.raises(ValueError, match="still has routes"):
        fleet.server.remove_peer(1)
    fleet.server.set_routes([(0, packed(host(0)), 32)])
    fleet.server.remove_peer(1)
    fleet.to_tun(2, udp4(9, 9, 100, src=host(1), dst="10.0.0.1"))
    fleet.to_tun(0, udp4(9, 9, 100, src="10.0.0.1", dst=host(1)))
    fleet.pump()
    assert fleet.from_tun(0) == [] and fleet.from_tun(2) == []
    assert fleet.server.stats()["wrong_session"] >= 1  # its key id is nobody's now
    with pytest.raises(ValueError):
        fleet.server.peer_stats(1)


def test_the_same_prefix_for_two_peers_is_refused(fleet):
    with pytest.raises(ValueError, match="is peer 0's already"):
        fleet.server.set_routes([(0, packed(host(0)), 32), (1, packed(host(0)), 32)])
    fleet.to_tun(0, udp4(9, 9, 100, src="10.0.0.1", dst=host(1)))
    fleet.pump()
    assert len(fleet.from_tun(2)) == 1  # the table before stays


# Peers as the control plane keeps them, reloaded on a real fleet engine.

SERVER = Config(tun_addresses=(ip_interface("10.42.42.1/24"),), port=5678,
                server_listen=ip_address("0.0.0.0"))


def spec(name, key, *nets):
    return PeerSpec(name, f"/etc/multitun/{name}.key",
                    tuple(ipaddress.ip_network(n) for n in nets), key)


@pytest.fixture
def engine():
    tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    yield Engine(tun[0].fileno(), [udp.fileno()], True, 1, keyed=True, fleet=True)
    udp.close()
    for s in tun:
        s.close()


def test_a_reload_keeps_what_stays_and_renews_what_changed(engine):
    keys = [os.urandom(32) for _ in range(4)]
    a, b, c = (spec("a", keys[0], "10.0.0.10/32"), spec("b", keys[1], "10.0.0.11/32"),
               spec("c", keys[2], "10.0.0.12/32"))
    cfg = dataclasses.replace(SERVER, peers=(a, b, c))
    peers = Peers(cfg, engine, ServerKeying)
    first = {p.name: p for p in peers}
    assert sorted(p.index for p in first.values()) == [0, 1, 2]
    assert peers.by_fingerprint[fingerprint(keys[1])] is first["b"]

    # a: new allowed_ips, same key; b: a new key; c: gone; d: new.
    a2, b2, d = (spec("a", keys[0], "10.0.0.10/32", "10.0.1.0/24"), spec("b", keys[3],
                 "10.0.0.11/32"), spec("d", os.urandom(32), "10.0.0.13/32"))
    added, removed, changed = peers.apply((a2, b2, d))
    assert (added, removed, sorted(changed)) == (["d"], ["c"], ["a", "b"])
    now = {p.name: p for p in peers}
    assert now["a"] is first["a"] and now["a"].spec == a2  # the same peer, its session kept
    assert now["b"] is not first["b"]  # a new key: a new peer
    assert fingerprint(keys[1]) not in peers.by_fingerprint
    assert peers.by_fingerprint[fingerprint(keys[3])] is now["b"]
    # Slots freed by b's old self and by c are used again; the engine has
    # exactly these peers.
    assert sorted(engine.peer_indices()) == sorted(p.index for p in peers) == [0, 1, 2]


def test_status_and_metrics_name_each_peer(engine):
    from multitun import metrics, status
    from multitun.roles import ServerRole
    cfg = dataclasses.replace(SERVER, peers=(spec("robot7", os.urandom(32), "10.0.0.7/32"),
                                             spec("robot8", os.urandom(32), "10.0.0.8/32")))
    peers = Peers(cfg, engine, ServerKeying)
    role = ServerRole(cfg)
    role.start(engine, peers)
    st = status.snapshot(role, "multitun0", 0.0, engine, peers)
    assert [v["name"] for v in st["peers"]] == ["robot7", "robot8"]
    assert st["peers"][1]["allowed_ips"] == ["10.0.0.8/32"] and st["paths"] == []
    rows = status.render(st).splitlines()
    assert [r.split()[0] for r in rows[3:5]] == ["robot7", "robot8"]
    assert "allowed 10.0.0.8/32" in status.render(st, "robot8")
    with pytest.raises(status.StatusError, match="no peer 'robot9'"):
        status.render(st, "robot9")
    families = {f.name: f for f in metrics._Collector(lambda: st).collect()}
    assert {s.labels["peer"] for s in families["multitun_peer_delivered"].samples} == {
        "robot7", "robot8"}
    assert {s.labels["peer"] for s in families["multitun_handshakes"].samples} == {
        "robot7", "robot8"}
    assert families["multitun_handshake_unknown_key"].samples[0].value == 0


def test_a_fleet_raises_its_file_limit():
    # A peer whose paths are paced has a timer fd: a fleet takes the hard
    # limit as its soft one (in a child, so this process keeps its own).
    import subprocess
    import sys
    code = ("import resource; from multitun.system import fds_for; "
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)); fds_for(0); "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0]); fds_for(100); "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["64", "True"]
