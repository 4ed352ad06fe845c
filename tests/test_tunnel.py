"""A real tunnel: TUN devices in two network namespaces joined by two veth
paths, multitun processes at both ends, real traffic through it."""

import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
from pyroute2 import IPRoute

from multitun import wire
from multitun.lab import (
    TUN_CLIENT, TUN_SERVER, TUN_SERVER6, TunnelPair, ping, tcp_throughput, tcp_transfer,
    udp_stream,
)

from .conftest import requires_root
from .test_status import status_json

pytestmark = [requires_root, pytest.mark.netns]


def test_ping_both_families(tunnel):
    bed = tunnel.bed
    for dst in (TUN_SERVER, TUN_SERVER6):
        rtts = ping(bed, bed.client, dst, count=20)
        assert None not in rtts, f"lost echo replies from {dst}: {rtts}"


@pytest.mark.parametrize("direction", ["client->server", "server->client"])
def test_tcp_transfer_intact(tunnel, direction):
    # Through the offloads: the sender's kernel hands its TUN 64 KB segments
    # that the data plane splits; the receiving end coalesces what arrives.
    bed = tunnel.bed
    data = os.urandom(24 << 20)
    if direction == "client->server":
        sender, receiver = bed.client, bed.server
        result = tcp_transfer(bed, bed.client, bed.server, TUN_SERVER, data=data)
    else:
        sender, receiver = bed.server, bed.client
        result = tcp_transfer(bed, bed.server, bed.client, TUN_CLIENT, data=data)
    assert result.received == len(data)
    assert result.received_sha256 == result.sent_sha256
    assert status_json(bed, sender)["tunnel"]["tun_gso_reads"] > 0
    assert status_json(bed, receiver)["tunnel"]["gro_writes"] > 0


def test_transfers_intact_without_offload(bed, tmp_path):
    # --no-offload: one datagram per send and receive, one packet per TUN
    # read and write; the same bytes arrive, TCP and UDP, both ways.
    with TunnelPair(bed, tmp_path, server_extra=("--no-offload",),
                    client_extra=("--no-offload",)) as pair:
        pair.wait_carrying()
        for src, dst_ns, dst in ((bed.client, bed.server, TUN_SERVER),
                                 (bed.server, bed.client, TUN_CLIENT)):
            data = os.urandom(16 << 20)
            result = tcp_transfer(bed, src, dst_ns, dst, data=data)
            assert result.received_sha256 == result.sent_sha256
            udp_intact(bed, src, dst_ns, dst)
        assert "offloads off (--no-offload)" in pair.logs("client")
        for ns in (bed.client, bed.server):
            counters = status_json(bed, ns)["tunnel"]
            assert counters["tun_gso_reads"] == counters["gro_writes"] == 0


def test_low_latency_yields_while_busy(bed, tmp_path):
    # --low-latency: an engine that does not sleep (a stream keeps it busy,
    # or it polls after a packet) lets the tasks waiting for its CPU run
    # every 0.3 ms; both ends count those yields.
    low = ("--low-latency",)
    with TunnelPair(bed, tmp_path, server_extra=low, client_extra=low) as pair:
        pair.wait_carrying()
        before = {ns: status_json(bed, ns)["tunnel"]["cpu_yields"] for ns in (bed.client, bed.server)}
        result = tcp_transfer(bed, bed.client, bed.server, TUN_SERVER, data=os.urandom(16 << 20))
        assert result.received_sha256 == result.sent_sha256
        for ns in (bed.client, bed.server):
            assert status_json(bed, ns)["tunnel"]["cpu_yields"] > before[ns]


def test_busy_engine_yields_only_with_low_latency(tunnel):
    # Without --low-latency the loop sleeps when it has nothing to do and
    # leaves sharing its CPU to the scheduler.
    result = tcp_transfer(tunnel.bed, tunnel.bed.client, tunnel.bed.server, TUN_SERVER,
                          data=os.urandom(4 << 20))
    assert result.received_sha256 == result.sent_sha256
    for ns in (tunnel.bed.client, tunnel.bed.server):
        assert status_json(tunnel.bed, ns)["tunnel"]["cpu_yields"] == 0


