"""Sealed tunnels for real (--key-file): TUN devices in network namespaces,
veth paths, multitun processes, real traffic, and an eavesdropper and an
outsider on the wire."""

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time

import pytest
from pyroute2 import IPRoute

from multitun import _fastpath, wire
from multitun.ciphers import aes_instructions
from multitun.keyfile import generate_key, load_key
from multitun.keying import fingerprint
from multitun.lab import (
    TUN_CLIENT, TUN_SERVER, TUN_SERVER6, Capture, TunnelPair, ping, tcp_transfer,
)

from multitun.lab.bed import PACKAGE_ROOT

from .conftest import requires_root
from .test_status import run_status, scrape, status_json
from .test_tunnel import udp_intact

pytestmark = [requires_root, pytest.mark.netns]

MARKER = b"multitun-marker-4f1c9a"


def key_file(tmp_path, name="key"):
    path = tmp_path / name
    path.write_text(generate_key() + "\n")
    path.chmod(0o600)
    return path


def keyed(bed, tmp_path, server_key, client_key, **kw):
    return TunnelPair(bed, tmp_path, server_extra=("--key-file", str(server_key)),
                      client_extra=("--key-file", str(client_key)), **kw)


@pytest.fixture
def sealed(bed, tmp_path):
    key = key_file(tmp_path)
    with keyed(bed, tmp_path, key, key) as pair:
        pair.wait_carrying()
        yield pair


def send_marker(bed, count=50):
    with bed.socket(bed.client) as s:
        for _ in range(count):
            s.sendto(MARKER * 10, (TUN_SERVER, 9))
            time.sleep(0.002)


def test_sealed_tunnel_carries_both_families(sealed):
    bed = sealed.bed
    for dst in (TUN_SERVER, TUN_SERVER6):
        rtts = ping(bed, bed.client, dst, count=20)
        assert None not in rtts, f"lost echo replies from {dst}: {rtts}"
    st = status_json(bed, bed.client)
    assert st["security"]["keyed"] and st["security"]["handshakes"] >= 1
    table = run_status(bed, bed.client).stdout
    cipher = "aes-256-gcm" if aes_instructions() else "chacha20-poly1305"
    assert f"sealed: {cipher} (--cipher auto), keys {st['security']['key_id']}" in table
    assert all(p["state"] == "up" for p in st["paths"])
    assert "sealed under keys from a Noise_NNpsk0 handshake" in sealed.logs("server")
    assert f"complete on path 0: {cipher}" in sealed.logs("client") or \
        f"complete on path 1: {cipher}" in sealed.logs("client")


def test_sealed_metrics(bed, tmp_path):
    key = key_file(tmp_path)
    with TunnelPair(bed, tmp_path, server_extra=("--key-file", str(key)),
                    client_extra=("--key-file", str(key), "--metrics", "127.0.0.1:9106")) as pair:
        pair.wait_carrying()
        time.sleep(0.3)
        families = scrape(bed, bed.client, "127.0.0.1:9106")
        assert families["multitun_handshakes"].samples[0].value >= 1
        assert 0 <= families["multitun_key_age_seconds"].samples[0].value < 10
        assert families["multitun_auth_failed"].samples[0].value == 0


@pytest.mark.parametrize("offload,cipher", [(True, "aes-256-gcm"), (False, "aes-256-gcm"),
                                            (True, "chacha20-poly1305")],
                         ids=["offload", "no-offload", "chacha20-poly1305"])
def test_sealed_transfers_intact_both_ways(bed, tmp_path, offload, cipher):
    key = key_file(tmp_path)
    extra = ("--cipher", cipher) + (() if offload else ("--no-offload",))
    with TunnelPair(bed, tmp_path, server_extra=("--key-file", str(key), *extra),
                    client_extra=("--key-file", str(key), *extra)) as pair:
        pair.wait_carrying()
        assert status_json(bed, bed.client)["security"]["cipher"] == cipher
        for src, dst_ns, dst in ((bed.client, bed.server, TUN_SERVER),
                                 (bed.server, bed.client, TUN_CLIENT)):
            data = os.urandom(16 << 20)
            result = tcp_transfer(bed, src, dst_ns, dst, data=data)
            assert result.received == len(data)
            assert result.received_sha256 == result.sent_sha256
            udp_intact(bed, src, dst_ns, dst)


