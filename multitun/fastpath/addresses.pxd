# Socket addresses, and the control messages (cmsg(3)) that carry a source
# address or a UDP GRO segment size.

from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memset
from ..includes.linux cimport *


cdef inline bint same_addr(const sockaddr_storage *a, const void *bp) noexcept nogil:
    # Compare family, port and address only: the kernel may fill other fields
    # (sin6_flowinfo, padding) differently from one datagram to the next.
    cdef const sockaddr_in *a4
    cdef const sockaddr_in *b4
    cdef const sockaddr_in6 *a6
    cdef const sockaddr_in6 *b6
    cdef const sockaddr_storage *b = <const sockaddr_storage *>bp
    if a.ss_family != b.ss_family:
        return False
    if a.ss_family == AF_INET:
        a4 = <const sockaddr_in *>a
        b4 = <const sockaddr_in *>b
        return a4.sin_port == b4.sin_port and a4.sin_addr.s_addr == b4.sin_addr.s_addr
    if a.ss_family == AF_INET6:
        a6 = <const sockaddr_in6 *>a
        b6 = <const sockaddr_in6 *>b
        return (a6.sin6_port == b6.sin6_port
                and memcmp(&a6.sin6_addr, &b6.sin6_addr, 16) == 0)
    return False


cdef inline size_t sticky_source(msghdr *rx, uint64_t *out) noexcept nogil:
    """From a received IP_PKTINFO/IPV6_PKTINFO, build the control message that
    sends from the address the datagram was addressed to (ip(7): on send,
    ipi_spec_dst is the source; ipv6(7): ipi6_addr is). Returns its length."""
    cdef cmsghdr *c = CMSG_FIRSTHDR(rx)
    cdef cmsghdr *o = <cmsghdr *>out
    cdef in_pktinfo *i4
    cdef in6_pktinfo *i6
    while c != NULL:
        if c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_PKTINFO:
            o.cmsg_level = IPPROTO_IP
            o.cmsg_type = IP_PKTINFO
            o.cmsg_len = CMSG_LEN(sizeof(in_pktinfo))
            i4 = <in_pktinfo *>CMSG_DATA(o)
            memset(i4, 0, sizeof(in_pktinfo))
            i4.ipi_spec_dst = (<in_pktinfo *>CMSG_DATA(c)).ipi_addr
            return CMSG_SPACE(sizeof(in_pktinfo))
        if c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_PKTINFO:
            o.cmsg_level = IPPROTO_IPV6
            o.cmsg_type = IPV6_PKTINFO
            o.cmsg_len = CMSG_LEN(sizeof(in6_pktinfo))
            i6 = <in6_pktinfo *>CMSG_DATA(o)
            memset(i6, 0, sizeof(in6_pktinfo))
            i6.ipi6_addr = (<in6_pktinfo *>CMSG_DATA(c)).ipi6_addr
            return CMSG_SPACE(sizeof(in6_pktinfo))
        c = CMSG_NXTHDR(rx, c)
    return 0


cdef inline size_t gro_segment_size(msghdr *rx) noexcept nogil:
    """The segment size of a UDP GRO train (udp(7) UDP_GRO), or 0."""
    cdef cmsghdr *c = CMSG_FIRSTHDR(rx)
    while c != NULL:
        if c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO:
            return <size_t>(<int *>CMSG_DATA(c))[0]
        c = CMSG_NXTHDR(rx, c)
    return 0
