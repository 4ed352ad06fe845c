# The send direction: a batch of plain packets from the TUN to its peer (a
# fleet server: each packet to the peer whose allowed IPs hold its
# destination), framed with that peer's keys, on every path where the peer
# has an endpoint: at once, or into a paced path's queue (shaper.pxi).


@cython.final
cdef class Sender:
    cdef Peers peers
    cdef TunnelCounters *ctr
    # One peer's share of a batch, on a fleet server (its iovecs point into
    # the batch's slots).
    cdef Batch share

    def __cinit__(self, Peers peers):
        self.peers = peers

    cdef void send(self, Batch *b) noexcept nogil:
        """The packets of b (read from the TUN, with HEADER_LEN bytes of room
        before each), framed in place and sent."""
        if self.peers.fleet:
            self._route(b)
        else:
            self._frame_and_send(<Peer>self.peers.at[0], b)

    cdef void _route(self, Batch *b) noexcept nogil:
        """A fleet server: each packet to the peer whose allowed IPs hold
        its destination, each peer's share in its order, as one batch."""
        cdef int32_t dest[BATCH]
        cdef Batch *share = &self.share
        cdef int i, j, peer
        for i in range(b.n):
            dest[i] = self.peers.by_destination(<uint8_t *>b.iov[i].iov_base, b.iov[i].iov_len)
            if dest[i] < 0:
                self.ctr.no_route += 1
        for i in range(b.n):
            peer = dest[i]
            if peer < 0:
                continue
            # A batch holds few peers' packets: gathering each share costs
            # the batch's length per peer in it, whatever the fleet's size.
            share.n = 0
            for j in range(i, b.n):
                if dest[j] == peer:
                    share.iov[share.n] = b.iov[j]
                    share.n += 1
                    dest[j] = -1
            self._frame_and_send(<Peer>self.peers.at[peer], share)

    cdef void _frame_and_send(self, Peer peer, Batch *b) noexcept nogil:
        """Frame b's packets in place for ``peer`` and send them. A packet
        that cannot leave (no key yet) is left out of the iovecs. A paced
        path queues by flow, which only the packet in clear tells."""
        cdef int i, kept = 0
        cdef size_t n
        cdef uint8_t *p
        cdef bint shaping = peer.shaper.paced != 0
        for i in range(b.n):
            p = <uint8_t *>b.iov[i].iov_base
            if shaping:
                b.flow[kept] = fq_flow_of(p, b.iov[i].iov_len, peer.shaper.key)
            p -= HEADER_LEN
            n = peer.keyring.frame(p, b.iov[i].iov_len, T_DATA, 0, 0)
            if n == 0:
                self.ctr.no_key += 1
                continue
            peer.c.routed_packets += 1
            peer.c.routed_bytes += b.iov[i].iov_len
            b.iov[kept].iov_base = p
            b.iov[kept].iov_len = n
            kept += 1
        b.n = kept
        if kept:
            self._send(peer, b)

    cdef void _send(self, Peer peer, Batch *b) noexcept nogil:
        """The batch on every path where ``peer`` has an endpoint: at once,
        or into its queue if it is paced."""
        cdef int path
        cdef bint queued = False
        cdef uint64_t now = 0
        for path in range(MAX_PATHS):
            if peer.eps[path].fd < 0:
                continue
            if peer.shaper.holds(path):
                if not queued:
                    now = now_ns()
                    queued = True
                peer.shaper.enqueue(path, b, now)
            else:
                peer.send(path, b)
        if queued:
            peer.shaper.service(now)
