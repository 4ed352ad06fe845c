# Path I/O: the path sockets and the batched syscalls, shared by every peer
# (each peer keeps its endpoint on each path: peer.pxi). A client has one
# connect()ed socket per path (path i is socket i); a server has one
# listening socket and learns each peer's endpoints from its probes.
# Sending: one sendmmsg() per path per batch, with UDP GSO trains of
# equal-size datagrams (udp(7) UDP_SEGMENT) where the path takes them.
# Receiving: recvmmsg(), UDP GRO trains split by the engine. A path's error
# is counted against that path and never stops the others.

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
            self.socks[i] = socks[i] if i < self.nsocks else -1
        for i in range(BATCH):
            self.rxiov[i].iov_base = self.rxbuf + i * SLOT
            self.rxiov[i].iov_len = SLOT
            self.rxmsg[i].msg_hdr.msg_iov = &self.rxiov[i]
            self.rxmsg[i].msg_hdr.msg_iovlen = 1
            self.rxmsg[i].msg_hdr.msg_name = &self.rxaddr[i]
            self.rxmsg[i].msg_hdr.msg_control = self.rxcmsg[i]

    def __dealloc__(self):
        free(self.rxbuf)

    cdef void attach(self, int path, int fd) noexcept:
        """Client: ``fd`` is path ``path``'s socket from now on (-1: none);
        the engine watches it."""
        self.socks[path] = fd
        if path >= self.nsocks:
            self.nsocks = path + 1

    # ------------------------------------------------------------- sending

    cdef void send_on(self, Endpoint *ep, int path, Batch *b) noexcept nogil:
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

    cdef int send_one(self, Endpoint *ep, const uint8_t *data, size_t n) noexcept nogil:
        """One datagram to one endpoint (probes, their replies, handshakes);
        0 or the errno it failed with."""
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

    cdef int receive(self, int sock, Endpoint *ep, int first, int count) noexcept nogil:
        """Take what the socket has queued now into rxmsg[first:first + count]:
        how many datagrams (or trains), or -errno if the socket itself is
        broken. ``ep``: the client's endpoint on the socket's path, which an
        error the socket reports is counted against (NULL on a server)."""
        cdef int r, i, e
        for i in range(first, first + count):
            self.rxmsg[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            self.rxmsg[i].msg_hdr.msg_controllen = sizeof(self.rxcmsg[i])
            self.rxmsg[i].msg_hdr.msg_flags = 0
        while True:
            r = recvmmsg(self.socks[sock], &self.rxmsg[first], count, MSG_DONTWAIT, NULL)
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
            if ep != NULL:
                ep.c.recv_errors += 1
                ep.last_errno = e
            return 0