def test_low_latency_transfers_intact_with_the_ends_apart(bed, tmp_path):
    # --low-latency: the busy loop yields its CPU every 0.3 ms. Both ways, a
    # TCP stream through the offloads arrives whole, with each end on a CPU
    # of its own and then sharing them again.
    low = ("--low-latency",)
    with TunnelPair(bed, tmp_path, server_extra=low, client_extra=low) as pair:
        pair.wait_carrying()
        every = os.sched_getaffinity(0)
        with pair.own_cpus() as apart:
            if apart:
                ends = [os.sched_getaffinity(p.pid) for p in (pair.server, pair.client)]
                assert all(len(cpus) == 1 for cpus in ends) and ends[0] != ends[1]
            for src, dst_ns, dst in ((bed.client, bed.server, TUN_SERVER),
                                     (bed.server, bed.client, TUN_CLIENT)):
                data = os.urandom(24 << 20)
                result = tcp_transfer(bed, src, dst_ns, dst, data=data)
                assert result.received_sha256 == result.sent_sha256
        assert os.sched_getaffinity(pair.client.pid) == every
        result = tcp_transfer(bed, bed.client, bed.server, TUN_SERVER, data=os.urandom(8 << 20))
        assert result.received_sha256 == result.sent_sha256


def test_path_refusing_gso_falls_back(tunnel):
    # A path whose MTU is below the tunnel's datagrams (PPPoE, some LTE links)
    # refuses UDP GSO trains (EINVAL, or EMSGSIZE on newer kernels). That path alone drops to single datagrams, which the kernel
    # fragments; the bytes still arrive intact, both ways.
    bed = tunnel.bed
    for ns, dev in ((bed.client, "c1"), (bed.server, "s1")):
        subprocess.run(bed.command(ns, ["ip", "link", "set", dev, "mtu", "1400"]), check=True)
    for src, dst_ns, dst, side in ((bed.client, bed.server, TUN_SERVER, "client"),
                                   (bed.server, bed.client, TUN_CLIENT, "server")):
        result = tcp_transfer(bed, src, dst_ns, dst, data=os.urandom(8 << 20))
        assert result.received_sha256 == result.sent_sha256
        log = tunnel.wait_log(side, "path 1: refused a UDP GSO train of datagrams over")
        assert "path 0: refused" not in log
        # The MTU says nothing against trains of shorter datagrams (EINVAL is
        # not EIO: the device has offloads), so the path keeps them.
        path1 = next(p for p in status_json(bed, src)["paths"] if p["name"] == "path1")
        assert path1["udp_gso"] and path1["gso_fallbacks"] > 0
        assert path1["udp_gso_max"] < 1456 + wire.HEADER_LEN  # full datagrams: one by one


@pytest.mark.parametrize("direction", ["client->server", "server->client"])
def test_udp_datagrams_intact(tunnel, direction):
    # Datagrams of every size up to the MTU, each checked byte for byte: UDP
    # GSO trains (equal sizes with a shorter last one) must cut them right.
    bed = tunnel.bed
    src, dst_ns, dst = ((bed.client, bed.server, TUN_SERVER) if direction == "client->server"
                        else (bed.server, bed.client, TUN_CLIENT))
    udp_intact(bed, src, dst_ns, dst)