@pytest.mark.parametrize("keyed_tunnel", [False, True], ids=["in-clear", "sealed"])
def test_marker_on_the_path(bed, tmp_path, keyed_tunnel):
    """An eavesdropper on path 0 sees the marker when the tunnel is in clear
    (so the capture works), and never when it is sealed."""
    key = key_file(tmp_path)
    extra = ("--key-file", str(key)) if keyed_tunnel else ()
    with TunnelPair(bed, tmp_path, server_extra=extra, client_extra=extra) as pair:
        pair.wait_carrying()
        with Capture(bed.client, bed.paths[0].client_if) as cap:
            send_marker(bed)
            time.sleep(0.2)
    to_server = cap.udp_payloads(bed.paths[0].server_ip, pair.port)
    assert len(to_server) >= 50  # the marker's datagrams crossed this path
    seen = any(MARKER in frame for frame in cap.frames)
    assert seen is not keyed_tunnel


def test_another_key_gets_nothing_through(bed, tmp_path):
    with keyed(bed, tmp_path, key_file(tmp_path, "a"), key_file(tmp_path, "b")) as pair:
        with pytest.raises(TimeoutError):
            pair.wait_carrying(timeout=3)
        log = pair.wait_log("server", "authentication failing", timeout=8)
        assert f"last from {bed.paths[0].client_ip}:" in log or \
            f"last from {bed.paths[1].client_ip}:" in log
        pair.wait_log("client", "no handshake answered", timeout=8)
        assert pair.server.poll() is None and pair.client.poll() is None
        st = status_json(bed, bed.server)
        assert st["security"]["handshake_auth_failed"] > 0
        assert st["tunnel"]["delivered"] == 0
        assert st["paths"] == []  # no endpoint learned from a stranger


# OpenSSL's mask for AES-NI (and PCLMULQDQ, which GCM uses with it): as on a CPU
# without them (openssl-ia32cap(3)).
NO_AES = {"OPENSSL_ia32cap": "~0x200000200000000"}


def test_auto_takes_chacha_when_one_end_lacks_aes(bed, tmp_path):
    key = key_file(tmp_path)
    with keyed(bed, tmp_path, key, key, client_env=NO_AES) as pair:
        pair.wait_carrying()
        st = status_json(bed, bed.server)
        assert st["security"]["cipher"] == "chacha20-poly1305"
        assert "AES instructions here: no" in pair.logs("client")
        result = tcp_transfer(bed, bed.client, bed.server, TUN_SERVER, data=os.urandom(4 << 20))
        assert result.received_sha256 == result.sent_sha256


def test_ciphers_insisted_on_that_differ_get_nothing_through(bed, tmp_path):
    key = key_file(tmp_path)
    with TunnelPair(bed, tmp_path,
                    server_extra=("--key-file", str(key), "--cipher", "aes-256-gcm"),
                    client_extra=("--key-file", str(key), "--cipher", "chacha20-poly1305")) as pair:
        with pytest.raises(TimeoutError):
            pair.wait_carrying(timeout=3)
        pair.wait_log("server", "handshake refused: the client insists on chacha20-poly1305, "
                                "this end on --cipher aes-256-gcm")
        log = pair.wait_log("client", "the server refuses chacha20-poly1305: it is set to "
                                      "--cipher aes-256-gcm")
        assert log.count("the server refuses") == 1  # said once, not at every retry
        assert status_json(bed, bed.server)["tunnel"]["delivered"] == 0
        assert pair.server.poll() is None and pair.client.poll() is None


def test_key_on_one_side_only_is_named_in_the_log(bed, tmp_path):
    with TunnelPair(bed, tmp_path, server_extra=("--key-file", str(key_file(tmp_path)),)) as pair:
        log = pair.wait_log("server", "in clear: the peer has no --key-file", timeout=8)
        assert "no --key-file: the tunnel is neither authenticated" in pair.logs("client")
        assert log.count("in clear: the peer") <= 3  # summarised, not one line per packet


