"""Sealed mode in the data plane, no root: two keyed engines on loopback
(multitun/lab/engine_pair.py). What arrives is checked against what was sent; what is
tampered with, cut, replayed or of the other mode never reaches the TUN."""

import contextlib
import errno
import os
import socket
import time

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings, strategies as st

from multitun import _fastpath, _testing, wire
from multitun._fastpath import Engine
from multitun.ciphers import CIPHERS

from multitun.lab.engine_pair import KEY_ID, EnginePair, ipv4, listening_server, session_keys


AEADS = {CIPHERS["aes-256-gcm"]: AESGCM, CIPHERS["chacha20-poly1305"]: ChaCha20Poly1305}


@pytest.fixture(params=list(AEADS), ids=list(CIPHERS))
def pair(request):
    p = EnginePair(keyed=True, cipher=request.param)
    yield p
    p.close()


def capture(pair: EnginePair, packets: list[bytes]) -> list[bytes]:
    """Send packets from engine 0's TUN and take the sealed datagrams off the
    wire instead of giving them to engine 1."""
    pair.send(0, packets)
    pair.engines[0].run(0)
    out = []
    while True:
        try:
            out.append(pair.udp[1].recv(65536))
        except BlockingIOError:
            return out


def inject(pair: EnginePair, datagrams: list[bytes]) -> list[bytes]:
    """Datagrams to engine 1 from engine 0's address; what reaches 1's TUN."""
    for d in datagrams:
        pair.udp[0].send(d)
    pair.engines[1].run(0)
    return pair.received(1)


def test_nonce_and_tag_match_an_independent_implementation(pair):
    # The sealed datagram is the header, then the AEAD of the packet under
    # the initiator's send key, nonce = 4 zero bytes + seq big-endian,
    # associated data = the header with DATA's path byte as 0.
    packet = ipv4(1, 200)
    (datagram,) = capture(pair, [packet])
    header = wire.unpack_header(datagram)
    assert header == (wire.PacketType.DATA, 0, KEY_ID, header.seq, wire.VERSION_SEALED)
    (send, _), _ = session_keys()
    nonce = bytes(4) + header.seq.to_bytes(8, "big")
    assert AEADS[pair.cipher](send).decrypt(nonce, datagram[16:], datagram[:16]) == packet
    assert packet not in datagram


def test_aead_known_answers():
    # The GCM specification's test cases 13 and 14 (McGrew and Viega): a zero
    # 256-bit key and a zero IV, which is our nonce for sequence number 0.
    assert _testing.aead_seal(bytes(32), 0, b"", b"").hex() == "530f8afbc74536b9a963b4f1c4cb738b"
    assert _testing.aead_seal(bytes(32), 0, b"", bytes(16)).hex() == (
        "cea7403d4d606b6e074ec5d3baf39d18" "d0d1c8a799996bf0265b98b5d48ab919")


def test_chacha20_poly1305_known_answers():
    # RFC 8439, section 2.8.2 (the AEAD example) and appendix A.5 (its
    # decryption vector, whose nonce is ours for sequence 0x0102030405060708).
    chacha = CIPHERS["chacha20-poly1305"]
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one "
                 b"tip for the future, sunscreen would be it.")
    sealed = _testing.aead_nonce(True, bytes(range(0x80, 0xa0)),
                                 bytes.fromhex("070000004041424344454647"),
                                 bytes.fromhex("50515253c0c1c2c3c4c5c6c7"), plaintext, chacha)
    assert sealed.hex() == (
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb"
        "69da92728b1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad6"
        "75945585808b4831d7bc3ff4def08e4b7a9de576d26586cec64b6116" "1ae10b594f09e26a7e902ecbd0600691")
    key = bytes.fromhex("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0")
    ciphertext = bytes.fromhex(
        "64a0861575861af460f062c79be643bd5e805cfd345cf389f108670ac76c8cb24c6cfc18755d43eea09ee94e"
        "382d26b0bdb7b73c321b0100d4f03b7f355894cf332f830e710b97ce98c8a84abd0b948114ad176e008d33bd"
        "60f982b1ff37c8559797a06ef4f0ef61c186324e2b3506383606907b6a7c02b0f9f6157b53c867e4b9166c76"
        "7b804d46a59b5216cde7a4e99040c5a40433225ee282a1b0a06c523eaf4534d7f83fa1155b0047718cbc546a"
        "0d072b04b3564eea1b422273f548271a0bb2316053fa76991955ebd63159434ecebb4e466dae5a1073a67276"
        "27097a1049e617d91d361094fa68f0ff77987130305beaba2eda04df997b714d6c6f2c29a6ad5cb4022b0270"
        "9b" "eead9d67890cbb22392336fea1851f38")
    opened = _testing.aead_nonce(False, key, bytes.fromhex("000000000102030405060708"),
                                 bytes.fromhex("f33388860000000000004e91"), ciphertext, chacha)
    assert opened.startswith(b"Internet-Drafts are draft documents valid for a maximum of six")
    assert _testing.aead_open(key, 0x0102030405060708, bytes.fromhex("f33388860000000000004e91"),
                              ciphertext, chacha) == opened


