"""The multitun wire format, versions 1 and 2 (docs/PROTOCOL.md is the normative text).

Every datagram on a path starts with this 16-byte header, all fields big-endian:

    0       1       2       3       4               8                      16
    +-------+-------+-------+-------+---------------+----------------------+
    |version| type  | path  | flags |  session (32) |  sequence (64)       |
    +-------+-------+-------+-------+---------------+----------------------+

Version 1 is in clear (no key). Version 2 (--key-file) seals every payload with
AES-256-GCM or ChaCha20-Poly1305 and adds handshake messages; the header stays in clear, as the
associated data.

This module is the control plane's codec and the reference the compiled data plane
(``multitun._fastpath``) is tested against; both must agree on every byte.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

VERSION_PLAIN = 1
VERSION_SEALED = 2
HEADER_LEN = 16
TAG_LEN = 16
KEY_LEN = 32
# The largest UDP payload every path can carry: 65535 less the UDP and IPv4
# headers (RFC 768, RFC 791). A sealed datagram with a full --mtu packet must fit.
MAX_DATAGRAM = 65535 - 8 - 20
# Paths are numbered 0..MAX_PATHS-1 in the header's path byte.
MAX_PATHS = 16
# Probe payloads carry the sender's timestamp and the probe's number; a reply
# echoes the whole payload, so it is never larger than the probe (no
# amplification).
PROBE_MIN_PAYLOAD = 16
PROBE_MAX_PAYLOAD = 64
# A probe this long leaves room for feedback, which the peer's reply fills
# in: when the peer received the probe (its CLOCK_MONOTONIC) and the bytes it
# has received on the path. A peer from before feedback echoes the zeros.
PROBE_FEEDBACK_PAYLOAD = 32
# Version 2 handshake messages (multitun/keying.py): the key's fingerprint
# (which peer's key a fleet server proves it with), an ephemeral public key
# and, sealed, a ticket and the cipher offer (multitun/ciphers.py); an
# ephemeral public key and, sealed, the cipher choice and a new ticket; a
# nonce and a sealed ticket (the cookie: a first message's ticket was
# missing or stale). Each answer is shorter than what it answers. A server
# under load answers a first message whose sender has not yet proved its
# address with a RETRY instead: an address token in the sequence field, and
# the first RETRY_ECHO_LEN bytes of the message's ephemeral key, so that only
# who saw the message can make a RETRY its sender takes. The sender puts the
# token in its first message's sequence field (docs/PROTOCOL.md).
NONCE_LEN = 12
TICKET_LEN = 24
FINGERPRINT_LEN = 8
HANDSHAKE_INIT_LEN = HEADER_LEN + FINGERPRINT_LEN + 32 + TICKET_LEN + 1 + TAG_LEN
HANDSHAKE_RESPONSE_LEN = HEADER_LEN + 32 + 1 + TICKET_LEN + TAG_LEN
HANDSHAKE_COOKIE_LEN = HEADER_LEN + NONCE_LEN + TICKET_LEN + TAG_LEN
RETRY_ECHO_LEN = 16
HANDSHAKE_RETRY_LEN = HEADER_LEN + RETRY_ECHO_LEN

_HEADER = struct.Struct("!BBBBIQ")
_PROBE_PAYLOAD = struct.Struct("!QQ")
_FEEDBACK = struct.Struct("!QQ")


class PacketType(enum.IntEnum):
    DATA = 1
    PROBE = 2
    PROBE_REPLY = 3
    HANDSHAKE_INIT = 4  # version 2 only
    HANDSHAKE_RESPONSE = 5  # version 2 only
    HANDSHAKE_COOKIE = 6  # version 2 only
    HANDSHAKE_RETRY = 7  # version 2 only


class Header(NamedTuple):
    type: int
    path: int
    session: int
    seq: int
    version: int = VERSION_PLAIN


class MalformedPacket(ValueError):
    """A datagram that is not a valid multitun packet."""


def pack_header(type: int, path: int, session: int, seq: int,
                version: int = VERSION_PLAIN) -> bytes:
    return _HEADER.pack(version, type, path, 0, session, seq)


def unpack_header(datagram: bytes) -> Header:
    """Parse and validate a header; raise MalformedPacket naming the first fault.
    A version-2 datagram is checked as it travels, sealed: by its length."""
    if len(datagram) < HEADER_LEN:
        raise MalformedPacket("short datagram")
    version, ptype, path, flags, session, seq = _HEADER.unpack_from(datagram)
    if version not in (VERSION_PLAIN, VERSION_SEALED):
        raise MalformedPacket(f"version {version}")
    if path >= MAX_PATHS:
        raise MalformedPacket(f"path {path}")
    if flags:
        raise MalformedPacket(f"flags {flags:#x}")
    if session == 0:
        raise MalformedPacket("session 0")
    if version == VERSION_PLAIN:
        _check_payload(ptype, datagram[HEADER_LEN:])
    else:
        _check_sealed_length(ptype, len(datagram))
    return Header(ptype, path, session, seq, version)


def peek_header(datagram: bytes) -> Header:
    """The header of a datagram the engine has already checked (and, sealed,
    opened): what it hands up to the control plane."""
    version, ptype, path, _, session, seq = _HEADER.unpack_from(datagram)
    return Header(ptype, path, session, seq, version)


def _check_payload(ptype: int, payload: bytes) -> None:
    if ptype == PacketType.DATA:
        if not _valid_ip_packet(payload):
            raise MalformedPacket("payload is not an IP packet")
    elif ptype in (PacketType.PROBE, PacketType.PROBE_REPLY):
        if not PROBE_MIN_PAYLOAD <= len(payload) <= PROBE_MAX_PAYLOAD:
            raise MalformedPacket(f"probe payload of {len(payload)} bytes")
    else:
        raise MalformedPacket(f"type {ptype}")


def _check_sealed_length(ptype: int, n: int) -> None:
    sealed = HEADER_LEN + TAG_LEN
    limits = {
        PacketType.DATA: (sealed + 20, 65535),
        PacketType.PROBE: (sealed + PROBE_MIN_PAYLOAD, sealed + PROBE_MAX_PAYLOAD),
        PacketType.PROBE_REPLY: (sealed + PROBE_MIN_PAYLOAD, sealed + PROBE_MAX_PAYLOAD),
        PacketType.HANDSHAKE_INIT: (HANDSHAKE_INIT_LEN, HANDSHAKE_INIT_LEN),
        PacketType.HANDSHAKE_RESPONSE: (HANDSHAKE_RESPONSE_LEN, HANDSHAKE_RESPONSE_LEN),
        PacketType.HANDSHAKE_COOKIE: (HANDSHAKE_COOKIE_LEN, HANDSHAKE_COOKIE_LEN),
        PacketType.HANDSHAKE_RETRY: (HANDSHAKE_RETRY_LEN, HANDSHAKE_RETRY_LEN),
    }.get(ptype)
    if limits is None:
        raise MalformedPacket(f"type {ptype}")
    if not limits[0] <= n <= limits[1]:
        raise MalformedPacket(f"sealed type {ptype} of {n} bytes")


def _valid_ip_packet(payload: bytes) -> bool:
    # The TUN device takes the protocol from the first nibble (IFF_NO_PI), so that
    # nibble and a minimal header length are what must hold before a write.
    if not payload:
        return False
    version = payload[0] >> 4
    return (version == 4 and len(payload) >= 20) or (version == 6 and len(payload) >= 40)


def probe(path: int, session: int, number: int, timestamp_ns: int) -> bytes:
    """A version-1 probe (the engine builds its own; this is the reference)."""
    return (pack_header(PacketType.PROBE, path, session, number)
            + _PROBE_PAYLOAD.pack(timestamp_ns, number))


def probe_payload(datagram: bytes) -> tuple[int, int]:
    """(timestamp_ns, number) of a probe in clear, or of its echo in a reply."""
    return _PROBE_PAYLOAD.unpack_from(datagram, HEADER_LEN)


def probe_feedback(datagram: bytes) -> tuple[int, int] | None:
    """(peer's receive time in ns, bytes the peer received on the path) that
    a probe reply in clear carries, or None if it carries none."""
    if len(datagram) < HEADER_LEN + PROBE_FEEDBACK_PAYLOAD:
        return None
    rx_ns, rx_bytes = _FEEDBACK.unpack_from(datagram, HEADER_LEN + PROBE_MIN_PAYLOAD)
    return (rx_ns, rx_bytes) if rx_ns else None