def test_replayed_traffic_reaches_nothing(bed, tmp_path):
    """Everything the client sent on path 0, from its handshake on, replayed
    from a host elsewhere after the client has gone: nothing reaches the
    server's TUN, no endpoint moves, no keys are made, and the replaying host
    gets no reply but, for the first message that had no ticket, a cookie it
    cannot open (shorter than what it sent)."""
    key = key_file(tmp_path)
    outsider, outsider_ip, server_ip = bed.add_outsider()
    pair = keyed(bed, tmp_path, key, key)
    try:
        pair.start_server()
        with Capture(bed.client, bed.paths[0].client_if) as cap:
            pair.start_client()
            pair.wait_carrying()
            ping(bed, bed.client, TUN_SERVER, count=20)
            send_marker(bed, count=20)
            time.sleep(0.3)
        pair.stop_client()
        captured = cap.udp_payloads(bed.paths[0].server_ip, pair.port)
        kinds = {wire.unpack_header(d).type for d in captured}
        assert {wire.PacketType.HANDSHAKE_INIT, wire.PacketType.PROBE,
                wire.PacketType.DATA} <= kinds
        before = bed.link_stats(bed.server, "multitun0")["rx_packets"]
        before_status = status_json(bed, bed.server)
        ticketless = sum(1 for d in captured
                         if wire.unpack_header(d).type == wire.PacketType.HANDSHAKE_INIT)
        replies = []
        with bed.socket(outsider) as s:
            s.bind((outsider_ip, pair.port))
            for d in captured:
                s.sendto(d, (server_ip, pair.port))
            s.settimeout(1.0)
            with contextlib.suppress(socket.timeout):
                while True:
                    replies.append(s.recv(65536))
        assert all(wire.unpack_header(r).type == wire.PacketType.HANDSHAKE_COOKIE
                   and len(r) < wire.HANDSHAKE_INIT_LEN for r in replies), replies
        assert len(replies) <= ticketless
        after_status = status_json(bed, bed.server)
        assert after_status["security"]["handshakes"] == before_status["security"]["handshakes"]
        assert bed.link_stats(bed.server, "multitun0")["rx_packets"] == before
        assert after_status["tunnel"]["delivered"] == before_status["tunnel"]["delivered"]
        assert {p["remote"] for p in after_status["paths"]} == \
            {p["remote"] for p in before_status["paths"]}
        rejected = (after_status["tunnel"]["unknown_source"]
                    - before_status["tunnel"]["unknown_source"]
                    + after_status["tunnel"]["duplicates"] - before_status["tunnel"]["duplicates"]
                    + after_status["security"]["handshake_replayed"]
                    - before_status["security"]["handshake_replayed"])
        assert rejected > 0
        assert pair.server.poll() is None
    finally:
        pair.stop()


@pytest.mark.parametrize("side", ["server", "client"])
def test_sealed_tunnel_survives_a_restart(sealed, side):
    bed = sealed.bed
    getattr(sealed, f"stop_{side}")()
    getattr(sealed, f"start_{side}")()
    assert sealed.wait_carrying(timeout=10) < 8
    assert None not in ping(bed, bed.client, TUN_SERVER, count=10)


# libfaketime (Debian's faketime), which offsets the wall clock of the process
# it is preloaded into; the monotonic clock stays true.
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


@pytest.mark.parametrize("clock", ["-1d", "@1970-01-01 00:00:00"], ids=["a-day-behind", "1970"])
def test_a_client_whose_clock_is_wrong_connects(bed, tmp_path, clock):
    """A board without a battery-backed clock boots a day behind, or in 1970:
    it connects as fast as one whose clock is right, also after an earlier
    session of it that had the right time."""
    assert os.path.exists(FAKETIME), "apt-get install faketime (the README's test command does)"
    key = key_file(tmp_path)
    with keyed(bed, tmp_path, key, key) as pair:
        pair.wait_carrying()
        pair.stop_client()
        pair.client_env = {"LD_PRELOAD": FAKETIME, "FAKETIME": clock, "DONT_FAKE_MONOTONIC": "1"}
        pair.start_client()
        assert pair.wait_carrying(timeout=3) < 3
        assert status_json(bed, bed.server)["security"]["handshakes"] >= 2