@pytest.mark.parametrize("cipher", list(AEADS), ids=list(CIPHERS))
@given(key=st.binary(min_size=32, max_size=32), seq=st.integers(0, 2**64 - 1),
       ad=st.binary(max_size=32), plaintext=st.binary(max_size=2000))
def test_aead_agrees_with_cryptography(cipher, key, seq, ad, plaintext):
    nonce = bytes(4) + seq.to_bytes(8, "big")
    sealed = _testing.aead_seal(key, seq, ad, plaintext, cipher)
    assert sealed == AEADS[cipher](key).encrypt(nonce, plaintext, ad)
    assert _testing.aead_open(key, seq, ad, sealed, cipher) == plaintext


def test_sealed_packets_arrive(pair):
    packets = [ipv4(i, 100 + i) for i in range(30)]
    assert inject(pair, capture(pair, packets)) == packets


def test_every_flipped_bit_is_rejected(pair):
    packet = ipv4(2, 60)
    (datagram,) = capture(pair, [packet])
    b = pair.engines[1]
    # Flipping a header bit changes a field the receiver checks or the
    # associated data; a body bit, the ciphertext or the tag. Bit 2*8+i is
    # DATA's path byte, which is not authenticated on purpose (the sender
    # patches it per path) and selects the path the source must match.
    for bit in range(len(datagram) * 8):
        if 16 <= bit < 24:
            continue
        tampered = bytearray(datagram)
        tampered[bit // 8] ^= 1 << (bit % 8)
        assert inject(pair, [bytes(tampered)]) == [], bit
    assert b.stats()["delivered"] == 0
    assert b.stats()["auth_failed"] > 0
    # The genuine datagram still arrives: failures changed no state.
    assert inject(pair, [datagram]) == [packet]


def test_truncated_and_extended_are_rejected(pair):
    (datagram,) = capture(pair, [ipv4(3, 300)])
    cuts = [datagram[:n] for n in (0, 1, 15, 16, 31, 32, 52, len(datagram) - 1)]
    assert inject(pair, cuts + [datagram + b"\0"]) == []
    assert pair.engines[1].stats()["delivered"] == 0


def test_replays_are_dropped_reordering_is_fine(pair):
    packets = [ipv4(i, 80) for i in range(10)]
    datagrams = capture(pair, packets)
    shuffled = datagrams[5:] + datagrams[:5]
    assert inject(pair, shuffled) == packets[5:] + packets[:5]
    assert inject(pair, datagrams) == []  # every one a replay now
    assert pair.engines[1].stats()["duplicates"] == len(datagrams)


def test_other_key_gets_nothing_through():
    pair = EnginePair(keyed=True)
    try:
        a, b = pair.engines
        other = os.urandom(32)
        b.drop_keys(KEY_ID)
        b.install_keys(KEY_ID, other, other, True)
        pair.send(0, [ipv4(4)])
        pair.pump()
        assert pair.received(1) == []
        assert b.stats()["auth_failed"] == 1
        assert b.stats()["rejected_from"] == pair.udp[0].getsockname()
    finally:
        pair.close()


def test_packets_in_clear_are_refused_and_counted(pair):
    clear = wire.pack_header(wire.PacketType.DATA, 0, KEY_ID, 1) + ipv4(5)
    assert inject(pair, [clear]) == []
    assert pair.engines[1].stats()["key_mismatch"] == 1


def test_sealed_packets_to_an_engine_in_clear_are_counted():
    plain, sealed = EnginePair(), EnginePair(keyed=True)
    try:
        (datagram,) = capture(sealed, [ipv4(6)])
        assert inject(plain, [datagram]) == []
        assert plain.engines[1].stats()["key_mismatch"] == 1
    finally:
        plain.close()
        sealed.close()


def test_nothing_leaves_without_keys():
    pair = EnginePair(keyed=True)
    try:
        a, _ = pair.engines
        a.drop_keys(KEY_ID)
        pair.send(0, [ipv4(7)])
        a.run(0)
        assert a.stats()["no_key"] == 1
        assert a.send_probe(0, 1, 0) == errno.ENOKEY
        with pytest.raises(BlockingIOError):
            pair.udp[1].recv(65536)
    finally:
        pair.close()


def test_probe_reply_is_sealed_and_the_same_size(pair):
    a, b = pair.engines
    a.send_probe(0, 42, 123456789)
    probe = pair.udp[1].recv(100)
    assert len(probe) == wire.HEADER_LEN + wire.PROBE_FEEDBACK_PAYLOAD + wire.TAG_LEN
    pair.udp[0].send(probe)  # loop it back through b
    b.run(0)
    reply = pair.udp[0].recv(100)
    assert len(reply) == len(probe)
    assert wire.unpack_header(reply).type == wire.PacketType.PROBE_REPLY
    pair.udp[1].send(reply)  # and on to a, which opens it for the control plane
    a.run(0)
    ((_, path, _, datagram, source, _),) = a.take_control()
    assert wire.probe_payload(datagram) == (123456789, 42)
    # b's feedback: every byte it received on the path, the probe's too.
    assert wire.probe_feedback(datagram)[1] == b.paths()[0]["rx_bytes"] >= len(probe)
    assert source == pair.udp[1].getsockname()


def test_feedback_counts_the_copies_that_lost_the_race(pair):
    # A copy dropped before decryption (the window had its number) moves no
    # per-path counter, but it did arrive on the path: the prober's delivery
    # rate must see it, or a path whose copies always lose would look empty.
    a, b = pair.engines
    (datagram,) = capture(pair, [ipv4(3)])
    assert inject(pair, [datagram, datagram]) == [ipv4(3)]
    a.send_probe(0, 7, 1)
    probe = pair.udp[1].recv(100)
    pair.udp[0].send(probe)
    b.run(0)
    pair.udp[1].send(pair.udp[0].recv(100))
    a.run(0)
    ((_, _, _, reply, _, _),) = a.take_control()
    assert wire.probe_feedback(reply)[1] == b.paths()[0]["rx_bytes"] + len(datagram)


def test_a_replayed_probe_is_not_answered(pair):
    a, b = pair.engines
    a.send_probe(0, 1, 1)
    probe = pair.udp[1].recv(100)
    for _ in range(2):
        pair.udp[0].send(probe)
    b.run(0)
    assert pair.udp[0].recv(100)
    with pytest.raises(BlockingIOError):
        pair.udp[0].recv(100)


def test_rekey_keeps_packets_in_flight(pair):
    a, b = pair.engines
    in_flight = capture(pair, [ipv4(8)])  # sealed under the old keys
    (a_send, a_receive), (b_send, b_receive) = session_keys(os.urandom(32))
    a.install_keys(KEY_ID + 1, a_send, a_receive, True)
    b.install_keys(KEY_ID + 1, b_send, b_receive, False)  # the responder waits
    assert [k["slot"] for k in b.keys()] == ["current", "next"]
    fresh = capture(pair, [ipv4(9)])
    assert wire.unpack_header(fresh[0]).session == KEY_ID + 1
    assert inject(pair, fresh + in_flight) == [ipv4(9), ipv4(8)]
    # The first authentic packet under the new keys made them current.
    assert {k["slot"]: k["id"] for k in b.keys()} == {"current": KEY_ID + 1, "previous": KEY_ID}
    assert b.stats()["key_changes"] == 2


def test_unconfirmed_keys_are_not_used_to_send(pair):
    a, b = pair.engines
    (_, _), (b_send, b_receive) = session_keys(os.urandom(32))
    b.install_keys(KEY_ID + 7, b_send, b_receive, False)
    pair.send(1, [ipv4(10)])
    b.run(0)
    assert wire.unpack_header(pair.udp[0].recv(65536)).session == KEY_ID


SEALED_TYPES = st.sampled_from([1, 2, 3, 4, 5, 6])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_the_opener(pair, data):
    """Hostile datagrams: random bytes, valid headers with random bodies,
    and genuine datagrams mutated at random. Nothing reaches the TUN, the
    engine stays up, and a genuine datagram still gets through after."""
    genuine = capture(pair, [ipv4(data.draw(st.integers(0, 2**32 - 1)), 64)])[0]
    kind = data.draw(st.sampled_from(["random", "header", "mutated"]))
    if kind == "random":
        datagram = data.draw(st.binary(max_size=200))
    elif kind == "header":
        datagram = wire.pack_header(data.draw(SEALED_TYPES), data.draw(st.integers(0, 15)),
                                    data.draw(st.sampled_from([KEY_ID, 1, 2**32 - 1])),
                                    data.draw(st.integers(0, 2**64 - 1)), wire.VERSION_SEALED)
        datagram += data.draw(st.binary(max_size=200))
    else:
        mutated = bytearray(genuine)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(mutated) - 1))
            mutated[i] ^= data.draw(st.integers(1, 255))
        cut = data.draw(st.integers(0, len(mutated)))
        datagram = bytes(mutated[:cut] if data.draw(st.booleans()) else mutated)
    if datagram[:2] != genuine[:2] or datagram[3:] != genuine[3:]:  # not just a path byte
        assert inject(pair, [datagram]) == []
    assert inject(pair, [genuine])[-1:] == [capture_plain(genuine, pair)]


