# The TUN boundary: packets in and out of the device, and the offloads that
# live at it (multitun/device.py opens the device and negotiates them). With
# virtio-net headers (IFF_VNET_HDR) reads may be TSO/USO segments, split here
# (segment.pxd), and TCP segments are coalesced before writes (coalesce.pxd);
# without, packets pass as they are. Either way the engine sees plain IP
# packets.

cdef enum:
    # Reads from the TUN that wait in the engine (Tun, below): 32 segments
    # (2 MiB) take in most of the backlog a stream keeps in the device. A ping
    # under a stream waited 0.81 times as long as with 8, the stream's rate
    # the same; 64 did no better.
    HELD = 32


cdef struct Held:
    # A read that waits: its length, virtio-net header, and flow bucket.
    size_t n
    VnetHdr h
    uint32_t bucket


@cython.final
cdef class Tun:
    """The TUN device's fd, read and written a batch at a time.

    With virtio-net headers, a stream's TSO segments queue in the device back
    to back, and each takes tens of microseconds to split and send. A packet
    queued behind them (a ping, a control message) would wait for all of
    them. So each read takes what the device holds at once, up to HELD
    segments: the segments wait here, in order, and so does any packet of a
    flow that has a segment waiting; a packet of any other flow goes into
    the batch at once, ahead of them (up to half a batch, so that segments
    always get the other half). The batch is filled up from what waits."""
    cdef int fd
    cdef bint vnet
    cdef TunnelCounters *ctr
    # What waits (a ring of HELD reads in heldbuf, SLOT bytes each), how
    # many of it per flow bucket (keyed fq_flow_of), and the split of the
    # first, once begun.
    cdef Held held[HELD]
    cdef uint8_t *heldbuf
    cdef int head
    cdef int count
    cdef uint16_t per_bucket[FLOW_BUCKETS]
    cdef uint64_t flow_key
    cdef Segmenter seg
    cdef bint started
    # The run of TCP segments being coalesced (in grobuf, after room for its
    # vnet header).
    cdef GroRun gro
    cdef uint8_t *grobuf

    def __cinit__(self, int fd, bint vnet, uint64_t flow_key):
        self.fd = fd
        self.vnet = vnet
        self.flow_key = flow_key
        self.heldbuf = <uint8_t *>malloc(<size_t>HELD * SLOT) if vnet else NULL
        self.grobuf = <uint8_t *>malloc(VNET_HDR_LEN + GRO_MAX_PACKET)
        if (vnet and self.heldbuf == NULL) or self.grobuf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.heldbuf)
        free(self.grobuf)

    cdef int read(self, Batch *b) noexcept nogil:
        """Fill b: first what the TUN has queued now that need not wait,
        then what waits, in order; 0, or -errno if reading failed."""
        cdef ssize_t r
        cdef uint8_t *p
        cdef size_t room = VNET_HDR_LEN if self.vnet else 0
        while self.count < HELD and b.n < (BATCH // 2 if self.count else BATCH):
            # Into the batch while nothing waits (most reads need not), else
            # where it would wait. The virtio-net header lands before the
            # packet.
            p = (next_packet(b) if self.count == 0 else
                 self.heldbuf + <size_t>((self.head + self.count) % HELD) * SLOT + room) - room
            r = read(self.fd, p, SLOT - HEADER_LEN - TAG_LEN + room)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN:
                    return -errno
                break
            if r <= <ssize_t>room:
                break
            if self.vnet:
                self._from_vnet(b, p + room, <size_t>r - room)
            else:
                self._take(b, <size_t>r)
        self._release(b)
        return 0

    cdef inline bint holding(self) noexcept nogil:
        """Something waits: the engine comes back for it without the TUN
        turning readable."""
        return self.count != 0

    cdef inline void _take(self, Batch *b, size_t n) noexcept nogil:
        self.ctr.tun_rx_packets += 1
        self.ctr.tun_rx_bytes += n
        add_packet(b, n)

    cdef void _from_vnet(self, Batch *b, uint8_t *pkt, size_t n) noexcept nogil:
        """A packet read after its virtio-net header, at pkt (in the batch, or
        where it would wait): into the batch, or, if it is a segment or its
        flow has one waiting, to wait."""
        cdef VnetHdr h
        cdef uint32_t bucket = 0
        cdef Held *e
        cdef int slot = (self.head + self.count) % HELD
        cdef uint8_t *at = self.heldbuf + <size_t>slot * SLOT + VNET_HDR_LEN
        memcpy(&h, pkt - VNET_HDR_LEN, VNET_HDR_LEN)
        if h.gso_type & ~VNET_GSO_ECN == VNET_GSO_NONE:
            if self.count:
                bucket = flow_bucket(pkt, n, self.flow_key)
            if self.count == 0 or self.per_bucket[bucket] == 0:
                if pkt != next_packet(b):
                    memcpy(next_packet(b), pkt, n)
                self._complete(b, n, &h)
                return
        else:
            self.ctr.tun_gso_reads += 1
            bucket = flow_bucket(pkt, n, self.flow_key)
        if pkt != at:
            memcpy(at, pkt, n)
        e = &self.held[slot]
        e.n = n
        e.h = h
        e.bucket = bucket
        self.per_bucket[bucket] += 1
        self.count += 1

    cdef void _complete(self, Batch *b, size_t n, VnetHdr *h) noexcept nogil:
        """The packet at next_packet(b), not a segment: its checksum completed
        if the kernel left it partial, then into the batch."""
        cdef uint8_t *pkt = next_packet(b)
        cdef uint16_t c
        if h.flags & VNET_F_NEEDS_CSUM:
            # CHECKSUM_PARTIAL: the field holds the pseudo-header sum;
            # summing from csum_start over it completes the checksum.
            if <size_t>h.csum_start + h.csum_offset + 2 > n:
                self.ctr.tun_gso_dropped += 1
                return
            c = ~csum_fold(csum_add(0, pkt + h.csum_start, n - h.csum_start))
            memcpy(pkt + h.csum_start + h.csum_offset, &c, 2)
        self._take(b, n)

    cdef void _release(self, Batch *b) noexcept nogil:
        """Fill b up from what waits, the first first: a packet as it is, a
        segment split (resumed in the next batch if this one fills)."""
        cdef Held *e
        cdef uint8_t *pkt
        cdef uint8_t gso
        cdef size_t n
        while b.n < BATCH and self.count:
            e = &self.held[self.head]
            pkt = self.heldbuf + <size_t>self.head * SLOT + VNET_HDR_LEN
            gso = e.h.gso_type & ~VNET_GSO_ECN
            if gso == VNET_GSO_NONE:
                memcpy(next_packet(b), pkt, e.n)
                self._complete(b, e.n, &e.h)
            else:
                if not self.started:
                    self.started = True
                    if not segmenter_start(&self.seg, pkt, e.n, e.h.gso_size, gso):
                        self.ctr.tun_gso_dropped += 1
                while b.n < BATCH:
                    n = segmenter_next(&self.seg, next_packet(b))
                    if n == 0:
                        break
                    self._take(b, n)
                if self.seg.active:
                    return
            self.per_bucket[e.bucket] -= 1
            self.head = (self.head + 1) % HELD
            self.count -= 1
            self.started = False

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
