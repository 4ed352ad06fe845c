# Path I/O: the path sockets, the peer's endpoint on each path, and the
# batched syscalls. A client has one connect()ed socket per path (path i is
# socket i); a server has one listening socket and learns each path's
# endpoint from the peer's probes. Sending: one sendmmsg() per path per
# batch, with UDP GSO trains of equal-size datagrams (udp(7) UDP_SEGMENT)
# where the path takes them. Receiving: recvmmsg(), UDP GRO trains split by
# the engine. A path's error is counted against that path and never stops
# the others.

cdef struct Endpoint:
    # fd < 0: no endpoint known for this path (server before learning).
    int fd
    # Client sockets are connect()ed: no destination in sendmmsg, and the
    # kernel drops datagrams from any other source.
    bint connected
    sockaddr_storage addr
    socklen_t addrlen
    # Server on a wildcard address: IP_PKTINFO/IPV6_PKTINFO to send from the
    # address the peer wrote to (a reply from another address would be
    # dropped by the peer's connected socket).
    uint64_t cmsg[CMSG_WORDS]
    size_t cmsglen
    uint64_t learned
    # Send trains with UDP_SEGMENT: cleared for good when the path's device
    # cannot (EIO); trains only of datagrams up to gso_max_seg bytes once
    # the path refused longer ones (its MTU).
    bint gso
    size_t gso_max_seg
    int last_errno
    uint64_t last_rx_ns
    # Every byte that reached this end on the path, for the peer's capacity
    # estimate (probe feedback): sealed, also the copies that lost the race
    # to another path and were dropped before decryption (rx_bytes counts
    # only what proved authentic).
    uint64_t arrived_bytes
    PathCounters c


cdef inline bint fatal(int e) noexcept nogil:
    # Errors that mean our fd or buffer is wrong, not that a path is unwell.
    return e == EBADF or e == EFAULT or e == EINVAL or e == ENOTSOCK


cdef object sockaddr_to_tuple(const sockaddr_storage *a):
    cdef const sockaddr_in *a4
    cdef const sockaddr_in6 *a6
    if a.ss_family == AF_INET:
        a4 = <const sockaddr_in *>a
        host = ipaddress.IPv4Address((<const uint8_t *>&a4.sin_addr)[:4])
        return (str(host), be16(a4.sin_port))
    if a.ss_family == AF_INET6:
        a6 = <const sockaddr_in6 *>a
        host = ipaddress.IPv6Address(a6.sin6_addr.s6_addr[:16])
        return (str(host.ipv4_mapped or host), be16(a6.sin6_port))
    return None


cdef inline int send_datagram(int fd, const sockaddr_storage *to, socklen_t tolen,
                              const uint64_t *cmsg, size_t cmsglen,
                              const uint8_t *data, size_t n) noexcept nogil:
    """sendmsg(2) of one datagram; 0 or the errno."""
    cdef msghdr m
    cdef iovec v
    v.iov_base = <void *>data
    v.iov_len = n
    memset(&m, 0, sizeof(msghdr))
    m.msg_iov = &v
    m.msg_iovlen = 1
    m.msg_name = <void *>to
    m.msg_namelen = tolen
    if cmsglen:
        m.msg_control = <void *>cmsg
        m.msg_controllen = cmsglen
    if sendmsg(fd, &m, MSG_DONTWAIT) < 0:
        return errno
    return 0