def capture_plain(datagram: bytes, pair: EnginePair) -> bytes:
    (send, _), _ = session_keys()
    seq = wire.unpack_header(datagram).seq
    return AEADS[pair.cipher](send).decrypt(bytes(4) + seq.to_bytes(8, "big"),
                                          datagram[16:], datagram[:2] + b"\0" + datagram[3:16])


def test_handshake_messages_go_up_with_where_they_came_from(pair):
    a, b = pair.engines
    init = wire.pack_header(wire.PacketType.HANDSHAKE_INIT, 0, 99, 0, wire.VERSION_SEALED)
    pair.udp[0].send(init + os.urandom(wire.HANDSHAKE_INIT_LEN - wire.HEADER_LEN))
    b.run(0)
    ((_, path, _, datagram, source, reply_to),) = b.take_control()
    assert datagram[:16] == init and source == pair.udp[0].getsockname()
    assert b.send_back(reply_to, b"answer") == 0
    assert pair.udp[0].recv(100) == b"answer"
    # Python holds a token, never an address: only tokens the engine gave out
    # answer, and only the most recent ones.
    for forged in (0, reply_to + 1, 2**64 - 1):
        with pytest.raises(ValueError):
            b.send_back(forged, b"x")
    # Many more than the engine's 1024 return addresses (a server takes them
    # from anywhere; from 60 loopback addresses, since one address's are shed
    # past 20; responses, which a server passes up for the keying to ignore,
    # since that many first messages would put it under load): the first
    # token is too old now.
    response = wire.pack_header(wire.PacketType.HANDSHAKE_RESPONSE, 0, 99, 0,
                                wire.VERSION_SEALED)
    with listening_server() as (server, address):
        tokens = []
        for i in range(60):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((f"127.0.0.{i + 2}", 0))
                for _ in range(20):
                    s.sendto(response + os.urandom(wire.HANDSHAKE_RESPONSE_LEN
                                                   - wire.HEADER_LEN), address)
            server.run(0)
            tokens += [c[5] for c in server.take_control()]
        assert len(tokens) == 1200
        assert server.send_back(tokens[-1], b"x") == 0
        with pytest.raises(ValueError):
            server.send_back(tokens[0], b"x")


