# The header codec: every datagram on a path starts with 16 bytes (version,
# type, path, flags, session, sequence; big-endian; docs/PROTOCOL.md).
# multitun/wire.py is its pure-Python twin; tests/test_codec.py runs the same
# table against both.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from ..includes.linux cimport be32toh, be64toh, htobe32, htobe64
from .constants cimport *

# What parse_header() makes of a datagram.
cdef enum:
    H_OK = 0
    H_MALFORMED = 1
    # Well formed, but of the other mode: a peer without a key while we have
    # one, or the reverse.
    H_OTHER_MODE = 2


cdef struct Header:
    uint8_t version
    uint8_t ptype
    uint8_t path
    uint32_t session
    uint64_t seq


cdef inline void put_header(uint8_t *p, uint8_t version, uint8_t ptype, uint8_t path,
                            uint32_t session, uint64_t seq) noexcept nogil:
    cdef uint32_t s = htobe32(session)
    cdef uint64_t q = htobe64(seq)
    p[0] = version
    p[1] = ptype
    p[2] = path
    p[3] = 0
    memcpy(p + 4, &s, 4)
    memcpy(p + 8, &q, 8)


cdef inline bint payload_fits(uint8_t ptype, const uint8_t *payload, size_t n) noexcept nogil:
    """What a payload in clear must be: DATA an IP packet (with IFF_NO_PI the
    TUN takes the protocol from the first nibble), probes 16..64 bytes."""
    cdef uint8_t ipver
    if ptype == T_DATA:
        if n < 1:
            return False
        ipver = payload[0] >> 4
        return (ipver == 4 and n >= 20) or (ipver == 6 and n >= 40)
    if ptype == T_PROBE or ptype == T_PROBE_REPLY:
        return PROBE_MIN_PAYLOAD <= n <= PROBE_MAX_PAYLOAD
    return False


cdef inline bint sealed_length_fits(uint8_t ptype, size_t n) noexcept nogil:
    """What can be checked of a sealed datagram before opening it: its length."""
    if ptype == T_DATA:
        return n >= HEADER_LEN + TAG_LEN + 20
    if ptype == T_PROBE or ptype == T_PROBE_REPLY:
        return (HEADER_LEN + TAG_LEN + PROBE_MIN_PAYLOAD <= n
                <= HEADER_LEN + TAG_LEN + PROBE_MAX_PAYLOAD)
    if ptype == T_HANDSHAKE_INIT:
        return n == HANDSHAKE_INIT_LEN
    if ptype == T_HANDSHAKE_RESPONSE:
        return n == HANDSHAKE_RESPONSE_LEN
    if ptype == T_HANDSHAKE_COOKIE:
        return n == HANDSHAKE_COOKIE_LEN
    if ptype == T_HANDSHAKE_RETRY:
        return n == HANDSHAKE_RETRY_LEN
    return False


cdef inline int parse_header(const uint8_t *p, size_t n, Header *h, bint keyed) noexcept nogil:
    """Validate a datagram the way wire.unpack_header does: H_OK, H_MALFORMED,
    or H_OTHER_MODE for a well-formed packet of the mode we are not in."""
    cdef uint32_t s
    cdef uint64_t q
    cdef bint fits
    if n < HEADER_LEN or p[3] != 0 or p[2] >= MAX_PATHS:
        return H_MALFORMED
    memcpy(&s, p + 4, 4)
    memcpy(&q, p + 8, 8)
    h.version = p[0]
    h.ptype = p[1]
    h.path = p[2]
    h.session = be32toh(s)
    h.seq = be64toh(q)
    if h.session == 0:
        return H_MALFORMED
    if h.version == VERSION_PLAIN:
        fits = payload_fits(h.ptype, p + HEADER_LEN, n - HEADER_LEN)
    elif h.version == VERSION_SEALED:
        fits = sealed_length_fits(h.ptype, n)
    else:
        return H_MALFORMED
    if not fits:
        return H_MALFORMED
    if (h.version == VERSION_SEALED) != keyed:
        return H_OTHER_MODE
    return H_OK