def udp_intact(bed, src, dst_ns, dst):
    """6000 numbered datagrams of random sizes up to 1428 bytes, in bursts;
    every one must arrive, byte for byte."""
    rng = random.Random(7)
    sizes = [rng.choice([1400, 1400, 1400, rng.randrange(4, 1429)]) for _ in range(6000)]
    sent = [struct.pack("!I", i) + rng.randbytes(n - 4) for i, n in enumerate(sizes)]
    with bed.socket(dst_ns) as rx, bed.socket(src) as tx:
        rx.bind((dst, 9002))
        big_receive_buffer(rx)
        got = []
        catcher = threading.Thread(target=lambda: got.extend(receive_all(rx, quiet=1.0)))
        catcher.start()
        for i, datagram in enumerate(sent):
            tx.sendto(datagram, (dst, 9002))
            if i % 100 == 99:
                time.sleep(0.002)  # bursts of 100: trains, without overrunning the reader
        catcher.join()
    assert sorted(got) == sorted(sent)


def test_udp_gso_sender_through_the_tunnel(tunnel):
    # An application sending with UDP_SEGMENT (udp(7)): its 60 KB train
    # reaches the TUN whole (USO), the data plane splits it, every datagram
    # arrives intact.
    bed = tunnel.bed
    with bed.socket(bed.server) as rx, bed.socket(bed.client) as tx:
        rx.bind((TUN_SERVER, 9003))
        big_receive_buffer(rx)
        tx.setsockopt(socket.SOL_UDP, 103, 1200)  # UDP_SEGMENT
        tx.connect((TUN_SERVER, 9003))
        trains = [os.urandom(1200 * 50) for _ in range(20)]
        for train in trains:
            tx.send(train)
            time.sleep(0.002)
        got = receive_all(rx, quiet=1.0)
    assert b"".join(got) == b"".join(trains)
    assert status_json(bed, bed.client)["tunnel"]["tun_gso_reads"] >= len(trains)


def test_identical_ipv6_datagrams_all_arrive(tunnel):
    # The original compared packets byte for byte and delivered 1 of 100.
    bed = tunnel.bed
    tunnel.wait_carrying(v6=True)
    with bed.socket(bed.server, socket.AF_INET6) as rx, \
            bed.socket(bed.client, socket.AF_INET6) as tx:
        rx.bind((TUN_SERVER6, 9000))
        big_receive_buffer(rx)
        payload = b"the same bytes every time".ljust(200, b"!")
        for _ in range(200):
            tx.sendto(payload, (TUN_SERVER6, 9000))
            time.sleep(0.0005)
        got = receive_all(rx, quiet=0.5)
    assert got == [payload] * 200


def big_receive_buffer(sock):
    # So that the test's reader, not the tunnel, is never what drops.
    sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # socket(7) SO_RCVBUFFORCE


def receive_all(sock, quiet):
    out = []
    while select.select([sock], [], [], quiet)[0]:
        out.append(sock.recv(65535))
    return out


def test_link_down_and_up_during_stream_loses_nothing(tunnel):
    bed = tunnel.bed
    received = []
    sender = threading.Thread(target=lambda: received.extend(  # 6 s at 500/s
        udp_stream(bed, bed.client, bed.server, TUN_SERVER, rate=500, count=3000)))
    sender.start()
    time.sleep(1.5)
    bed.set_link(bed.client, "c0", up=False)  # sends on path 0 now fail: ENETUNREACH
    time.sleep(2.0)
    bed.set_link(bed.client, "c0", up=True)
    time.sleep(1.0)
    bed.set_link(bed.server, "s1", up=False)  # and now the other path, from the far end
    time.sleep(1.0)
    bed.set_link(bed.server, "s1", up=True)
    sender.join()
    assert sorted(received) == list(range(3000)), \
        f"lost {3000 - len(set(received))}, duplicated {len(received) - len(set(received))}"
    assert tunnel.client.poll() is None and tunnel.server.poll() is None
    # Each end saw its own link go (and the client its peer's: no carrier).
    tunnel.wait_log("client", "path 0 (192.0.2.2): link down")
    tunnel.wait_log("client", "path 1 (198.51.100.2): link down")


