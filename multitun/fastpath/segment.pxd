# Splitting a TSO or USO segment from the TUN into the packets it stands for,
# as the kernel's tcp_gso_segment() (net/ipv4/tcp_offload.c) and
# __udp_gso_segment() (net/ipv4/udp_offload.c) would: headers copied, lengths
# set, IPv4 ids counted up, TCP sequence numbers advanced (FIN and PSH only
# on the last packet, CWR only on the first), every checksum computed (UDP's
# 0 sent as 0xffff, RFC 768). One skeleton for both protocols; a split is
# resumable, packet by packet, so it can span send batches.

from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy
from ..includes.linux cimport IPPROTO_TCP, IPPROTO_UDP
from .byteorder cimport rd16, rd32, wr16, wr32
from .checksum cimport csum_add, csum_fold, pseudo_header, set_ipv4_checksum
from .vnet cimport VNET_GSO_TCPV4, VNET_GSO_TCPV6, VNET_GSO_UDP_L4

cdef enum:
    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_ACK = 0x10
    TCP_CWR = 0x80


cdef struct Segmenter:
    # The segment being split (its bytes at pkt, n long) and how far.
    const uint8_t *pkt
    size_t n
    size_t iphl
    size_t l4hl
    size_t mss
    size_t off
    uint32_t seq0
    uint16_t id0
    uint8_t flags
    uint8_t proto
    int index
    bint v6
    # False: nothing (left) to split.
    bint active


cdef inline bint segmenter_start(Segmenter *s, const uint8_t *pkt, size_t n,
                                 size_t mss, uint8_t gso_type) noexcept nogil:
    """Begin splitting pkt[:n] into packets of mss payload bytes; False if it
    is not the TCP or UDP segment gso_type says (IPv6 extension headers and
    IPv4 options other than in the header length are not split)."""
    cdef size_t iphl
    s.active = False
    if n < 20 or mss == 0:
        return False
    s.v6 = pkt[0] >> 4 == 6
    if s.v6:
        iphl = 40
        s.proto = pkt[6] if n >= 40 else 0
    elif pkt[0] >> 4 == 4:
        iphl = (pkt[0] & 15) * 4
        s.proto = pkt[9]
    else:
        return False
    if gso_type == VNET_GSO_UDP_L4:
        if s.proto != IPPROTO_UDP:
            return False
        s.l4hl = 8
    elif gso_type == VNET_GSO_TCPV4 or gso_type == VNET_GSO_TCPV6:
        if s.proto != IPPROTO_TCP or s.v6 != (gso_type == VNET_GSO_TCPV6) or n < iphl + 20:
            return False
        s.l4hl = (pkt[iphl + 12] >> 4) * 4
        if s.l4hl < 20:
            return False
        s.seq0 = rd32(pkt + iphl + 4)
        s.flags = pkt[iphl + 13]
    else:
        return False
    if iphl < 20 or iphl + s.l4hl > n or (s.proto == IPPROTO_TCP and iphl + s.l4hl == n):
        return False
    s.pkt = pkt
    s.n = n
    s.iphl = iphl
    s.mss = mss
    s.off = 0
    s.index = 0
    s.id0 = rd16(pkt + 4)
    s.active = True
    return True


cdef inline size_t segmenter_next(Segmenter *s, uint8_t *out) noexcept nogil:
    """Write the next packet of the split to out; its length, 0 when done."""
    cdef size_t hdrlen = s.iphl + s.l4hl
    cdef size_t payload = s.n - hdrlen
    cdef size_t seg
    cdef uint8_t *l4 = out + s.iphl
    cdef uint8_t f
    cdef uint16_t c
    cdef size_t csum_at
    if not s.active or s.off >= payload:
        s.active = False
        return 0
    seg = payload - s.off if payload - s.off < s.mss else s.mss
    memcpy(out, s.pkt, hdrlen)
    memcpy(out + hdrlen, s.pkt + hdrlen + s.off, seg)
    if s.v6:
        wr16(out + 4, <uint16_t>(s.l4hl + seg))
    else:
        wr16(out + 2, <uint16_t>(hdrlen + seg))
        wr16(out + 4, <uint16_t>(s.id0 + s.index))
        set_ipv4_checksum(out, s.iphl)
    if s.proto == IPPROTO_TCP:
        wr32(l4 + 4, s.seq0 + <uint32_t>s.off)
        f = s.flags
        if s.off + seg < payload:
            f &= ~(TCP_FIN | TCP_PSH)
        if s.index > 0:
            f &= ~TCP_CWR
        l4[13] = f
        csum_at = 16
    else:
        wr16(l4 + 4, <uint16_t>(8 + seg))
        csum_at = 6
    l4[csum_at] = 0
    l4[csum_at + 1] = 0
    c = ~csum_fold(csum_add(pseudo_header(out, s.v6, s.l4hl + seg, s.proto), l4, s.l4hl + seg))
    if c == 0 and s.proto == IPPROTO_UDP:
        c = 0xffff
    memcpy(l4 + csum_at, &c, 2)
    s.off += seg
    s.index += 1
    return hdrlen + seg