def test_handshakes_from_one_source_are_shed_past_its_rate():
    # limiter.pxd: 20 at once from one address, then 10 a second; another
    # address is not held back by it.
    init = wire.pack_header(wire.PacketType.HANDSHAKE_INIT, 0, 99, 0, wire.VERSION_SEALED)
    body = os.urandom(wire.HANDSHAKE_INIT_LEN - wire.HEADER_LEN)
    with listening_server() as (server, address), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as elsewhere:
        flood.bind(("127.0.0.1", 0))
        elsewhere.bind(("127.0.0.9", 0))
        for _ in range(100):
            flood.sendto(init + body, address)
        server.run(0)
        server.run(0)
        assert len(server.take_control()) == 20 and server.stats()["handshakes_shed"] == 80
        time.sleep(0.25)  # two more a while later: 10 a second
        for _ in range(5):
            flood.sendto(init + body, address)
        server.run(0)
        assert len(server.take_control()) == 2
        # (Meanwhile the load meter, 20 a second, has room for a few more:
        # addresstoken.pxd.)
        elsewhere.sendto(init + body, address)
        server.run(0)
        assert len(server.take_control()) == 1
        assert server.stats()["handshake_retries"] == 0


def _first_messages(source: socket.socket, address: tuple, count: int) -> None:
    for _ in range(count):
        source.sendto(wire.pack_header(wire.PacketType.HANDSHAKE_INIT, 0, 99, 0,
                                       wire.VERSION_SEALED)
                      + os.urandom(wire.HANDSHAKE_INIT_LEN - wire.HEADER_LEN), address)


