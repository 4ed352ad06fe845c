# How many handshake messages each source may send up to the control plane:
# a flood from one address (or one IPv6 /64) is shed here, in C, before it
# costs Python anything, and a client at another address still gets through.
# Sources share 1024 slots by a keyed hash (the key drawn at start, so a
# sender cannot aim at another's slot). Each slot is a GCRA (the "virtual
# scheduling" form of a token bucket, ITU-T I.371): one 64-bit time each.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from ..includes.linux cimport AF_INET, AF_INET6, sockaddr_in, sockaddr_in6, sockaddr_storage

cdef enum:
    LIMITER_SLOT_BITS = 10
    LIMITER_SLOTS = 1 << LIMITER_SLOT_BITS
    # Per source: 10 a second, 20 at once (a client's first message goes on
    # each of its paths, and again after a cookie).
    LIMITER_INTERVAL_NS = 100000000
    LIMITER_BURST = 20


cdef struct SourceLimiter:
    uint64_t key
    # When each slot's next message is due on its schedule (its "theoretical
    # arrival time").
    uint64_t due[LIMITER_SLOTS]


cdef inline uint64_t source_of(const sockaddr_storage *a) noexcept nogil:
    """The sender as 64 bits: an IPv4 address (also when v4-mapped), or an
    IPv6 address's /64."""
    cdef const uint8_t *ip
    cdef uint32_t v4 = 0
    cdef uint64_t v6 = 0
    if a.ss_family == AF_INET:
        memcpy(&v4, &(<const sockaddr_in *>a).sin_addr, 4)
        return v4
    if a.ss_family == AF_INET6:
        ip = <const uint8_t *>&(<const sockaddr_in6 *>a).sin6_addr
        memcpy(&v6, ip, 8)
        # ::ffff:a.b.c.d (RFC 4291 2.5.5.2): 80 zero bits, 16 one bits.
        if v6 == 0 and ip[8] == 0 and ip[9] == 0 and ip[10] == 0xff and ip[11] == 0xff:
            memcpy(&v4, ip + 12, 4)
            return v4
        return v6
    return 0


cdef inline bint limiter_allow(SourceLimiter *l, const sockaddr_storage *from_,
                               uint64_t now) noexcept nogil:
    """Whether this source may send one more now (and count it if so)."""
    # Fibonacci hashing (Knuth, TAOCP 6.4): the product's top bits depend on
    # every bit of the source; its low ones only on the source's low ones.
    cdef uint64_t h = (source_of(from_) ^ l.key) * 0x9E3779B97F4A7C15ULL
    cdef uint64_t *due = &l.due[h >> (64 - LIMITER_SLOT_BITS)]
    if due[0] < now:
        due[0] = now
    if due[0] - now > <uint64_t>(LIMITER_BURST - 1) * LIMITER_INTERVAL_NS:
        return False
    due[0] += LIMITER_INTERVAL_NS
    return True
