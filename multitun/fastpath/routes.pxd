# A fleet server's allowed IPs (WireGuard's cryptokey routing): which peer an
# inner address belongs to, by longest prefix. The server sends a packet from
# its TUN to the peer whose prefix holds the destination, and writes a packet
# from a peer to the TUN only if the peer's prefixes hold its source.
#
# One hash table per address family, keyed by (prefix length, masked
# address), and the list of prefix lengths in use, longest first: a lookup
# probes once per length in use, however many peers there are (a fleet of
# /32 and /128 hosts probes once or twice). The control plane builds a new
# table on every change (Engine.set_routes) and swaps it in between two runs
# of the loop; the table is never changed while the loop reads it.

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t
from libc.string cimport memcpy, memcmp, memset
from libc.stdlib cimport calloc, free

cdef enum:
    ROUTE_NONE = -1


cdef struct Route:
    # The masked prefix (4 or 16 bytes used), its length in bits, and the
    # peer (ROUTE_NONE: an empty slot).
    uint8_t addr[16]
    int32_t length
    int32_t peer


cdef struct RouteFamily:
    Route *slots
    # Table size less one (a power of two, at least twice the routes).
    uint32_t mask
    # The prefix lengths in use, longest first.
    int32_t lengths[129]
    int32_t nlengths
    int32_t addr_len


cdef struct RouteTable:
    # The hash's key: drawn at start, so that no one can choose addresses
    # that pile into one chain.
    uint64_t key
    RouteFamily v4
    RouteFamily v6


cdef inline void mask_prefix(const uint8_t *addr, int32_t addr_len, int32_t length,
                             uint8_t *out) noexcept nogil:
    cdef int32_t i, bits
    memset(out, 0, 16)
    for i in range(addr_len):
        bits = length - 8 * i
        if bits >= 8:
            out[i] = addr[i]
        elif bits > 0:
            out[i] = addr[i] & <uint8_t>(0xFF << (8 - bits))


cdef inline uint32_t route_hash(uint64_t key, const uint8_t *masked,
                                int32_t length) noexcept nogil:
    cdef uint64_t a, b
    memcpy(&a, masked, 8)
    memcpy(&b, masked + 8, 8)
    # Multiply-xorshift on each word (Fibonacci hashing, Knuth TAOCP 6.4):
    # every input bit reaches the top bits used.
    cdef uint64_t h = (key ^ <uint64_t>length) * 0x9E3779B97F4A7C15ULL
    h = (h ^ a) * 0x9E3779B97F4A7C15ULL
    h = (h ^ (h >> 29) ^ b) * 0xBF58476D1CE4E5B9ULL
    return <uint32_t>(h >> 32)


cdef inline int32_t route_find(const RouteTable *t, const uint8_t *addr,
                               bint v6) noexcept nogil:
    """The peer whose longest prefix holds addr (4 or 16 bytes), or
    ROUTE_NONE."""
    cdef const RouteFamily *f = &t.v6 if v6 else &t.v4
    cdef uint8_t masked[16]
    cdef int32_t k, length
    cdef uint32_t i
    cdef const Route *r
    if f.slots == NULL:
        return ROUTE_NONE
    for k in range(f.nlengths):
        length = f.lengths[k]
        mask_prefix(addr, f.addr_len, length, masked)
        i = route_hash(t.key, masked, length) & f.mask
        while True:
            r = &f.slots[i]
            if r.peer == ROUTE_NONE:
                break
            if r.length == length and memcmp(r.addr, masked, 16) == 0:
                return r.peer
            i = (i + 1) & f.mask
    return ROUTE_NONE


cdef inline int32_t route_of_packet(const RouteTable *t, const uint8_t *p, size_t n,
                                    bint source) noexcept nogil:
    """The peer of an IP packet's destination (or, ``source``, its source);
    ROUTE_NONE for one with no route or too short to say."""
    if n >= 20 and p[0] >> 4 == 4:
        return route_find(t, p + (12 if source else 16), False)
    if n >= 40 and p[0] >> 4 == 6:
        return route_find(t, p + (8 if source else 24), True)
    return ROUTE_NONE


cdef inline int routes_alloc(RouteFamily *f, int32_t addr_len, uint32_t count) noexcept nogil:
    """An empty family table with room for ``count`` routes; -1 if out of
    memory."""
    cdef uint32_t size = 16, i
    while size < 2 * count + 2:
        size <<= 1
    f.slots = <Route *>calloc(size, sizeof(Route))
    if f.slots == NULL:
        return -1
    for i in range(size):
        f.slots[i].peer = ROUTE_NONE
    f.mask = size - 1
    f.nlengths = 0
    f.addr_len = addr_len
    return 0


cdef inline int route_add(RouteTable *t, const uint8_t *addr, int32_t length,
                          int32_t peer, bint v6) noexcept nogil:
    """Add a prefix (masked here) for ``peer``; ROUTE_NONE, or the other
    peer that has it already."""
    cdef RouteFamily *f = &t.v6 if v6 else &t.v4
    cdef uint8_t masked[16]
    cdef uint32_t i
    cdef int32_t k
    mask_prefix(addr, f.addr_len, length, masked)
    i = route_hash(t.key, masked, length) & f.mask
    while f.slots[i].peer != ROUTE_NONE:
        if f.slots[i].length == length and memcmp(f.slots[i].addr, masked, 16) == 0:
            return ROUTE_NONE if f.slots[i].peer == peer else f.slots[i].peer
        i = (i + 1) & f.mask
    memcpy(f.slots[i].addr, masked, 16)
    f.slots[i].length = length
    f.slots[i].peer = peer
    for k in range(f.nlengths):
        if f.lengths[k] == length:
            return ROUTE_NONE
    # Keep the lengths longest first: insert in place.
    k = f.nlengths
    while k > 0 and f.lengths[k - 1] < length:
        f.lengths[k] = f.lengths[k - 1]
        k -= 1
    f.lengths[k] = length
    f.nlengths += 1
    return ROUTE_NONE


cdef inline void routes_free(RouteTable *t) noexcept nogil:
    free(t.v4.slots)
    free(t.v6.slots)
    t.v4.slots = t.v6.slots = NULL
    t.v4.nlengths = t.v6.nlengths = 0