def test_under_load_a_first_message_must_prove_its_address():
    """addresstoken.pxd: past LOAD_BURST first messages at once from all
    sources, one without its source's token is answered in C with a RETRY and
    never reaches the control plane; sent again from there with the token, it
    does; the token is good for that address and port only."""
    with listening_server() as (server, address), contextlib.ExitStack() as stack:
        def bound(host: str) -> socket.socket:
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            s.bind((host, 0))
            s.settimeout(1)
            return s

        # Three sources' worth at once (each source's rate lets 20 through):
        # the load meter takes its burst, and the rest puts the server under
        # load and gets RETRYs.
        burst = _fastpath.LIMITS["LOAD_BURST"]
        for i in range(1, 4):
            _first_messages(bound(f"127.0.1.{i}"), address, 20)
        server.run(0)
        taken = len(server.take_control())
        assert burst <= taken < burst + 3  # the meter refills as they arrive
        assert server.stats()["handshake_retries"] == 60 - taken
        retries = 60 - taken
        client, elsewhere = bound("127.0.2.1"), bound("127.0.2.2")
        body = os.urandom(wire.HANDSHAKE_INIT_LEN - wire.HEADER_LEN)
        client.sendto(wire.pack_header(wire.PacketType.HANDSHAKE_INIT, 3, 77, 0,
                                       wire.VERSION_SEALED) + body, address)
        server.run(0)
        assert server.take_control() == []
        assert server.stats()["handshake_retries"] == retries + 1
        retry, source = client.recvfrom(100)
        assert source == address and len(retry) == wire.HANDSHAKE_RETRY_LEN < len(body)
        h = wire.unpack_header(retry)
        assert (h.type, h.path, h.session, h.version) == (
            wire.PacketType.HANDSHAKE_RETRY, 3, 77, wire.VERSION_SEALED)
        # The echo: the start of the ephemeral key, after the fingerprint.
        assert retry[wire.HEADER_LEN:] == body[wire.FINGERPRINT_LEN:][:wire.RETRY_ECHO_LEN]
        again = wire.pack_header(wire.PacketType.HANDSHAKE_INIT, 3, 77, h.seq,
                                 wire.VERSION_SEALED) + body
        client.sendto(again, address)
        server.run(0)
        ((_, _, _, datagram, _, _),) = server.take_control()
        assert datagram == again
        # Another address, or another port of the same one, with that token:
        # a RETRY of its own, nothing up.
        port_elsewhere = bound("127.0.2.1")
        for s in (elsewhere, port_elsewhere):
            s.sendto(again, address)
            server.run(0)
            assert server.take_control() == []
            theirs = wire.unpack_header(s.recvfrom(100)[0]).seq
            assert theirs not in (0, h.seq)
        assert server.stats()["handshake_retries"] == retries + 3


