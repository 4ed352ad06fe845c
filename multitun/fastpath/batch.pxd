# A batch of packets on its way from the TUN to the paths.

from libc.stdint cimport uint8_t, uint32_t
from ..includes.linux cimport iovec
from .constants cimport BATCH, HEADER_LEN, SLOT


cdef struct Batch:
    # BATCH buffers of SLOT bytes, allocated once. The TUN side puts packet i
    # HEADER_LEN bytes into a slot (room for our header before it, for the
    # tag after it); iov[:n] say where the packets are, then, once framed,
    # where the datagrams are. Framing may drop a packet (no key): iov[k]
    # then names slot i > k, so nothing is moved.
    uint8_t *slots
    iovec iov[BATCH]
    # The flow bucket of each packet (flowqueue.pxd), taken before it is
    # sealed; only while some path is paced.
    uint32_t flow[BATCH]
    int n


cdef inline uint8_t *next_packet(Batch *b) noexcept nogil:
    """Where the next packet goes (the batch must not be full)."""
    return b.slots + b.n * SLOT + HEADER_LEN


cdef inline void add_packet(Batch *b, size_t n) noexcept nogil:
    """The packet at next_packet(b), n bytes long, is in the batch."""
    b.iov[b.n].iov_base = next_packet(b)
    b.iov[b.n].iov_len = n
    b.n += 1
