"""The header codec: the compiled data plane and multitun.wire must agree byte for byte."""

import pytest
from hypothesis import given, strategies as st

from multitun import _fastpath, _testing, ciphers, config, wire

IPV4 = bytes([0x45]) + bytes(19)
IPV6 = bytes([0x60]) + bytes(39)
VALID_HEADER = wire.pack_header(wire.PacketType.DATA, 1, 0x01020304, 7)


def SEALED(ptype: int) -> bytes:
    return wire.pack_header(ptype, 2, 0x0A0B0C0D, 9, wire.VERSION_SEALED)


def compiled(datagram: bytes):
    try:
        return wire.Header(*_testing.unpack_header(datagram))
    except ValueError:
        return None


def reference(datagram: bytes):
    try:
        return wire.unpack_header(datagram)
    except wire.MalformedPacket:
        return None


def test_constants_agree():
    assert _fastpath.CONSTANTS == {
        "VERSION_PLAIN": wire.VERSION_PLAIN, "VERSION_SEALED": wire.VERSION_SEALED,
        "HEADER_LEN": wire.HEADER_LEN,
        "MAX_PATHS": wire.MAX_PATHS, "T_DATA": wire.PacketType.DATA,
        "T_PROBE": wire.PacketType.PROBE, "T_PROBE_REPLY": wire.PacketType.PROBE_REPLY,
        "T_HANDSHAKE_INIT": wire.PacketType.HANDSHAKE_INIT,
        "T_HANDSHAKE_RESPONSE": wire.PacketType.HANDSHAKE_RESPONSE,
        "PROBE_MIN_PAYLOAD": wire.PROBE_MIN_PAYLOAD, "PROBE_MAX_PAYLOAD": wire.PROBE_MAX_PAYLOAD,
        "PROBE_FEEDBACK_PAYLOAD": wire.PROBE_FEEDBACK_PAYLOAD,
        "KEY_LEN": wire.KEY_LEN, "TAG_LEN": wire.TAG_LEN,
        "HANDSHAKE_INIT_LEN": wire.HANDSHAKE_INIT_LEN,
        "HANDSHAKE_RESPONSE_LEN": wire.HANDSHAKE_RESPONSE_LEN,
        "HANDSHAKE_COOKIE_LEN": wire.HANDSHAKE_COOKIE_LEN,
        "T_HANDSHAKE_COOKIE": wire.PacketType.HANDSHAKE_COOKIE, "TICKET_LEN": wire.TICKET_LEN,
        "FINGERPRINT_LEN": wire.FINGERPRINT_LEN, "MAX_DATAGRAM": wire.MAX_DATAGRAM,
        "T_HANDSHAKE_RETRY": wire.PacketType.HANDSHAKE_RETRY,
        "HANDSHAKE_RETRY_LEN": wire.HANDSHAKE_RETRY_LEN, "RETRY_ECHO_LEN": wire.RETRY_ECHO_LEN,
    }


def test_peer_limit_agrees():
    assert _fastpath.LIMITS["MAX_PEERS"] == config.MAX_PEERS


def test_cipher_numbers_agree():
    assert _fastpath.CIPHERS == ciphers.CIPHERS


def test_layout():
    h = wire.pack_header(wire.PacketType.PROBE, 3, 0xDEADBEEF, 0x0102030405060708)
    assert h == bytes.fromhex("01020300deadbeef0102030405060708")
    assert len(h) == wire.HEADER_LEN == 16


