# struct virtio_net_hdr (<linux/virtio_net.h>), which comes before every
# packet on a TUN opened with IFF_VNET_HDR: flags, gso_type, hdr_len,
# gso_size, csum_start, csum_offset; the 16-bit fields in the host's byte
# order (legacy virtio; drivers/net/tun_vnet.h). Only the TUN boundary
# (tun.pxi) reads or writes it: the engine sees plain packets.

from libc.stdint cimport uint8_t, uint16_t

cdef enum:
    VNET_HDR_LEN = 10
    VNET_F_NEEDS_CSUM = 1
    VNET_GSO_NONE = 0
    VNET_GSO_TCPV4 = 1
    VNET_GSO_TCPV6 = 4
    VNET_GSO_UDP_L4 = 5
    VNET_GSO_ECN = 0x80


cdef struct VnetHdr:
    uint8_t flags
    uint8_t gso_type
    uint16_t hdr_len
    uint16_t gso_size
    uint16_t csum_start
    uint16_t csum_offset
