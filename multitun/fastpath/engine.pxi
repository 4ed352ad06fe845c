# The engine: one tunnel end's packet loop, the pipeline through the parts.
#
#   TUN --Tun.read--> plain packets --Sender (send.pxi): the peer of each
#       (a fleet server: by destination), KeyRing.frame (header, seal) with
#       that peer's keys--> every path where it has an endpoint: Paths.send_on
#       at once, or a paced path's queue (Shaper), sent as its pacer allows
#   path socket --Paths.receive--> Receiver (receive.pxi) --> Tun.write,
#       or ControlQueue

cdef enum:
    # epoll tags of the fds that are not path sockets (those are tagged with
    # their index): the TUN, the wake-up fds, and each peer's pacing timer
    # (TAG_TIMER + the peer's index).
    TAG_TUN = 1000
    TAG_WAKE = 1001
    TAG_TIMER = 1 << 20


@cython.final
cdef class Engine:
    """The packet loop of one tunnel end.

    ``socks`` are the path sockets' fds. A client passes one connect()ed socket
    per path (path i is socket i). A server passes its one listening socket;
    its endpoints are learned from probes, path by path. ``run()`` returns
    when any of ``wake_fds`` is readable (signals). ``keyed`` engines speak
    protocol version 2 only and send nothing until the control plane
    installs keys. ``vnet_hdr``: the TUN carries virtio-net headers.
    ``stale_margin_us``: a paced path's queued copy is stale once it would
    arrive this much later than by the fastest other path. ``fleet``: a
    keyed server with a peer per client (add_peer(), set_routes()); else
    there is one peer, number 0, and every packet is its.
    """

    cdef int epfd
    cdef Tun tun
    cdef Paths pathset
    cdef Peers peers
    cdef ControlQueue control
    cdef Receiver rx
    cdef TunnelCounters ctr
    cdef Batch batch
    cdef Sender tx
    # After activity, poll this long before sleeping in epoll_wait (0: never).
    cdef uint64_t busy_poll_ns
    # Let the tasks waiting for this CPU run while the loop does not sleep.
    cdef bint share_cpu
    # What failed when _run() returned an error: TAG_TUN, TAG_WAKE (epoll
    # itself) or a path socket's index.
    cdef uint32_t failed

    def __cinit__(self, int tun_fd, socks, bint server, uint32_t session,
                  wake_fds=(), bint gso=False, int busy_poll_us=0, bint keyed=False,
                  bint vnet_hdr=False, uint64_t stale_margin_us=60000, bint fleet=False,
                  bint share_cpu=False):
        if session == 0:
            raise ValueError("session must be non-zero")
        if fleet and not (server and keyed):
            raise ValueError("a fleet is a server's, and keyed")
        self.epfd = -1
        self.pathset = Paths(socks, server, gso)
        self.tun = Tun(tun_fd, vnet_hdr, int.from_bytes(os.urandom(8), "little"))
        self.control = ControlQueue()
        self.tun.ctr = self.pathset.ctr = self.control.ctr = &self.ctr
        self.peers = Peers(self.pathset, fleet, session, keyed,
                           int.from_bytes(os.urandom(8), "little"), stale_margin_us * 1000)
        self.rx = Receiver(self.tun, self.pathset, self.peers, self.control,
                           int.from_bytes(os.urandom(8), "little"),
                           int.from_bytes(os.urandom(8), "little"), os.urandom(32),
                           int.from_bytes(os.urandom(8), "little"))
        self.rx.ctr = &self.ctr
        self.tx = Sender(self.peers)
        self.tx.ctr = &self.ctr
        self.batch.slots = <uint8_t *>malloc(BATCH * SLOT)
        if self.batch.slots == NULL:
            raise MemoryError()
        self.busy_poll_ns = <uint64_t>busy_poll_us * 1000
        self.share_cpu = share_cpu
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, os.strerror(errno))
        self._watch(tun_fd, TAG_TUN)
        for fd in wake_fds:
            self._watch(fd, TAG_WAKE)
        for i in range(self.pathset.nsocks):
            if self.pathset.socks[i] >= 0:
                self._watch(self.pathset.socks[i], i)

    cdef _watch(self, int fd, uint32_t tag):
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = 0
        ev.data.u32 = tag
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, os.strerror(errno))

    cdef _unwatch(self, int path):
        # epoll_ctl(2): a closed fd leaves its epoll set by itself, but the
        # caller closes the old socket only after this. ENOENT: not watched.
        cdef int fd = self.pathset.socks[path] if 0 <= path < MAX_PATHS else -1
        if fd >= 0 and epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL) < 0 and errno != ENOENT:
            raise OSError(errno, os.strerror(errno))

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        free(self.batch.slots)

    # ------------------------------------------------------------- the loop

    cdef int _run(self, int timeout_ms) noexcept nogil:
        cdef epoll_event events[MAX_PATHS + 3]
        cdef uint64_t t = now_ns()
        cdef uint64_t deadline = t + <uint64_t>timeout_ms * 1000000ULL
        cdef uint64_t poll_until = t + self.busy_poll_ns
        cdef uint64_t ran_from = t  # when the loop last slept or yielded
        cdef int n, m, i, rc, flags, wait_ms
        cdef bint tun
        while True:
            # Within busy_poll_ns of the last activity, poll without sleeping
            # (the answer to what was just sent often comes back within it, and
            # a sleeping process costs a wake-up); else sleep to the deadline.
            # Never while packets wait here (the TUN's reads, Tun; packets
            # for the TUN, Receiver): epoll cannot say when to come back for
            # those.
            if t < poll_until or self.tun.holding() or self.rx.holding():
                wait_ms = 0
                # A loop that never sleeps keeps its CPU until the scheduler's
                # tick takes it away (4 ms at HZ=250 without full preemption):
                # a task that waits for this CPU, such as an application on
                # the tunnel, waits that long. With share_cpu, sched_yield(2)
                # lets it run every YIELD_EVERY_NS; when nothing waits it
                # returns at once (kernel/sched/fair.c, yield_task_fair). The
                # price: a task that never sleeps gets the CPU for its whole
                # slice at each yield, so a tunnel that is the bottleneck
                # forwards less.
                if self.share_cpu and t - ran_from >= YIELD_EVERY_NS:
                    self.ctr.cpu_yields += 1
                    sched_yield()
                    ran_from = t
            else:
                wait_ms = <int>((deadline - t + 999999) // 1000000) if deadline > t else 0
            n = epoll_wait(self.epfd, events, MAX_PATHS + 3, wait_ms)
            if n < 0:
                # epoll_wait(2): EINTR when a signal handler interrupted the
                # wait; Python must run its handler now.
                if errno == EINTR:
                    return WAKE_SIGNAL
                self.failed = TAG_WAKE
                return -errno
            t = now_ns()
            if wait_ms:
                ran_from = t
            tun = self.tun.holding()
            if n == 0 and not tun and not self.rx.holding():
                if t >= deadline:
                    return WAKE_TIMEOUT
                # sched_yield(2): whoever the last packet woke gets this CPU
                # at once; polling must never delay the traffic it waits for.
                sched_yield()
                ran_from = t
                continue
            poll_until = t + self.busy_poll_ns
            flags = 0
            # Outbound first: when a reply is already queued on the TUN and the
            # duplicate of the packet that caused it is waiting on a path, the
            # reply should not wait for the duplicate to be read and dropped.
            for i in range(n):
                if events[i].data.u32 >= TAG_TIMER:
                    (<Peer>self.peers.at[events[i].data.u32 - TAG_TIMER]).shaper.on_timer()
                elif events[i].data.u32 == TAG_TUN:
                    tun = True
            if tun:
                rc = self._tun_to_paths()
                if rc < 0:
                    self.failed = TAG_TUN
                    return rc
                # What the sockets hold is as old as the batch just sent: a
                # reply that arrived meanwhile is read in this turn, not
                # after the next batch as well.
                m = epoll_wait(self.epfd, events, MAX_PATHS + 3, 0)
                if m >= 0:
                    n = m
            for i in range(n):
                if events[i].data.u32 == TAG_WAKE:
                    flags |= WAKE_FD
                elif events[i].data.u32 >= TAG_TIMER and tun:  # fired during the batch
                    (<Peer>self.peers.at[events[i].data.u32 - TAG_TIMER]).shaper.on_timer()
                elif events[i].data.u32 < TAG_TUN:
                    rc = self.rx.from_path(events[i].data.u32)
                    if rc < 0:
                        self.failed = events[i].data.u32
                        return rc
            self.rx.drain()
            if self.control.n:
                flags |= WAKE_CONTROL
            if self.rx.event or self.pathset.changed:
                flags |= WAKE_EVENT
                self.rx.event = self.pathset.changed = False
            if flags:
                return flags
            if t >= deadline:
                return WAKE_TIMEOUT

    cdef int _tun_to_paths(self) noexcept nogil:
        """One batch from the TUN, a turn of the loop: the path sockets, with
        the acknowledgements and replies on them, wait for no more."""
        cdef Batch *b = &self.batch
        cdef int err
        b.n = 0
        err = self.tun.read(b)
        if b.n:
            self.ctr.tun_batches += 1
            self.tx.send(b)
        return err

    # ------------------------------------------------------------ Python API
    #
    # ``peer``: which peer a call is about; 0, the only one, unless this is
    # a fleet server.

    @property
    def session(self):
        return self.peers.session

    @property
    def peer_session(self):
        return self.peers.get(0).keyring.peer_session

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
            what = ("reading the TUN device" if self.failed == TAG_TUN else "waiting in epoll"
                    if self.failed == TAG_WAKE else f"receiving on path socket {self.failed}")
            raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
        return rc

    def take_control(self):
        """The queued control packets, oldest first, as (peer, path, rx_ns,
        datagram, source, reply_to): probe replies (opened, in sealed mode)
        and handshakes. ``peer`` is -1 for a first message to a fleet server
        (multitun/peers.py finds its peer by the fingerprint it claims).
        ``source`` is the sender's (host, port); ``reply_to`` is a token for
        send_back()."""
        return self.control.take()

    def send_control(self, int path, const uint8_t[:] datagram, int peer=0):
        """Send one datagram as it is on a path; 0 or the errno it failed with."""
        cdef Peer p = self.peers.get(peer)
        p.active(path)
        return p.send_one(path, &datagram[0], datagram.shape[0])

    def send_back(self, uint64_t reply_to, const uint8_t[:] datagram):
        """Send a datagram to where a control packet came from (take_control's
        ``reply_to``), from the address it was sent to; 0 or an errno."""
        cdef ReturnAddress *ra = self.control.reply_address(reply_to)
        return send_datagram(ra.fd, &ra.addr, ra.addrlen, ra.cmsg, ra.cmsglen,
                             &datagram[0], datagram.shape[0])

    def send_probe(self, int path, uint64_t number, uint64_t timestamp_ns, int peer=0):
        """Probe a path: the payload is the timestamp, the probe's number and
        room for the peer's feedback (its clock and the bytes it received
        on the path, filled in by the reply). 0, the errno the send failed
        with, or ENOKEY (sealed mode, no key yet)."""
        cdef uint8_t buf[HEADER_LEN + PROBE_FEEDBACK_PAYLOAD + TAG_LEN]
        cdef uint64_t t = htobe64(timestamp_ns), q = htobe64(number)
        cdef size_t n
        cdef Peer p = self.peers.get(peer)
        p.active(path)
        memset(buf + HEADER_LEN, 0, PROBE_FEEDBACK_PAYLOAD)
        memcpy(buf + HEADER_LEN, &t, 8)
        memcpy(buf + HEADER_LEN + 8, &q, 8)
        n = p.keyring.frame(buf, PROBE_FEEDBACK_PAYLOAD, T_PROBE, <uint8_t>path, number)
        if n == 0:
            return ENOKEY
        return p.send_one(path, buf, n)

    def install_keys(self, uint32_t key_id, const uint8_t[:] send_key,
                     const uint8_t[:] receive_key, bint confirmed,
                     int cipher=CIPHER_AES_256_GCM, int peer=0):
        """Install the keys of a handshake, for ``cipher`` (CIPHERS).
        ``confirmed`` (the initiator, who has seen the response): they become
        current at once and the current ones previous. Not confirmed (the
        responder): they wait in the next slot until the first authentic
        packet under them arrives. On a fleet server, a key id another peer
        has is a ValueError (the client draws another)."""
        cdef Peer p = self.peers.get(peer)
        cdef int owner = self.peers.by_key(key_id)
        if (self.peers.fleet and owner >= 0 and owner != peer
                and self.peers.get(owner).keyring.find(key_id) != NULL):
            raise ValueError(f"key id {key_id:#x} is another peer's")
        p.keyring.install(key_id, send_key, receive_key, confirmed, cipher)
        self.peers.index_keys()

    def drop_keys(self, uint32_t key_id, int peer=0):
        """Forget the keys with this id (expired); True if there were any."""
        dropped = self.peers.get(peer).keyring.drop(key_id)
        self.peers.index_keys()
        return dropped

    def keys(self, int peer=0):
        """The installed keys: slot name, id, age and use."""
        return self.peers.get(peer).keyring.as_list()

    def add_peer(self, int peer):
        """A fleet server: a new peer, with no keys, endpoints or routes yet."""
        if not self.peers.fleet:
            raise ValueError("only a fleet server adds peers")
        self.peers.add(peer)

    def remove_peer(self, int peer):
        """A fleet server: peer ``peer`` is gone, with its keys, endpoints and
        queues (set_routes() without its prefixes first)."""
        if not self.peers.fleet:
            raise ValueError("only a fleet server removes peers")
        self.peers.remove(peer)

    def set_routes(self, routes):
        """A fleet server's allowed IPs, all at once: (peer, packed address,
        prefix length) each. Packets to an address no peer holds are dropped
        (no_route); a peer's packets from an address not its own are dropped
        (source_refused)."""
        if not self.peers.fleet:
            raise ValueError("only a fleet server routes")
        self.peers.set_routes(routes)

    def set_remote(self, int path, const uint8_t[:] address, int port, bint connected):
        """Client: path ``path`` sends to ``address`` (4 or 16 packed bytes)
        ``port``. When its socket is connect()ed the kernel fills in the
        destination and filters the source; when not (no route yet at start),
        the engine does both."""
        self.peers.get(0).set_remote(path, address, port, connected)

    def attach(self, int path, int fd):
        """Client: path ``path`` sends and receives on socket ``fd`` from now
        on (its interface's address changed, or it came back): as a new
        path, with what it counted kept. Close the socket before only after
        this; call set_remote() next."""
        if self.pathset.server or not 0 <= path < MAX_PATHS or fd < 0:
            raise ValueError(f"no client path {path}, or no socket")
        self._unwatch(path)
        self.pathset.attach(path, -1)
        self._watch(fd, path)
        self.pathset.attach(path, fd)
        self.peers.get(0).reset(path)

    def detach(self, int path, bint forget=False):
        """Client: path ``path`` has no socket now (its link is down or its
        interface gone): nothing is sent on it until attach(). ``forget``:
        the path is gone for good, and what it counted with it (a path that
        takes its number later starts from zero)."""
        cdef Peer p
        if self.pathset.server or not 0 <= path < MAX_PATHS:
            raise ValueError(f"no client path {path}")
        p = self.peers.get(0)
        self._unwatch(path)
        self.pathset.attach(path, -1)
        p.reset(path)
        if forget:
            memset(&p.eps[path].c, 0, sizeof(PathCounters))
            p.shaper.forget(path)

    def shape(self, int path, uint64_t rate, uint64_t delay_ns, int peer=0):
        """Pace path ``path`` at ``rate`` bytes/s (0: send at once, as an
        unpaced path does) and take ``delay_ns`` as its one-way delay (0:
        unknown, or down), which says when its queued copies are stale.
        OSError if the peer's first paced path cannot have its timer."""
        cdef Peer p = self.peers.get(peer)
        if rate and p.shaper.timerfd < 0:
            try:
                self._watch(p.shaper.open_timer(), TAG_TIMER + peer)
            except OSError:
                p.shaper.close_timer()  # not watched: it would never wake the loop
                raise
        p.shaper.shape(path, rate, delay_ns)

    def held(self, int path, int peer=0):
        """Whether path ``path``'s pacer held packets back since the last
        call: the pacer, not the path, limited what it sent."""
        return self.peers.get(peer).shaper.held(path)

    def forget(self, int path, int peer=0):
        """Stop sending to a server-side endpoint (it was silent too long)."""
        self.peers.get(peer).forget(path)

    def stats(self):
        """The tunnel's counters, and peer 0's session and key state."""
        cdef dict d = self.ctr
        cdef Peer p = self.peers.get(0) if self.peers.at[0] != NULL else None
        return dict(d, session=self.peers.session,
                    peer_session=p.keyring.peer_session if p else 0,
                    tx_seq=p.keyring.tx_seq if p else 0, keyed=self.peers.keyed,
                    key_id=p.keyring.slot[K_CURRENT].id if p else 0,
                    rejected_from=sockaddr_to_tuple(&self.rx.rejected_addr))

    def peer_stats(self, int peer=0):
        """One peer's counters and current key id."""
        cdef Peer p = self.peers.get(peer)
        cdef dict d = p.c
        return dict(d, key_id=p.keyring.slot[K_CURRENT].id, key_changes=p.keyring.changes)

    def peer_indices(self):
        return self.peers.indices()

    def paths(self, int peer=0):
        """Per-path endpoint, counters, pacing and queue, for every path
        ever used."""
        return self.peers.get(peer).as_list()
