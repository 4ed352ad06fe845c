# The TUN boundary: packets in and out of the device, and the offloads that
# live at it (multitun/device.py opens the device and negotiates them). With
# virtio-net headers (IFF_VNET_HDR) reads may be TSO/USO segments, split here
# (segment.pxd), and TCP segments are coalesced before writes (coalesce.pxd);
# without, packets pass as they are. Either way the engine sees plain IP
# packets.

@cython.final
cdef class Tun:
    cdef int fd
    cdef bint vnet
    cdef TunnelCounters *ctr
    # A segment being split (its bytes in segbuf), and the run of TCP
    # segments being coalesced (in grobuf, after room for its vnet header).
    cdef Segmenter seg
    cdef uint8_t *segbuf
    cdef GroRun gro
    cdef uint8_t *grobuf

    def __cinit__(self, int fd, bint vnet):
        self.fd = fd
        self.vnet = vnet
        self.segbuf = <uint8_t *>malloc(SLOT)
        self.grobuf = <uint8_t *>malloc(VNET_HDR_LEN + GRO_MAX_PACKET)
        if self.segbuf == NULL or self.grobuf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.segbuf)
        free(self.grobuf)

    cdef int read(self, Batch *b) noexcept nogil:
        """Fill b with what the TUN has queued now (never waiting), the rest
        of a split first; 0, or -errno if reading failed."""
        cdef ssize_t r
        cdef uint8_t *p
        cdef size_t room = VNET_HDR_LEN if self.vnet else 0
        self._split(b)
        while b.n < BATCH:
            # The virtio-net header lands in the header room before the packet.
            p = next_packet(b) - room
            r = read(self.fd, p, SLOT - HEADER_LEN - TAG_LEN + room)
            if r < 0:
                if errno == EINTR:
                    continue
                return 0 if errno == EAGAIN else -errno
            if r <= <ssize_t>room:
                return 0
            if self.vnet:
                self._from_vnet(b, <size_t>r - room)
            else:
                self._take(b, <size_t>r)
        return 0

    cdef inline void read_split(self, Batch *b) noexcept nogil:
        """Fill b with the rest of the split under way, reading nothing."""
        self._split(b)

    cdef inline bint splitting(self) noexcept nogil:
        """A split goes on beyond the batch just read."""
        return self.seg.active

    cdef inline void _take(self, Batch *b, size_t n) noexcept nogil:
        self.ctr.tun_rx_packets += 1
        self.ctr.tun_rx_bytes += n
        add_packet(b, n)

    cdef void _from_vnet(self, Batch *b, size_t n) noexcept nogil:
        """A packet read after its virtio-net header: complete its checksum,
        or split it if it is a segment."""
        cdef uint8_t *pkt = next_packet(b)
        cdef VnetHdr h
        cdef uint8_t gso
        cdef uint16_t c
        memcpy(&h, pkt - VNET_HDR_LEN, VNET_HDR_LEN)
        gso = h.gso_type & ~VNET_GSO_ECN
        if gso == VNET_GSO_NONE:
            if h.flags & VNET_F_NEEDS_CSUM:
                # CHECKSUM_PARTIAL: the field holds the pseudo-header sum;
                # summing from csum_start over it completes the checksum.
                if <size_t>h.csum_start + h.csum_offset + 2 > n:
                    self.ctr.tun_gso_dropped += 1
                    return
                c = ~csum_fold(csum_add(0, pkt + h.csum_start, n - h.csum_start))
                memcpy(pkt + h.csum_start + h.csum_offset, &c, 2)
            self._take(b, n)
            return
        self.ctr.tun_gso_reads += 1
        # The packets go into the slots from this one on: move the segment out.
        memcpy(self.segbuf, pkt, n)
        if not segmenter_start(&self.seg, self.segbuf, n, h.gso_size, gso):
            self.ctr.tun_gso_dropped += 1
            return
        self._split(b)

    cdef void _split(self, Batch *b) noexcept nogil:
        cdef size_t n
        while b.n < BATCH:
            n = segmenter_next(&self.seg, next_packet(b))
            if n == 0:
                return
            self._take(b, n)

    cdef void write(self, uint8_t *pkt, size_t n) noexcept nogil:
        """Write a packet to the TUN, pkt having VNET_HDR_LEN bytes of room
        before it. With virtio-net headers, TCP segments wait to be coalesced
        with the ones that follow; flush() writes what waits."""
        cdef size_t iphl, hdrlen
        if not self.vnet:
            self._write(pkt, n)
            return
        hdrlen = tcp_segment_headers(pkt, n, &iphl)
        if hdrlen and gro_append(&self.gro, self.grobuf + VNET_HDR_LEN, pkt, n, iphl, hdrlen):
            return
        self.flush()
        if hdrlen:
            gro_start(&self.gro, self.grobuf + VNET_HDR_LEN, pkt, n, iphl, hdrlen)
            return
        memset(pkt - VNET_HDR_LEN, 0, VNET_HDR_LEN)  # no offload asked for this one
        self._write(pkt - VNET_HDR_LEN, n + VNET_HDR_LEN)

    cdef void flush(self) noexcept nogil:
        cdef size_t n
        if self.gro.len == 0:
            return
        if self.gro.segments > 1:
            self.ctr.gro_writes += 1
            self.ctr.gro_coalesced += self.gro.segments
        n = gro_finish(&self.gro, self.grobuf + VNET_HDR_LEN, <VnetHdr *>self.grobuf)
        self._write(self.grobuf, VNET_HDR_LEN + n)

    cdef void _write(self, const uint8_t *buf, size_t n) noexcept nogil:
        cdef ssize_t w
        while True:
            w = write(self.fd, buf, n)
            if w >= 0 or errno != EINTR:
                break
        if w < 0:
            self.ctr.tun_write_errors += 1