def test_a_token_is_not_needed_without_load():
    with listening_server() as (server, address), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.sendto(wire.pack_header(wire.PacketType.HANDSHAKE_INIT, 0, 5, 12345,
                                  wire.VERSION_SEALED)
                 + os.urandom(wire.HANDSHAKE_INIT_LEN - wire.HEADER_LEN), address)
        server.run(0)
        assert len(server.take_control()) == 1 and server.stats()["handshake_retries"] == 0


def test_keys_are_checked_on_install(pair):
    a, _ = pair.engines
    with pytest.raises(ValueError):
        a.install_keys(KEY_ID, bytes(32), bytes(32), True)  # id in use
    with pytest.raises(ValueError):
        a.install_keys(0, bytes(32), bytes(32), True)
    with pytest.raises(ValueError):
        a.install_keys(5, bytes(31), bytes(32), True)
    plain = EnginePair()
    try:
        with pytest.raises(ValueError):
            plain.engines[0].install_keys(5, bytes(32), bytes(32), True)
    finally:
        plain.close()


def test_a_replayed_copy_keeps_no_endpoint_alive():
    """A server forgets an endpoint silent for --timeout (the tunnel reads
    last_rx_ns). Copies of an old authentic datagram, replayed from that
    endpoint's address, prove nothing: they move no per-path counter and no
    liveness, and once the endpoint is forgotten they do not bring it back."""
    srv, cli = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
                for _ in range(2))
    tuns = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
    try:
        srv.bind(("127.0.0.1", 0))
        cli.bind(("127.0.0.1", 0))
        cli.connect(srv.getsockname())
        server = Engine(tuns[0][0].fileno(), [srv.fileno()], True, 0x2000, keyed=True)
        client = Engine(tuns[1][0].fileno(), [cli.fileno()], False, 0x1000, keyed=True)
        client.set_remote(0, socket.inet_aton("127.0.0.1"), srv.getsockname()[1], True)
        (c_send, c_receive), (s_send, s_receive) = session_keys()
        client.install_keys(KEY_ID, c_send, c_receive, True)
        server.install_keys(KEY_ID, s_send, s_receive, True)
        # The genuine datagrams of a probe and a packet, as the client seals them.
        records = []
        for ptype, seq, payload in ((wire.PacketType.PROBE, 1, bytes(16)),
                                    (wire.PacketType.DATA, 2, ipv4(1))):
            header = wire.pack_header(ptype, 0, KEY_ID, seq, wire.VERSION_SEALED)
            ad = header if ptype != wire.PacketType.DATA else header[:2] + b"\0" + header[3:]
            records.append(header + _testing.aead_seal(c_send, seq, ad, payload))
        for d in records:
            cli.send(d)
        server.run(0)
        (before,) = server.paths()
        assert before["active"] and before["rx_packets"] == 2
        assert tuns[0][1].recv(65536) == ipv4(1)
        time.sleep(0.01)
        for _ in range(50):
            for d in records:
                cli.send(d)
        server.run(0)
        server.run(0)  # a batch is 64 datagrams
        (after,) = server.paths()
        for key in ("rx_packets", "rx_bytes", "duplicates", "last_rx_ns"):
            assert after[key] == before[key], key
        assert server.stats()["duplicates"] == 100 and server.stats()["delivered"] == 1
        server.forget(0)
        for d in records:
            cli.send(d)
        server.run(0)
        (forgotten,) = server.paths()
        assert not forgotten["active"]
    finally:
        for s in (srv, cli, *(s for pair in tuns for s in pair)):
            s.close()
