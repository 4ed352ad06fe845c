# One peer: the other end of one tunnel. A client has one (its server); a
# server has one, or with [[peer]] tables one per client (peers.pxi finds
# them). Everything that belongs to one peer is here, so that one peer
# restarting, roaming or failing never touches another's: its keys and
# replay windows (KeyRing), its endpoint on each path, its paced paths'
# queues (Shaper) and its counters. The sockets and the syscalls are shared
# (Paths).


cdef struct PeerCounters:
    # Packets from the TUN sent to this peer (by allowed IPs on a fleet
    # server; every packet otherwise), once framed: not those dropped for
    # want of keys.
    uint64_t routed_packets
    uint64_t routed_bytes
    # First copies from this peer written to the TUN.
    uint64_t delivered
    uint64_t delivered_bytes
    # Fleet server: authentic packets whose inner source is not in this
    # peer's allowed IPs, dropped.
    uint64_t source_refused


@cython.final
cdef class Peer:
    cdef int index
    cdef Paths paths
    cdef KeyRing keyring
    cdef Shaper shaper
    cdef Endpoint eps[MAX_PATHS]
    cdef PeerCounters c
    cdef TunnelCounters *ctr

    def __cinit__(self, int index, Paths paths, uint32_t session, bint keyed,
                  uint64_t flow_key, uint64_t margin_ns):
        cdef int i
        self.index = index
        self.paths = paths
        self.keyring = KeyRing(session, keyed)
        self.ctr = self.keyring.ctr = paths.ctr
        for i in range(MAX_PATHS):
            memset(&self.eps[i], 0, sizeof(Endpoint))
            self.reset(i)
            if paths.server:
                # No endpoint until learned, and then sent to by address.
                self.eps[i].fd = -1
                self.eps[i].connected = False
        self.shaper = Shaper(paths, flow_key, margin_ns)
        self.shaper.eps = self.eps

    cdef void reset(self, int path) noexcept nogil:
        """Path ``path`` sends on its socket now (or nothing, if it has none),
        as a new path would; what it counted stays."""
        cdef Endpoint *ep = &self.eps[path]
        ep.fd = self.paths.socks[path]
        ep.connected = True  # until set_remote() says otherwise
        ep.gso = self.paths.gso
        ep.gso_max_seg = SLOT
        ep.cmsglen = 0

    cdef inline int endpoint_for(self, int sock, int path, const msghdr *m) noexcept nogil:
        """The path a datagram belongs to, or -1 if its source is not that
        path's endpoint."""
        if not self.paths.server:
            # The socket is the path. A connected socket's source was filtered
            # by the kernel; an unconnected one's is checked here.
            if path != sock or not (self.eps[sock].connected or
                                    same_addr(&self.eps[sock].addr, m.msg_name)):
                return -1
            return sock
        if self.eps[path].fd < 0 or not same_addr(&self.eps[path].addr, m.msg_name):
            return -1
        return path

    cdef void learn(self, int sock, int path, msghdr *m) noexcept nogil:
        """Server: an authentic (sealed) or well-formed (clear) probe names,
        or moves, the endpoint of its path."""
        cdef Endpoint *ep = &self.eps[path]
        ep.cmsglen = sticky_source(m, ep.cmsg)
        if ep.fd >= 0 and same_addr(&ep.addr, m.msg_name):
            return
        memcpy(&ep.addr, m.msg_name, m.msg_namelen)
        ep.addrlen = m.msg_namelen
        ep.fd = self.paths.socks[sock]
        ep.learned += 1
        self.ctr.endpoint_changes += 1
        self.paths.changed = True

    cdef inline void arrived(self, int path, size_t n) noexcept nogil:
        self.eps[path].arrived_bytes += n

    cdef inline void count_rx(self, int path, size_t n, uint64_t now) noexcept nogil:
        cdef Endpoint *ep = &self.eps[path]
        ep.c.rx_packets += 1
        ep.c.rx_bytes += n
        ep.last_rx_ns = now

    cdef inline void send(self, int path, Batch *b) noexcept nogil:
        self.paths.send_on(&self.eps[path], path, b)

    cdef inline int send_one(self, int path, const uint8_t *data, size_t n) noexcept nogil:
        return self.paths.send_one(&self.eps[path], data, n)

    # ------------------------------------------------ for the control plane

    cdef set_remote(self, int path, const uint8_t[:] address, int port, bint connected):
        cdef Endpoint *ep
        cdef sockaddr_in *a4
        cdef sockaddr_in6 *a6
        if self.paths.server or not 0 <= path < self.paths.nsocks:
            raise ValueError(f"no client path {path}")
        ep = &self.eps[path]
        memset(&ep.addr, 0, sizeof(sockaddr_storage))
        if address.shape[0] == 4:
            a4 = <sockaddr_in *>&ep.addr
            a4.sin_family = AF_INET
            a4.sin_port = be16(<uint16_t>port)
            memcpy(&a4.sin_addr, &address[0], 4)
            ep.addrlen = sizeof(sockaddr_in)
        elif address.shape[0] == 16:
            a6 = <sockaddr_in6 *>&ep.addr
            a6.sin6_family = AF_INET6
            a6.sin6_port = be16(<uint16_t>port)
            memcpy(&a6.sin6_addr, &address[0], 16)
            ep.addrlen = sizeof(sockaddr_in6)
        else:
            raise ValueError("address must be 4 or 16 bytes")
        ep.connected = connected

    cdef forget(self, int path):
        """Server: stop sending to path ``path``'s endpoint."""
        if self.paths.server and 0 <= path < MAX_PATHS:
            self.eps[path].fd = -1
            self.eps[path].addrlen = 0
            self.eps[path].cmsglen = 0
            self.shaper.forget(path)

    cdef Endpoint *active(self, int path) except NULL:
        if not 0 <= path < MAX_PATHS or self.eps[path].fd < 0:
            raise ValueError(f"no endpoint on path {path}")
        return &self.eps[path]

    cdef list as_list(self):
        """Per-path endpoint, counters, pacing and queue: every path a
        client was given (with or without a socket now), every path a server
        learned."""
        cdef int i
        cdef Endpoint *ep
        cdef dict d
        out = []
        for i in range(MAX_PATHS):
            ep = &self.eps[i]
            if (i >= self.paths.nsocks) if not self.paths.server else (ep.fd < 0 and
                                                                         ep.learned == 0):
                continue
            d = ep.c
            d.update(path=i, active=ep.fd >= 0, udp_gso=ep.gso, last_errno=ep.last_errno,
                     udp_gso_max=ep.gso_max_seg if ep.gso and ep.gso_max_seg < SLOT else None,
                     last_rx_ns=ep.last_rx_ns,
                     remote=sockaddr_to_tuple(&ep.addr) if ep.addrlen else None)
            d.update(self.shaper.path_info(i))
            out.append(d)
        return out
