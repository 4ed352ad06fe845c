# Control packets on their way up to Python (probe replies for path health,
# handshakes for the keying), and the addresses their answers go back to.
# Python never holds an address: take() hands out a token, and send_back()
# answers by it, from the address the packet was sent to.

cdef struct ReturnAddress:
    int fd
    sockaddr_storage addr
    socklen_t addrlen
    uint64_t cmsg[CMSG_WORDS]
    size_t cmsglen


cdef struct ControlPacket:
    # -1: a first message to a fleet server, whose peer is found by the
    # fingerprint it claims (multitun/peers.py) and proved by the keying.
    int peer
    int path
    uint64_t rx_ns
    size_t length
    uint8_t data[CTRL_ROOM]
    uint64_t reply_to


@cython.final
cdef class ControlQueue:
    cdef TunnelCounters *ctr
    cdef ControlPacket queue[CTRL_SLOTS]
    cdef int n
    # Return addresses by token: token t lives in slot t % REPLY_SLOTS until
    # REPLY_SLOTS newer ones have come; tokens start at 1.
    cdef ReturnAddress replies[REPLY_SLOTS]
    cdef uint64_t tokens

    cdef void push(self, int peer, int path, const uint8_t *pkt, size_t n, uint64_t now,
                   int fd, msghdr *m) noexcept nogil:
        cdef ControlPacket *c
        cdef ReturnAddress *ra
        if self.n == CTRL_SLOTS:
            self.ctr.control_dropped += 1
            return
        c = &self.queue[self.n]
        self.n += 1
        c.peer = peer
        c.path = path
        c.rx_ns = now
        c.length = n
        memcpy(c.data, pkt, n)
        self.tokens += 1
        c.reply_to = self.tokens
        ra = &self.replies[self.tokens % REPLY_SLOTS]
        ra.fd = fd
        memcpy(&ra.addr, m.msg_name, m.msg_namelen)
        ra.addrlen = m.msg_namelen
        ra.cmsglen = sticky_source(m, ra.cmsg)

    cdef list take(self):
        """The queued packets, oldest first, as (peer, path, rx_ns,
        datagram, source, reply_to)."""
        cdef int i
        cdef ControlPacket *c
        out = []
        for i in range(self.n):
            c = &self.queue[i]
            out.append((c.peer, c.path, c.rx_ns, bytes(c.data[:c.length]),
                        sockaddr_to_tuple(&self.replies[c.reply_to % REPLY_SLOTS].addr),
                        c.reply_to))
        self.n = 0
        return out

    cdef ReturnAddress *reply_address(self, uint64_t token) except NULL:
        if not (0 < token <= self.tokens and self.tokens - token < REPLY_SLOTS):
            raise ValueError("not a reply_to from take_control(), or too old")
        return &self.replies[token % REPLY_SLOTS]
