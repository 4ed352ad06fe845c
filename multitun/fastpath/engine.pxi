# The engine: one tunnel end's packet loop, the pipeline through the parts.
#
#   TUN --Tun.read--> plain packets --KeyRing.frame (header, seal)-->
#       Paths.send: every path that has an endpoint
#   path socket --Paths.receive--> datagrams --parse_header--> endpoint check
#       --> window (KeyRing) [--open, sealed] --> Tun.write
#       probes answered here; probe replies and handshakes --> ControlQueue

cdef enum:
    # epoll tags of the fds that are not path sockets (those are tagged with
    # their index).
    TAG_TUN = 1000
    TAG_WAKE = 1001


@cython.final
cdef class Engine:
    """The packet loop of one tunnel end.

    ``socks`` are the path sockets' fds. A client passes one connect()ed socket
    per path (path i is socket i). A server passes its one listening socket;
    its endpoints are learned from probes, path by path. ``run()`` returns
    when any of ``wake_fds`` is readable (signals). ``keyed`` engines speak
    protocol version 2 only and send nothing until the control plane
    installs keys. ``vnet_hdr``: the TUN carries virtio-net headers.
    """

    cdef int epfd
    cdef Tun tun
    cdef Paths pathset
    cdef KeyRing keyring
    cdef ControlQueue control
    cdef TunnelCounters ctr
    cdef Batch batch
    # After activity, poll this long before sleeping in epoll_wait (0: never).
    cdef uint64_t busy_poll_ns
    # Who sent the last packet that failed authentication or was of the
    # other mode, for the control plane's (rate-limited) log line.
    cdef sockaddr_storage rejected_addr
    # Keys confirmed or a peer session adopted since run() last returned.
    cdef bint event

    def __cinit__(self, int tun_fd, socks, bint server, uint32_t session,
                  wake_fds=(), bint gso=False, int busy_poll_us=0, bint keyed=False,
                  bint vnet_hdr=False):
        if session == 0:
            raise ValueError("session must be non-zero")
        self.epfd = -1
        self.pathset = Paths(socks, server, gso)
        self.tun = Tun(tun_fd, vnet_hdr)
        self.keyring = KeyRing(session, keyed)
        self.control = ControlQueue()
        self.tun.ctr = self.pathset.ctr = self.keyring.ctr = self.control.ctr = &self.ctr
        self.batch.slots = <uint8_t *>malloc(BATCH * SLOT)
        if self.batch.slots == NULL:
            raise MemoryError()
        self.busy_poll_ns = <uint64_t>busy_poll_us * 1000
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, os.strerror(errno))
        self._watch(tun_fd, TAG_TUN)
        for fd in wake_fds:
            self._watch(fd, TAG_WAKE)
        for i in range(self.pathset.nsocks):
            self._watch(self.pathset.socks[i], i)

    cdef _watch(self, int fd, uint32_t tag):
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = 0
        ev.data.u32 = tag
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, os.strerror(errno))

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        free(self.batch.slots)

    # ------------------------------------------------------------- the loop

    cdef int _run(self, int timeout_ms) noexcept nogil:
        cdef epoll_event events[MAX_PATHS + 2]
        cdef uint64_t t = now_ns()
        cdef uint64_t deadline = t + <uint64_t>timeout_ms * 1000000ULL
        cdef uint64_t poll_until = t + self.busy_poll_ns
        cdef int n, i, rc, flags, wait_ms
        while True:
            # Within busy_poll_ns of the last activity, poll without sleeping
            # (the answer to what was just sent often comes back within it, and
            # a sleeping process costs a wake-up); else sleep to the deadline.
            if t < poll_until:
                wait_ms = 0
            else:
                wait_ms = <int>((deadline - t + 999999) // 1000000) if deadline > t else 0
            n = epoll_wait(self.epfd, events, MAX_PATHS + 2, wait_ms)
            if n < 0:
                # epoll_wait(2): EINTR when a signal handler interrupted the
                # wait; Python must run its handler now.
                return WAKE_SIGNAL if errno == EINTR else -errno
            t = now_ns()
            if n == 0:
                if t >= deadline:
                    return WAKE_TIMEOUT
                # sched_yield(2): whoever the last packet woke gets this CPU
                # at once; polling must never delay the traffic it waits for.
                sched_yield()
                continue
            poll_until = t + self.busy_poll_ns
            flags = 0
            # Outbound first: when a reply is already queued on the TUN and the
            # duplicate of the packet that caused it is waiting on a path, the
            # reply should not wait for the duplicate to be read and dropped.
            for i in range(n):
                if events[i].data.u32 == TAG_TUN:
                    rc = self._tun_to_paths()
                    if rc < 0:
                        return rc
            for i in range(n):
                if events[i].data.u32 == TAG_WAKE:
                    flags |= WAKE_FD
                elif events[i].data.u32 != TAG_TUN:
                    rc = self._paths_to_tun(events[i].data.u32)
                    if rc < 0:
                        return rc
            if self.control.n:
                flags |= WAKE_CONTROL
            if self.event or self.pathset.changed:
                flags |= WAKE_EVENT
                self.event = self.pathset.changed = False
            if flags:
                return flags
            if t >= deadline:
                return WAKE_TIMEOUT

    cdef int _tun_to_paths(self) noexcept nogil:
        cdef Batch *b = &self.batch
        cdef int i, kept, err
        cdef size_t n
        cdef uint8_t *p
        while True:
            b.n = 0
            err = self.tun.read(b)
            # Framed in place; a packet that cannot leave (no key yet) is
            # left out of the iovecs.
            kept = 0
            for i in range(b.n):
                p = <uint8_t *>b.iov[i].iov_base - HEADER_LEN
                n = self.keyring.frame(p, b.iov[i].iov_len, T_DATA, 0, 0)
                if n == 0:
                    self.ctr.no_key += 1
                    continue
                b.iov[kept].iov_base = p
                b.iov[kept].iov_len = n
                kept += 1
            b.n = kept
            if kept:
                self.ctr.tun_batches += 1
                self.pathset.send(b)
            if err or not self.tun.splitting():
                return err

    cdef int _paths_to_tun(self, int sock) noexcept nogil:
        cdef int r, i
        cdef size_t n, seg, off
        cdef uint8_t *p
        cdef msghdr *m
        cdef uint64_t now
        r = self.pathset.receive(sock)
        if r <= 0:
            return r
        now = now_ns()
        self.ctr.rx_batches += 1
        for i in range(r):
            m = &self.pathset.rxmsg[i].msg_hdr
            p = <uint8_t *>self.pathset.rxiov[i].iov_base
            n = self.pathset.rxmsg[i].msg_len
            if m.msg_flags & MSG_TRUNC:
                self.ctr.malformed += 1
                continue
            if m.msg_flags & MSG_CTRUNC:
                # The source address to answer from, or the GRO segment size,
                # may be what was cut: nothing about this datagram is sure.
                self.ctr.truncated += 1
                continue
            # With UDP_GRO a slot may hold a train of datagrams, each `seg`
            # long but the last (udp(7)); each is a datagram of its own.
            seg = gro_segment_size(m)
            if seg == 0:
                seg = n
            off = 0
            while off < n:
                self._receive(sock, p + off, seg if n - off > seg else n - off, m, now)
                off += seg
        self.tun.flush()
        return 0

    cdef void _receive(self, int sock, uint8_t *p, size_t n, msghdr *m,
                       uint64_t now) noexcept nogil:
        """One datagram: check it, then deliver, drop or hand it up."""
        cdef Header h
        cdef int verdict = parse_header(p, n, &h, self.keyring.keyed)
        if verdict == H_OK:
            if self.keyring.keyed:
                self._receive_sealed(sock, &h, p, n, m, now)
            else:
                self._receive_plain(sock, &h, p, n, m, now)
            return
        if verdict == H_OTHER_MODE:
            self.ctr.key_mismatch += 1
            self._rejected(m)
        else:
            self.ctr.malformed += 1

    cdef void _receive_plain(self, int sock, Header *h, uint8_t *p, size_t n,
                             msghdr *m, uint64_t now) noexcept nogil:
        cdef int path
        if h.ptype != T_DATA and self.pathset.server:
            self.pathset.learn(sock, h.path, m)
        path = self.pathset.endpoint_for(sock, h.path, m)
        if path < 0:
            self.ctr.unknown_source += 1
            return
        self.pathset.count_rx(path, n, now)
        if h.ptype != T_DATA:
            if self.keyring.adopt_session(h.session):
                self.event = True
            self._on_probe(path, h, p, n, m, now)
        elif h.session != self.keyring.peer_session:
            self.ctr.wrong_session += 1
        else:
            self._deliver(path, window_check(&self.keyring.win, h.seq), p, n)

    cdef void _receive_sealed(self, int sock, Header *h, uint8_t *p, size_t n,
                              msghdr *m, uint64_t now) noexcept nogil:
        cdef Keypair *kp
        cdef int path, verdict
        cdef bint probe_to_server = self.pathset.server and h.ptype != T_DATA
        if probe_to_server:
            # Probes and handshakes name their path; a server learns where it
            # is only from one that proves authentic (below, or in Python).
            path = h.path
        else:
            path = self.pathset.endpoint_for(sock, h.path, m)
            if path < 0:
                self.ctr.unknown_source += 1
                return
        if h.ptype == T_HANDSHAKE_INIT or h.ptype == T_HANDSHAKE_RESPONSE:
            self.control.push(path, p, n, now, self.pathset.socks[sock], m)
            return
        kp = self.keyring.find(h.session)
        if kp == NULL:
            self.ctr.wrong_session += 1
            return
        # The window first: a copy that lost the race, or a replay, is
        # dropped without spending a decryption on it, and since it proved
        # nothing it moves no per-path counter and keeps no path alive.
        verdict = window_test(&kp.win, h.seq)
        if verdict != W_NEW:
            if verdict == W_DUPLICATE:
                self.ctr.duplicates += 1
            else:
                self.ctr.too_old += 1
            return
        if not open_packet(kp, p, n, h.seq):
            self.ctr.auth_failed += 1
            self._rejected(m)
            return
        n -= TAG_LEN
        if not payload_fits(h.ptype, p + HEADER_LEN, n - HEADER_LEN):
            self.ctr.malformed += 1  # authentic, but not what the protocol allows
            return
        window_mark(&kp.win, h.seq)
        if self.keyring.confirm(kp, now):
            self.event = True
        if probe_to_server:
            self.pathset.learn(sock, path, m)
        self.pathset.count_rx(path, n + TAG_LEN, now)
        if h.ptype != T_DATA:
            self._on_probe(path, h, p, n, m, now)
        else:
            self._deliver(path, W_NEW, p, n)

    cdef inline void _deliver(self, int path, int verdict, uint8_t *p, size_t n) noexcept nogil:
        """DATA p[:n] (in clear) that the window judged: hand it to the TUN
        if it is the first copy, else count it."""
        cdef Endpoint *ep = &self.pathset.eps[path]
        if verdict == W_NEW:
            self.ctr.delivered += 1
            self.ctr.delivered_bytes += n - HEADER_LEN
            ep.c.first_arrivals += 1
            self.tun.write(p + HEADER_LEN, n - HEADER_LEN)
        elif verdict == W_DUPLICATE:
            self.ctr.duplicates += 1
            ep.c.duplicates += 1
        else:
            self.ctr.too_old += 1

    cdef void _on_probe(self, int path, Header *h, uint8_t *p, size_t n, msghdr *m,
                        uint64_t now) noexcept nogil:
        """A probe (in clear now) is answered here, not in Python, so that
        the round trip has no interpreter in it: the same payload back, so
        the reply is exactly as long as the probe (no amplification). A
        reply goes up to Python for the path's health."""
        cdef uint8_t reply[HEADER_LEN + PROBE_MAX_PAYLOAD + TAG_LEN]
        cdef size_t r
        if h.ptype == T_PROBE:
            memcpy(reply + HEADER_LEN, p + HEADER_LEN, n - HEADER_LEN)
            r = self.keyring.frame(reply, n - HEADER_LEN, T_PROBE_REPLY, <uint8_t>path, h.seq)
            if r:
                self.pathset.send_one(path, reply, r)
        else:
            self.control.push(path, p, n, now, self.pathset.eps[path].fd, m)

    cdef inline void _rejected(self, msghdr *m) noexcept nogil:
        memcpy(&self.rejected_addr, m.msg_name, m.msg_namelen)

    # ------------------------------------------------------------ Python API

    @property
    def session(self):
        return self.keyring.session

    @property
    def peer_session(self):
        return self.keyring.peer_session

    def run(self, int timeout_ms):
        """Move packets for up to ``timeout_ms``. Returns a mask of WAKE_* flags
        saying why it stopped early (control packets queued, wake fd readable,
        a signal, an endpoint, key or peer session changed) or WAKE_TIMEOUT.
        An error the data plane cannot go on after (a TUN or socket that
        broke) raises OSError."""
        cdef int rc
        with nogil:
            rc = self._run(timeout_ms)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        return rc

    def take_control(self):
        """The queued control packets, oldest first, as (path, rx_ns, datagram,
        source, reply_to): probe replies (opened, in sealed mode) and
        handshakes. ``source`` is the sender's (host, port); ``reply_to`` is
        a token for send_back()."""
        return self.control.take()

    def send_control(self, int path, const uint8_t[:] datagram):
        """Send one datagram as it is on a path; 0 or the errno it failed with."""
        self.pathset.active(path)
        return self.pathset.send_one(path, &datagram[0], datagram.shape[0])

    def send_back(self, uint64_t reply_to, const uint8_t[:] datagram):
        """Send a datagram to where a control packet came from (take_control's
        ``reply_to``), from the address it was sent to; 0 or an errno."""
        cdef ReturnAddress *ra = self.control.reply_address(reply_to)
        return send_datagram(ra.fd, &ra.addr, ra.addrlen, ra.cmsg, ra.cmsglen,
                             &datagram[0], datagram.shape[0])

    def send_probe(self, int path, uint64_t number, uint64_t timestamp_ns):
        """Probe a path: the payload is the timestamp and the probe's number.
        0, the errno the send failed with, or ENOKEY (sealed mode, no key yet)."""
        cdef uint8_t buf[HEADER_LEN + PROBE_MIN_PAYLOAD + TAG_LEN]
        cdef uint64_t t = htobe64(timestamp_ns), q = htobe64(number)
        cdef size_t n
        self.pathset.active(path)
        memcpy(buf + HEADER_LEN, &t, 8)
        memcpy(buf + HEADER_LEN + 8, &q, 8)
        n = self.keyring.frame(buf, PROBE_MIN_PAYLOAD, T_PROBE, <uint8_t>path, number)
        if n == 0:
            return ENOKEY
        return self.pathset.send_one(path, buf, n)

    def install_keys(self, uint32_t key_id, const uint8_t[:] send_key,
                     const uint8_t[:] receive_key, bint confirmed):
        """Install the keys of a handshake. ``confirmed`` (the initiator, who
        has seen the response): they become current at once and the current
        ones previous. Not confirmed (the responder): they wait in the next
        slot until the first authentic packet under them arrives."""
        self.keyring.install(key_id, send_key, receive_key, confirmed)

    def drop_keys(self, uint32_t key_id):
        """Forget the keys with this id (expired); True if there were any."""
        return self.keyring.drop(key_id)

    def keys(self):
        """The installed keys: slot name, id, age and use."""
        return self.keyring.as_list()

    def set_remote(self, int path, const uint8_t[:] address, int port, bint connected):
        """Client: path ``path`` sends to ``address`` (4 or 16 packed bytes)
        ``port``. When its socket is connect()ed the kernel fills in the
        destination and filters the source; when not (no route yet at start),
        the engine does both."""
        self.pathset.set_remote(path, address, port, connected)

    def forget(self, int path):
        """Stop sending to a server-side endpoint (it was silent too long)."""
        self.pathset.forget(path)

    def stats(self):
        """The tunnel's counters, and its session and key state."""
        cdef dict d = self.ctr
        return dict(d, session=self.keyring.session, peer_session=self.keyring.peer_session,
                    tx_seq=self.keyring.tx_seq, keyed=self.keyring.keyed,
                    key_id=self.keyring.slot[K_CURRENT].id,
                    rejected_from=sockaddr_to_tuple(&self.rejected_addr))

    def paths(self):
        """Per-path endpoint and counters, for every path ever used."""
        return self.pathset.as_list()