@cython.final
cdef class Paths:
    cdef bint server
    # socks[i] < 0: client path i has no socket now (its interface is gone).
    cdef int nsocks
    cdef int socks[MAX_PATHS]
    # Whether a path starts out sending UDP GSO trains.
    cdef bint gso
    cdef Endpoint eps[MAX_PATHS]
    cdef TunnelCounters *ctr
    # An endpoint was learned or a path refused a UDP GSO train since the
    # engine last looked.
    cdef bint changed
    cdef mmsghdr txmsg[BATCH]
    cdef int txfirst[BATCH]
    cdef uint64_t txctl[BATCH][CMSG_WORDS]
    cdef uint8_t *rxbuf
    cdef iovec rxiov[BATCH]
    cdef mmsghdr rxmsg[BATCH]
    cdef sockaddr_storage rxaddr[BATCH]
    cdef uint64_t rxcmsg[BATCH][RX_CMSG_WORDS]

    def __cinit__(self, socks, bint server, bint gso):
        cdef int i
        if len(socks) > MAX_PATHS or (server and len(socks) != 1):
            raise ValueError(f"a client takes up to {MAX_PATHS} path sockets (-1: none "
                             f"yet), a server one")
        self.server = server
        self.gso = gso
        self.nsocks = len(socks)
        self.rxbuf = <uint8_t *>malloc(BATCH * SLOT)
        if self.rxbuf == NULL:
            raise MemoryError()
        for i in range(MAX_PATHS):
            memset(&self.eps[i], 0, sizeof(Endpoint))
            self.socks[i] = socks[i] if i < self.nsocks else -1
            self._reset(i)
            if server:
                # No endpoint until learned, and then sent to by address.
                self.eps[i].fd = -1
                self.eps[i].connected = False
        for i in range(BATCH):
            self.rxiov[i].iov_base = self.rxbuf + i * SLOT
            self.rxiov[i].iov_len = SLOT
            self.rxmsg[i].msg_hdr.msg_iov = &self.rxiov[i]
            self.rxmsg[i].msg_hdr.msg_iovlen = 1
            self.rxmsg[i].msg_hdr.msg_name = &self.rxaddr[i]
            self.rxmsg[i].msg_hdr.msg_control = self.rxcmsg[i]

    def __dealloc__(self):
        free(self.rxbuf)

    cdef void _reset(self, int path) noexcept nogil:
        """Path ``path`` sends on its socket now (or nothing, if it has none),
        as a new path would; what it counted stays."""
        cdef Endpoint *ep = &self.eps[path]
        ep.fd = self.socks[path]
        ep.connected = True  # until set_remote() says otherwise
        ep.gso = self.gso
        ep.gso_max_seg = SLOT
        ep.cmsglen = 0

    cdef void attach(self, int path, int fd) noexcept:
        """Client: ``fd`` is path ``path``'s socket from now on (-1: none);
        the engine watches it."""
        self.socks[path] = fd
        if path >= self.nsocks:
            self.nsocks = path + 1
        self._reset(path)

    # ------------------------------------------------------------- sending

    cdef void send_on(self, int path, Batch *b) noexcept nogil:
        cdef Endpoint *ep = &self.eps[path]
        cdef int i, g, r, e, ngroups, sent = 0, first
        cdef size_t iovlen
        for i in range(b.n):
            # sendmmsg copies before returning: patch the path byte in place.
            (<uint8_t *>b.iov[i].iov_base)[2] = <uint8_t>path
        ngroups = self._group(ep, b, 0)
        while sent < ngroups:
            r = sendmmsg(ep.fd, &self.txmsg[sent], ngroups - sent, MSG_DONTWAIT)
            if r >= 0:
                for g in range(sent, sent + r):
                    first = self.txfirst[g]
                    for i in range(first, first + <int>self.txmsg[g].msg_hdr.msg_iovlen):
                        ep.c.tx_packets += 1
                        ep.c.tx_bytes += b.iov[i].iov_len
                sent += r
                continue
            e = errno
            if e == EINTR:
                continue
            first = self.txfirst[sent]
            iovlen = self.txmsg[sent].msg_hdr.msg_iovlen
            if e == EAGAIN:
                # Socket buffer full: drop rather than stall every path.
                ep.c.send_dropped += <uint64_t>(b.n - first)
                return
            ep.last_errno = e
            if iovlen > 1 and (e == EIO or e == EINVAL or e == EMSGSIZE):
                # A train refused, its datagrams go one by one. EIO: the
                # device has no checksum offload (udp_send_skb(), before
                # Linux 6.11), so no train ever will on this path. EINVAL
                # (EMSGSIZE on newer kernels): the datagrams exceed the
                # path's MTU; shorter ones may still go as trains, and the
                # kernel fragments these.
                if e == EIO:
                    ep.gso = False
                else:
                    ep.gso_max_seg = b.iov[first].iov_len - 1
                ep.c.gso_fallbacks += 1
                self.changed = True
                ngroups = self._group(ep, b, first)
                sent = 0
                continue
            if e == EMSGSIZE:
                # This one datagram is too big; the rest may go.
                ep.c.send_errors += iovlen
                sent += 1
                continue
            # ENETUNREACH, EPERM, EHOSTUNREACH, ENOBUFS, ECONNREFUSED...:
            # the path is unwell now. Count the rest; try again next batch.
            ep.c.send_errors += <uint64_t>(b.n - first)
            return

    cdef int _group(self, Endpoint *ep, Batch *b, int first) noexcept nogil:
        """Fill txmsg[] with datagrams first..b.n-1 for ep, one message per
        datagram, or per train where ep takes them: a run of equal-size
        datagrams, the last of which may be shorter (that is what
        UDP_SEGMENT cuts). Returns the number of messages."""
        cdef int g = 0, i = first, j, limit
        cdef size_t seg, ctllen
        cdef msghdr *m
        cdef cmsghdr *c
        while i < b.n:
            seg = b.iov[i].iov_len
            j = i + 1
            if ep.gso and seg <= ep.gso_max_seg:
                limit = GSO_MAX_BYTES // <int>seg
                if limit > GSO_MAX_SEGMENTS:
                    limit = GSO_MAX_SEGMENTS
                while j < b.n and j - i < limit and b.iov[j].iov_len == seg:
                    j += 1
                if j < b.n and j - i < limit and b.iov[j].iov_len < seg:
                    j += 1
            m = &self.txmsg[g].msg_hdr
            m.msg_iov = &b.iov[i]
            m.msg_iovlen = j - i
            m.msg_name = NULL if ep.connected else <void *>&ep.addr
            m.msg_namelen = 0 if ep.connected else ep.addrlen
            m.msg_flags = 0
            ctllen = ep.cmsglen
            memcpy(self.txctl[g], ep.cmsg, ctllen)
            if j - i > 1:
                c = <cmsghdr *>(<uint8_t *>self.txctl[g] + ctllen)
                c.cmsg_level = SOL_UDP
                c.cmsg_type = UDP_SEGMENT
                c.cmsg_len = CMSG_LEN(sizeof(uint16_t))
                (<uint16_t *>CMSG_DATA(c))[0] = <uint16_t>seg
                ctllen += CMSG_SPACE(sizeof(uint16_t))
            m.msg_control = <void *>self.txctl[g] if ctllen else NULL
            m.msg_controllen = ctllen
            self.txfirst[g] = i
            g += 1
            i = j
        return g

    cdef int send_one(self, int path, const uint8_t *data, size_t n) noexcept nogil:
        """One datagram on one path (probes, their replies, handshakes);
        0 or the errno it failed with."""
        cdef Endpoint *ep = &self.eps[path]
        cdef int e = send_datagram(ep.fd, NULL if ep.connected else &ep.addr,
                                   0 if ep.connected else ep.addrlen,
                                   ep.cmsg, ep.cmsglen, data, n)
        if e:
            ep.c.send_errors += 1
            ep.last_errno = e
            return e
        ep.c.tx_packets += 1
        ep.c.tx_bytes += n
        return 0

    # ----------------------------------------------------------- receiving

    cdef int receive(self, int sock) noexcept nogil:
        """Take what the socket has queued now into rxmsg[]: how many
        datagrams (or trains), or -errno if the socket itself is broken."""
        cdef int r, i, e
        for i in range(BATCH):
            self.rxmsg[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            self.rxmsg[i].msg_hdr.msg_controllen = sizeof(self.rxcmsg[i])
            self.rxmsg[i].msg_hdr.msg_flags = 0
        while True:
            r = recvmmsg(self.socks[sock], self.rxmsg, BATCH, MSG_DONTWAIT, NULL)
            if r >= 0:
                return r
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN:
                return 0
            if fatal(e):
                return -e
            # udp(7): an ICMP error queued on a connected socket is reported
            # once, by the next call (ECONNREFUSED...). The path stays.
            if not self.server:
                self.eps[sock].c.recv_errors += 1
                self.eps[sock].last_errno = e
            return 0

    cdef inline int endpoint_for(self, int sock, int path, const msghdr *m) noexcept nogil:
        """The path a datagram belongs to, or -1 if its source is not that
        path's endpoint."""
        if not self.server:
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
        ep.fd = self.socks[sock]
        ep.learned += 1
        self.ctr.endpoint_changes += 1
        self.changed = True

    cdef inline void arrived(self, int path, size_t n) noexcept nogil:
        self.eps[path].arrived_bytes += n

    cdef inline void count_rx(self, int path, size_t n, uint64_t now) noexcept nogil:
        cdef Endpoint *ep = &self.eps[path]
        ep.c.rx_packets += 1
        ep.c.rx_bytes += n
        ep.last_rx_ns = now

    # ------------------------------------------------ for the control plane

    cdef set_remote(self, int path, const uint8_t[:] address, int port, bint connected):
        cdef Endpoint *ep
        cdef sockaddr_in *a4
        cdef sockaddr_in6 *a6
        if self.server or not 0 <= path < self.nsocks:
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
        if self.server and 0 <= path < MAX_PATHS:
            self.eps[path].fd = -1
            self.eps[path].addrlen = 0
            self.eps[path].cmsglen = 0

    cdef Endpoint *active(self, int path) except NULL:
        if not 0 <= path < MAX_PATHS or self.eps[path].fd < 0:
            raise ValueError(f"no endpoint on path {path}")
        return &self.eps[path]

    cdef list as_list(self):
        """Per-path endpoint and counters: every path a client was given (with
        or without a socket now), every path a server learned."""
        cdef int i
        cdef Endpoint *ep
        cdef dict d
        out = []
        for i in range(MAX_PATHS):
            ep = &self.eps[i]
            if (i >= self.nsocks) if not self.server else (ep.fd < 0 and ep.learned == 0):
                continue
            d = ep.c
            d.update(path=i, active=ep.fd >= 0, udp_gso=ep.gso, last_errno=ep.last_errno,
                     udp_gso_max=ep.gso_max_seg if ep.gso and ep.gso_max_seg < SLOT else None,
                     last_rx_ns=ep.last_rx_ns,
                     remote=sockaddr_to_tuple(&ep.addr) if ep.addrlen else None)
            out.append(d)
        return out