CASES = [
    # (number, datagram, valid)
    (1, b"", False),
    (2, VALID_HEADER[:15], False),
    (3, VALID_HEADER, False),                                  # data with no packet
    (4, VALID_HEADER + IPV4, True),
    (5, VALID_HEADER + IPV6, True),
    (6, VALID_HEADER + IPV4[:19], False),                      # short IPv4 header
    (7, VALID_HEADER + IPV6[:39], False),                      # short IPv6 header
    (8, VALID_HEADER + bytes([0x55]) + bytes(40), False),      # IP version 5
    (9, bytes([3]) + VALID_HEADER[1:] + IPV4, False),          # protocol version 3
    (10, IPV4 + IPV4, False),                                  # raw IP: the original's format
    (11, VALID_HEADER[:1] + bytes([9]) + VALID_HEADER[2:] + IPV4, False),   # unknown type
    (12, VALID_HEADER[:2] + bytes([16]) + VALID_HEADER[3:] + IPV4, False),  # path 16
    (13, VALID_HEADER[:3] + bytes([1]) + VALID_HEADER[4:] + IPV4, False),   # flags set
    (14, VALID_HEADER[:4] + bytes(4) + VALID_HEADER[8:] + IPV4, False),     # session 0
    (15, wire.probe(0, 5, 1, 123), True),
    (16, wire.probe(0, 5, 1, 123)[:-1], False),                # probe payload < 16
    (17, wire.probe(0, 5, 1, 123) + bytes(48), True),          # 64-byte payload
    (18, wire.probe(0, 5, 1, 123) + bytes(49), False),         # 65-byte payload
    (19, wire.pack_header(wire.PacketType.PROBE_REPLY, 15, 1, 2**64 - 1) + bytes(16), True),
    (20, wire.pack_header(wire.PacketType.HANDSHAKE_INIT, 0, 1, 0) + bytes(56), False),  # v1
    # Version 2, sealed: judged by length until opened.
    (21, SEALED(wire.PacketType.DATA) + bytes(20 + 16), True),
    (22, SEALED(wire.PacketType.DATA) + bytes(19 + 16), False),      # too short for IP
    (23, SEALED(wire.PacketType.PROBE) + bytes(16 + 16), True),
    (24, SEALED(wire.PacketType.PROBE) + bytes(15 + 16), False),
    (25, SEALED(wire.PacketType.PROBE_REPLY) + bytes(64 + 16), True),
    (26, SEALED(wire.PacketType.PROBE_REPLY) + bytes(65 + 16), False),
    (27, SEALED(wire.PacketType.HANDSHAKE_INIT) + bytes(81), True),
    (28, SEALED(wire.PacketType.HANDSHAKE_INIT) + bytes(82), False),  # exact sizes only
    (29, SEALED(wire.PacketType.HANDSHAKE_RESPONSE) + bytes(73), True),
    (30, SEALED(wire.PacketType.HANDSHAKE_RESPONSE) + bytes(81), False),
    (31, SEALED(8) + bytes(48), False),                                # unknown type
    (32, SEALED(wire.PacketType.HANDSHAKE_COOKIE) + bytes(52), True),
    (33, SEALED(wire.PacketType.HANDSHAKE_COOKIE) + bytes(51), False),
    (34, SEALED(wire.PacketType.HANDSHAKE_RETRY) + bytes(16), True),
    (35, SEALED(wire.PacketType.HANDSHAKE_RETRY) + bytes(17), False),
    (36, wire.pack_header(wire.PacketType.HANDSHAKE_RETRY, 0, 1, 5) + bytes(16), False),  # v1
]


@pytest.mark.parametrize("number,datagram,valid", CASES, ids=[str(c[0]) for c in CASES])
def test_table(number, datagram, valid):
    assert (reference(datagram) is not None) == valid
    assert compiled(datagram) == reference(datagram)


@given(st.sampled_from([wire.PacketType.DATA, wire.PacketType.PROBE,
                        wire.PacketType.PROBE_REPLY]), st.integers(0, wire.MAX_PATHS - 1),
       st.integers(1, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_pack_agrees(ptype, path, session, seq):
    packed = wire.pack_header(ptype, path, session, seq)
    assert _testing.pack_header(ptype, path, session, seq) == packed
    tail = IPV4 if ptype == wire.PacketType.DATA else bytes(16)
    assert compiled(packed + tail) == (ptype, path, session, seq, wire.VERSION_PLAIN)


@given(st.binary(max_size=80))
def test_random_bytes_agree(datagram):
    assert compiled(datagram) == reference(datagram)


@given(st.sampled_from([1, 2]), st.binary(min_size=16, max_size=16), st.binary(max_size=100))
def test_mutated_headers_agree(version, header, payload):
    # Mostly-valid headers reach the deeper checks that random bytes rarely do.
    datagram = bytes([version, header[1] % 7]) + header[2:3] + bytes(1) + header[4:] + payload
    assert compiled(datagram) == reference(datagram)
