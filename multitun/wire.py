"""The multitun wire format, version 1 (docs/PROTOCOL.md is the normative text).

Every datagram on a path starts with this 16-byte header, all fields big-endian:

    0       1       2       3       4               8                      16
    +-------+-------+-------+-------+---------------+----------------------+
    |version| type  | path  | flags |  session (32) |  sequence (64)       |
    +-------+-------+-------+-------+---------------+----------------------+

This module is the control plane's codec and the reference the compiled data plane
(``multitun._fastpath``) is tested against; both must agree on every byte.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

VERSION = 1
HEADER_LEN = 16
# Paths are numbered 0..MAX_PATHS-1 in the header's path byte.
MAX_PATHS = 16
# Probe payloads carry at least the sender's timestamp; a reply echoes the whole
# payload, so it is never larger than the probe (no amplification).
PROBE_MIN_PAYLOAD = 8
PROBE_MAX_PAYLOAD = 64

_HEADER = struct.Struct("!BBBBIQ")
_TIMESTAMP = struct.Struct("!Q")


class PacketType(enum.IntEnum):
    DATA = 1
    PROBE = 2
    PROBE_REPLY = 3


class Header(NamedTuple):
    type: int
    path: int
    session: int
    seq: int


class MalformedPacket(ValueError):
    """A datagram that is not a valid multitun version-1 packet."""


def pack_header(type: int, path: int, session: int, seq: int) -> bytes:
    return _HEADER.pack(VERSION, type, path, 0, session, seq)


def unpack_header(datagram: bytes) -> Header:
    """Parse and validate a header; raise MalformedPacket naming the first fault."""
    if len(datagram) < HEADER_LEN:
        raise MalformedPacket("short datagram")
    version, ptype, path, flags, session, seq = _HEADER.unpack_from(datagram)
    if version != VERSION:
        raise MalformedPacket(f"version {version}")
    if ptype not in _TYPES:
        raise MalformedPacket(f"type {ptype}")
    if path >= MAX_PATHS:
        raise MalformedPacket(f"path {path}")
    if flags:
        raise MalformedPacket(f"flags {flags:#x}")
    if session == 0:
        raise MalformedPacket("session 0")
    payload = len(datagram) - HEADER_LEN
    if ptype == PacketType.DATA:
        if not _valid_ip_packet(datagram, HEADER_LEN):
            raise MalformedPacket("payload is not an IP packet")
    elif not PROBE_MIN_PAYLOAD <= payload <= PROBE_MAX_PAYLOAD:
        raise MalformedPacket(f"probe payload of {payload} bytes")
    return Header(ptype, path, session, seq)


_TYPES = frozenset(int(t) for t in PacketType)


def _valid_ip_packet(buf: bytes, offset: int) -> bool:
    # The TUN device takes the protocol from the first nibble (IFF_NO_PI), so that
    # nibble and a minimal header length are what must hold before a write.
    n = len(buf) - offset
    if n < 1:
        return False
    version = buf[offset] >> 4
    return (version == 4 and n >= 20) or (version == 6 and n >= 40)


def probe(path: int, session: int, seq: int, timestamp_ns: int) -> bytes:
    return pack_header(PacketType.PROBE, path, session, seq) + _TIMESTAMP.pack(timestamp_ns)


def probe_timestamp(datagram: bytes) -> int:
    """The sender's timestamp a probe (or its echo in a reply) carries."""
    return _TIMESTAMP.unpack_from(datagram, HEADER_LEN)[0]
