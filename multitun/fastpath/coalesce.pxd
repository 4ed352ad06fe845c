# Coalescing TCP segments on their way to the TUN, as the kernel's GRO would
# (net/ipv4/tcp_offload.c, tcp_gro_receive()): consecutive segments of one
# flow with the same headers become one packet, written with a virtio-net
# header that asks the kernel to treat it as a TSO segment, so the stack
# above makes one pass for them.

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcmp, memcpy, memset
from ..includes.linux cimport IPPROTO_TCP
from .byteorder cimport rd16, rd32, wr16
from .checksum cimport csum_fold, pseudo_header, set_ipv4_checksum
from .segment cimport TCP_ACK, TCP_PSH
from .vnet cimport VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_GSO_TCPV6, VnetHdr

cdef enum:
    # Coalesced TCP segments written at once, at most; and the room a run
    # takes: an IPv6 packet's payload may be 65535 bytes after its 40-byte
    # header.
    GRO_MAX_SEGMENTS = 64
    GRO_MAX_PACKET = 40 + 65535


cdef struct GroRun:
    # TCP segments of one flow, coalescing in a buffer of GRO_MAX_PACKET
    # bytes. len 0: no run.
    size_t len
    size_t iphl
    size_t hdrlen
    size_t mss
    uint32_t next_seq
    int segments
    bint closed
    bint v6


cdef inline size_t tcp_segment_headers(const uint8_t *pkt, size_t n, size_t *iphl) noexcept nogil:
    """If pkt is a TCP segment that may be coalesced (IPv4 unfragmented or
    IPv6 without extension headers; payload; only ACK and PSH set), the
    length of its IP and TCP headers (IP's in *iphl); else 0."""
    cdef size_t l, thl
    if n < 40:
        return 0
    if pkt[0] >> 4 == 4:
        l = (pkt[0] & 15) * 4
        if l < 20 or pkt[9] != IPPROTO_TCP or rd16(pkt + 2) != n or rd16(pkt + 6) & 0x3fff:
            return 0
    elif pkt[0] >> 4 == 6:
        l = 40
        if pkt[6] != IPPROTO_TCP or <size_t>rd16(pkt + 4) + 40 != n:
            return 0
    else:
        return 0
    if n < l + 20:
        return 0
    thl = (pkt[l + 12] >> 4) * 4
    if thl < 20 or l + thl >= n or pkt[l + 13] & ~(TCP_ACK | TCP_PSH) or not pkt[l + 13] & TCP_ACK:
        return 0
    iphl[0] = l
    return l + thl


cdef inline void gro_start(GroRun *g, uint8_t *run, const uint8_t *pkt, size_t n,
                           size_t iphl, size_t hdrlen) noexcept nogil:
    memcpy(run, pkt, n)
    g.len = n
    g.iphl = iphl
    g.hdrlen = hdrlen
    g.mss = n - hdrlen
    g.next_seq = rd32(pkt + iphl + 4) + <uint32_t>(n - hdrlen)
    g.segments = 1
    g.closed = (pkt[iphl + 13] & TCP_PSH) != 0  # PSH: nothing may follow it
    g.v6 = pkt[0] >> 4 == 6


cdef inline bint gro_append(GroRun *g, uint8_t *run, const uint8_t *pkt, size_t n,
                            size_t iphl, size_t hdrlen) noexcept nogil:
    """Append TCP segment pkt to the run if it is the next segment of the same
    flow with the same headers (but for lengths, ids, sequence numbers,
    checksums and PSH), no longer than the first, and all fits in one IP
    packet; tcp_gro_receive() flushes on the same differences."""
    cdef const uint8_t *a = run + iphl
    cdef const uint8_t *b = pkt + iphl
    cdef size_t payload
    if g.len == 0 or g.closed or g.segments >= GRO_MAX_SEGMENTS:
        return False
    if hdrlen != g.hdrlen or iphl != g.iphl or (pkt[0] >> 4 == 6) != g.v6:
        return False
    payload = n - hdrlen
    if payload > g.mss or g.len + payload > <size_t>(65535 + (40 if g.v6 else 0)):
        return False
    if rd32(b + 4) != g.next_seq:
        return False
    if g.v6:
        if memcmp(run, pkt, 4) != 0 or memcmp(run + 6, pkt + 6, 34) != 0:
            return False
    elif (memcmp(run, pkt, 2) != 0 or memcmp(run + 6, pkt + 6, 4) != 0
          or memcmp(run + 12, pkt + 12, iphl - 12) != 0):
        return False
    if (memcmp(a, b, 4) != 0 or memcmp(a + 8, b + 8, 5) != 0
            or (a[13] ^ b[13]) & ~TCP_PSH or memcmp(a + 14, b + 14, 2) != 0
            or memcmp(a + 18, b + 18, hdrlen - iphl - 18) != 0):
        return False
    memcpy(run + g.len, pkt + hdrlen, payload)
    g.len += payload
    g.next_seq += <uint32_t>payload
    g.segments += 1
    if payload < g.mss or b[13] & TCP_PSH:
        # A short segment ends what the sender wrote; PSH says deliver now.
        run[iphl + 13] |= b[13] & TCP_PSH
        g.closed = True
    return True


cdef inline size_t gro_finish(GroRun *g, uint8_t *run, VnetHdr *h) noexcept nogil:
    """End the run: fill in the virtio-net header for it (one segment goes as
    it came; several as one packet marked GSO, its checksum partial: the
    pseudo-header sum, as the kernel's own CHECKSUM_PARTIAL packets carry).
    Returns the packet's length."""
    cdef uint16_t c
    cdef size_t n = g.len
    memset(h, 0, sizeof(VnetHdr))
    if g.segments > 1:
        if g.v6:
            wr16(run + 4, <uint16_t>(n - 40))
        else:
            wr16(run + 2, <uint16_t>n)
            set_ipv4_checksum(run, g.iphl)
        c = csum_fold(pseudo_header(run, g.v6, n - g.iphl, IPPROTO_TCP))
        memcpy(run + g.iphl + 16, &c, 2)
        h.flags = VNET_F_NEEDS_CSUM
        h.gso_type = VNET_GSO_TCPV6 if g.v6 else VNET_GSO_TCPV4
        h.hdr_len = <uint16_t>g.hdrlen
        h.gso_size = <uint16_t>g.mss
        h.csum_start = <uint16_t>g.iphl
        h.csum_offset = 16
    g.len = 0
    return n