def test_send_error_eperm_on_one_path(tunnel):
    # A firewall that rejects output makes sendmmsg fail with EPERM.
    bed = tunnel.bed
    nft(bed.client, "add table inet mt",
        "add chain inet mt output { type filter hook output priority 0; }",
        "add rule inet mt output oifname c1 udp dport 5678 drop")
    result = tcp_transfer(bed, bed.client, bed.server, TUN_SERVER, data=os.urandom(4 << 20))
    assert result.received_sha256 == result.sent_sha256
    tunnel.wait_log("client", "(last: Operation not permitted)", timeout=6)
    assert tunnel.client.poll() is None


def nft(ns, *commands):
    for c in commands:
        subprocess.run(["ip", "netns", "exec", ns, "nft", *c.split()], check=True)


def test_ten_percent_loss_on_each_path_gives_about_one_percent(tunnel):
    bed = tunnel.bed
    # Random loss on input (an output drop would be a send error instead).
    nft(bed.server, "add table inet mt",
        "add chain inet mt input { type filter hook input priority 0; }",
        "add rule inet mt input udp dport 5678 numgen random mod 100 < 10 drop")
    received = udp_stream(bed, bed.client, bed.server, TUN_SERVER, rate=2500, count=10000)
    loss = 1 - len(set(received)) / 10000
    # Each path drops 10% independently: both lose a packet 1% of the time.
    # Binomial(10000, 0.01) has sd 1%/10; 0.4%..1.8% is beyond 5 sd either way.
    assert 0.004 < loss < 0.018, f"loss {loss:.2%}"
    assert len(received) == len(set(received)), "duplicates delivered"


def test_flood_of_hostile_datagrams_changes_nothing(tunnel):
    bed = tunnel.bed
    server_tun_before = bed.link_stats(bed.server, "multitun0")["rx_packets"]
    rng = random.Random(1)
    header = wire.pack_header(wire.PacketType.DATA, 0, 0x12345678, 1)
    crafted = [b"", b"\x01", header, header + b"\x45" * 19,                # empty, short, no packet
               bytes([2]) + header[1:] + bytes(20),                       # another version
               bytes([0x45]) + bytes(40),                                 # raw IPv4 (the original)
               wire.pack_header(9, 0, 1, 1) + bytes(8)]                   # unknown type
    sent = 0
    with bed.socket(bed.client) as attacker:
        attacker.bind(("192.0.2.2", 0))  # same host as the client, another port
        for i in range(20000):
            if i % 10 < len(crafted):
                datagram = crafted[i % 10]
            else:
                datagram = rng.randbytes(rng.randrange(0, 1500))
            for dst in ("192.0.2.1", "198.51.100.1"):
                try:
                    attacker.sendto(datagram, (dst, 5678))
                    sent += 1
                except BlockingIOError:
                    pass
    time.sleep(0.5)
    assert sent > 30000
    assert bed.link_stats(bed.server, "multitun0")["rx_packets"] == server_tun_before
    assert tunnel.server.poll() is None
    # The server still knows the client, and only the client, as its peer.
    log = tunnel.wait_log("server", "path 1: peer endpoint")
    assert log.count("peer endpoint") == 2, log
    result = tcp_transfer(bed, bed.client, bed.server, TUN_SERVER, data=os.urandom(1 << 20))
    assert result.received_sha256 == result.sent_sha256


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_each_peer_restarted_in_turn(tunnel, sig):
    # Nothing is done to the other peer; the tunnel must carry again by itself.
    assert tunnel.stop_client(sig) in (0, -signal.SIGKILL)
    tunnel.start_client()
    assert tunnel.wait_carrying(timeout=5) < 5
    assert tunnel.stop_server(sig) in (0, -signal.SIGKILL)
    tunnel.start_server()
    assert tunnel.wait_carrying(timeout=5) < 5
    tunnel.wait_log("server", "peer restarted")
    tunnel.wait_log("client", "peer restarted")
    data = os.urandom(2 << 20)
    bed = tunnel.bed
    result = tcp_transfer(bed, bed.server, bed.client, TUN_CLIENT, data=data)
    assert result.received_sha256 == result.sent_sha256


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_clean_exit_removes_the_device(tunnel, sig):
    bed = tunnel.bed
    assert "multitun0" in links(bed.server)
    assert tunnel.stop_server(sig) == 0
    assert tunnel.stop_client(sig) == 0
    assert "multitun0" not in links(bed.server)
    assert "multitun0" not in links(bed.client)
    assert "Traceback" not in tunnel.logs("server") + tunnel.logs("client")


