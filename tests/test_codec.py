"""The header codec: the compiled data plane and multitun.wire must agree byte for byte."""

import pytest
from hypothesis import given, strategies as st

from multitun import _fastpath, wire

IPV4 = bytes([0x45]) + bytes(19)
IPV6 = bytes([0x60]) + bytes(39)
VALID_HEADER = wire.pack_header(wire.PacketType.DATA, 1, 0x01020304, 7)


def compiled(datagram: bytes):
    try:
        return wire.Header(*_fastpath.unpack_header(datagram))
    except ValueError:
        return None


def reference(datagram: bytes):
    try:
        return wire.unpack_header(datagram)
    except wire.MalformedPacket:
        return None


def test_constants_agree():
    assert _fastpath.CONSTANTS == {
        "VERSION": wire.VERSION, "HEADER_LEN": wire.HEADER_LEN,
        "MAX_PATHS": wire.MAX_PATHS, "T_DATA": wire.PacketType.DATA,
        "T_PROBE": wire.PacketType.PROBE, "T_PROBE_REPLY": wire.PacketType.PROBE_REPLY,
        "PROBE_MIN_PAYLOAD": wire.PROBE_MIN_PAYLOAD, "PROBE_MAX_PAYLOAD": wire.PROBE_MAX_PAYLOAD,
    }


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
    (9, bytes([2]) + VALID_HEADER[1:] + IPV4, False),          # protocol version 2
    (10, IPV4 + IPV4, False),                                  # raw IP: the original's format
    (11, VALID_HEADER[:1] + bytes([9]) + VALID_HEADER[2:] + IPV4, False),   # unknown type
    (12, VALID_HEADER[:2] + bytes([16]) + VALID_HEADER[3:] + IPV4, False),  # path 16
    (13, VALID_HEADER[:3] + bytes([1]) + VALID_HEADER[4:] + IPV4, False),   # flags set
    (14, VALID_HEADER[:4] + bytes(4) + VALID_HEADER[8:] + IPV4, False),     # session 0
    (15, wire.probe(0, 5, 1, 123), True),
    (16, wire.probe(0, 5, 1, 123)[:-1], False),                # probe payload < 8
    (17, wire.probe(0, 5, 1, 123) + bytes(56), True),          # 64-byte payload
    (18, wire.probe(0, 5, 1, 123) + bytes(57), False),         # 65-byte payload
    (19, wire.pack_header(wire.PacketType.PROBE_REPLY, 15, 1, 2**64 - 1) + bytes(8), True),
]


@pytest.mark.parametrize("number,datagram,valid", CASES, ids=[str(c[0]) for c in CASES])
def test_table(number, datagram, valid):
    assert (reference(datagram) is not None) == valid
    assert compiled(datagram) == reference(datagram)


@given(st.sampled_from(list(wire.PacketType)), st.integers(0, wire.MAX_PATHS - 1),
       st.integers(1, 2**32 - 1), st.integers(0, 2**64 - 1))
def test_pack_agrees(ptype, path, session, seq):
    packed = wire.pack_header(ptype, path, session, seq)
    assert _fastpath.pack_header(ptype, path, session, seq) == packed
    tail = IPV4 if ptype == wire.PacketType.DATA else bytes(8)
    assert compiled(packed + tail) == (ptype, path, session, seq)


@given(st.binary(max_size=80))
def test_random_bytes_agree(datagram):
    assert compiled(datagram) == reference(datagram)


@given(st.binary(min_size=16, max_size=16), st.binary(max_size=64))
def test_mutated_headers_agree(header, payload):
    # Mostly-valid headers reach the deeper checks that random bytes rarely do.
    datagram = bytes([1]) + header[1:3] + bytes(1) + header[4:] + payload
    assert compiled(datagram) == reference(datagram)