# First messages of random key ids, with the server key's fingerprint (an
# onlooker sees it on the wire), as fast as one process can send them, for
# the seconds given; prints the count. "one": from the address given.
# "forged": from random addresses in 198.18.0.0/16 (RFC 2544's benchmarking
# space) through a raw socket, as a flood with forged sources comes.
_FLOOD = """
import os, socket, struct, sys, time
from multitun import _fastpath, wire
mode, source, target, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
end, fingerprint, n = time.monotonic() + float(sys.argv[5]), bytes.fromhex(sys.argv[6]), 0
rest = os.urandom(wire.HANDSHAKE_INIT_LEN - wire.HEADER_LEN - wire.FINGERPRINT_LEN)
if mode == "one":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # raw(7): IP_HDRINCL
    udp_len = 8 + wire.HANDSHAKE_INIT_LEN
    dst = socket.inet_aton(target)
while time.monotonic() < end:
    for _ in range(100):
        key_id = int.from_bytes(os.urandom(4), "big") | 1
        init = wire.pack_header(wire.PacketType.HANDSHAKE_INIT, 0, key_id, 0,
                                wire.VERSION_SEALED) + fingerprint + rest
        if mode == "one":
            s.sendto(init, (target, port))
        else:
            # The kernel fills in the IP checksum; no UDP checksum (RFC 768).
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0,
                             bytes([198, 18]) + os.urandom(2), dst)
            s.sendto(ip + struct.pack("!HHHH", 40000, port, udp_len, 0) + init, (target, 0))
    n += 100
print(n)
"""


@pytest.mark.parametrize("sources", ["one", "forged"])
def test_a_handshake_flood_from_elsewhere_slows_nothing(bed, tmp_path, sources):
    """A host elsewhere sends well-formed first messages as fast as it can for
    10 s, from its own address or from forged ones: the established tunnel's
    pings lose nothing and take under 1 ms more, and a client restarted
    meanwhile connects within 5 s. One address's flood is shed by its rate
    in the data plane; a forged one puts the server under load, and is
    answered there with RETRYs that go to the forged addresses: neither
    reaches the control plane."""
    key = key_file(tmp_path)
    outsider, outsider_ip, server_ip = bed.add_outsider()
    # The server's RETRYs to the forged addresses go out the outsider's link.
    with IPRoute(netns=bed.server) as ipr:
        ipr.route("add", dst="198.18.0.0/16", gateway=outsider_ip)
    psk = load_key(key)
    with keyed(bed, tmp_path, key, key) as pair:
        pair.wait_carrying()
        idle = ping(bed, bed.client, TUN_SERVER, count=200, interval=0.01)
        flood = bed.popen(outsider, [sys.executable, "-c", _FLOOD, sources, outsider_ip,
                                     server_ip, str(pair.port), "10",
                                     fingerprint(psk).hex()],
                          stdout=subprocess.PIPE, text=True, cwd=PACKAGE_ROOT)
        try:
            time.sleep(1)
            during = ping(bed, bed.client, TUN_SERVER, count=200, interval=0.01)
            pair.stop_client()
            pair.start_client()
            assert pair.wait_carrying(timeout=5) < 5
        finally:
            sent = int(flood.communicate(timeout=30)[0])
        assert None not in idle and None not in during, during
        added_ms = (statistics.median(during) - statistics.median(idle)) * 1e3
        st = status_json(bed, bed.server)
        shed, retries = st["tunnel"]["handshakes_shed"], st["tunnel"]["handshake_retries"]
        seen = sum(st["security"][k] for k in ("handshake_auth_failed", "handshake_rate_limited",
                                                "handshake_replayed"))
        print(f"\nflood of {sent} first messages from {sources} source(s): ping median "
              f"{statistics.median(idle) * 1e3:.3f} ms idle, "
              f"{statistics.median(during) * 1e3:.3f} ms during; {shed} shed, "
              f"{retries} RETRYs, {seen} seen by the keying")
        assert added_ms < 1.0, (statistics.median(idle), statistics.median(during))
        assert sent > 50_000
        if sources == "one":
            assert shed > sent // 2  # by its source's rate
        else:
            # Answered in C, and the keying saw only what came before the
            # load was noticed: without RETRYs, the per-source rate would
            # have let about 10 a second from each of the 1024 slots through,
            # and the keying's refusals would have gone on all along.
            assert retries > sent // 2 and seen <= 2 * _fastpath.LIMITS["LOAD_BURST"]
        assert pair.server.poll() is None