def test_data_plane_failure_ends_the_process_with_status_1(tunnel):
    # Deleting the TUN device from under the client makes its reads fail
    # (EBADFD): the data plane cannot go on. One line says so, no traceback,
    # and the process exits with status 1 (a supervisor restarts it).
    bed = tunnel.bed
    with IPRoute(netns=bed.client) as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname="multitun0")[0])
    assert tunnel.client.wait(5) == 1
    log = tunnel.logs("client")
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log
    assert "data plane stopped: " in errors[0] and "File descriptor in bad state" in errors[0]
    assert "Traceback" not in log
    assert "multitun0" not in links(bed.client)
    assert tunnel.server.poll() is None


def links(ns):
    return subprocess.run(["ip", "netns", "exec", ns, "ip", "-o", "link"],
                          capture_output=True, text=True, check=True).stdout


def test_path_down_at_start_joins_later(bed, tmp_path):
    # The client starts while path 0 has no route at all: it must start, carry
    # traffic over path 1, and take path 0 into use once it comes up.
    bed.set_link(bed.client, "c0", up=False)
    with TunnelPair(bed, tmp_path) as pair:
        pair.wait_carrying()
        bed.set_link(bed.client, "c1", up=False)
        time.sleep(0.3)
        assert ping(bed, bed.client, TUN_SERVER, count=3) == [None] * 3
        bed.set_link(bed.client, "c0", up=True)
        assert pair.wait_carrying(timeout=5) < 5
        pair.wait_log("client", "path 0 (192.0.2.2): 192.0.2.2 -> 192.0.2.1 port 5678, c0: link down")
        pair.wait_log("client", "path 0 (192.0.2.2): link up")


def test_server_on_a_wildcard_replies_from_the_address_written_to(bed, tmp_path):
    # Path 1 is addressed to a second address on the server's path-0 link; the
    # server's route back prefers the first address. Without IP_PKTINFO the
    # replies would come from 192.0.2.1 and the client's connected socket on
    # path 1 would drop them.
    with IPRoute(netns=bed.server) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="s0")[0], address="192.0.2.9", prefixlen=24)
    with IPRoute(netns=bed.client) as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="c0")[0], address="192.0.2.3", prefixlen=24)
    pair = TunnelPair(bed, tmp_path)
    pair.client_args[pair.client_args.index("-c") + 1] = "192.0.2.2:192.0.2.1,192.0.2.3:192.0.2.9"
    with pair:
        pair.wait_carrying()
        pair.stop_client()
        pair.client_args[pair.client_args.index("-c") + 1] = "192.0.2.3:192.0.2.9"
        pair.start_client()  # only the second address now: replies must come from it
        assert pair.wait_carrying(timeout=5) < 5
        data = os.urandom(1 << 20)
        result = tcp_transfer(bed, bed.server, bed.client, TUN_CLIENT, data=data)
        assert result.received_sha256 == result.sent_sha256


@pytest.mark.parametrize("tool", ["built-in"] + (["iperf3"] if shutil.which("iperf3") else []))
def test_lab_tcp_throughput(tunnel, monkeypatch, tool):
    if tool == "built-in":
        monkeypatch.setattr(shutil, "which", lambda name: None)
    bed = tunnel.bed
    assert 0.1 < tcp_throughput(bed, bed.client, bed.server, TUN_SERVER, seconds=1) < 100
