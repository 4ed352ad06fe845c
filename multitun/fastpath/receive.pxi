# The receive direction: from a path socket's datagrams to the TUN. Each
# datagram's header is checked, then its peer (sealed: by its key id), its
# source (that peer's endpoint on the path), its session or key, the window,
# and sealed, its tag; the first copy of a packet is written to the TUN,
# later copies are dropped. Probes are answered here; probe replies and
# handshakes go up to Python through the control queue, within their
# sources' rates (limiter.pxd). A server under load answers here, with a
# RETRY, a first message whose source has not proved its address
# (addresstoken.pxd).
#
# What is read is checked at once, but written to the TUN a turn's share at
# a time (backlog.pxd): the rest waits in its receive slot (the slots are a
# ring) while the loop reads on into free slots, and a ping read behind a
# stream's backlog is written ahead of it.


@cython.final
cdef class Receiver:
    cdef Tun tun
    cdef Paths paths
    cdef Peers peers
    cdef ControlQueue control
    cdef TunnelCounters *ctr
    # Who sent the last packet that failed authentication or was of the
    # other mode, for the control plane's (rate-limited) log line.
    cdef sockaddr_storage rejected_addr
    # Keys confirmed or a peer session adopted since the engine last looked.
    cdef bint event
    cdef SourceLimiter handshakes
    # A server's: under load, first messages must prove their address, and
    # those that did are held to their rate apart from the rest.
    cdef AddressCheck addresses
    cdef SourceLimiter proven
    # The receive slots (Paths.rxmsg) in use, a ring: from ``first``, ``used``
    # of them hold packets that wait (slot_waiting: how many each); and the
    # slot being read.
    cdef int first
    cdef int used
    cdef uint16_t slot_waiting[BATCH]
    cdef int slot
    # The packets for the TUN that wait for a later turn.
    cdef Backlog backlog

    def __cinit__(self, Tun tun, Paths paths, Peers peers, ControlQueue control,
                  uint64_t limiter_key, uint64_t proven_key, const uint8_t[:] token_key,
                  uint64_t flow_key):
        self.tun = tun
        if not backlog_init(&self.backlog, flow_key):
            raise MemoryError()
        self.paths = paths
        self.peers = peers
        self.control = control
        self.handshakes.key = limiter_key
        self.proven.key = proven_key
        if not address_check_init(&self.addresses, &token_key[0]):
            raise MemoryError("libcrypto could not set up the address tokens")

    def __dealloc__(self):
        address_check_free(&self.addresses)
        backlog_free(&self.backlog)

    cdef int from_path(self, int sock) noexcept nogil:
        """What path socket sock has queued, as far as free receive slots
        hold it: checked, written to the TUN or left waiting (drain()),
        answered or queued for Python; 0, or -errno if the socket broke."""
        cdef int r, i
        cdef int tail = (self.first + self.used) % BATCH
        cdef int room = BATCH - self.used
        cdef size_t n, seg, off
        cdef uint8_t *p
        cdef msghdr *m
        cdef uint64_t now
        if room > BATCH - tail:
            room = BATCH - tail  # to the end of the ring: the rest next turn
        if room == 0:
            return 0  # every slot holds what waits: the socket keeps the rest
        # A client's socket is its path: an error it reports is that path's.
        r = self.paths.receive(sock, NULL if self.paths.server else
                               &(<Peer>self.peers.at[0]).eps[sock], tail, room)
        if r <= 0:
            return r
        now = now_ns()
        self.ctr.rx_batches += 1
        for i in range(tail, tail + r):
            self.slot = i
            self.slot_waiting[i] = 0
            m = &self.paths.rxmsg[i].msg_hdr
            p = <uint8_t *>self.paths.rxiov[i].iov_base
            n = self.paths.rxmsg[i].msg_len
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
        self.used += r
        self._free_slots()
        return 0

    cdef inline bint holding(self) noexcept nogil:
        """Packets wait for the TUN: the engine comes back for them without a
        socket turning readable."""
        return self.backlog.count != 0

    cdef void drain(self) noexcept nogil:
        """The end of a turn of the loop: what waits is written, the oldest
        first, up to the turn's share; then the next turn begins."""
        cdef Waiting *w = backlog_next(&self.backlog)
        while w != NULL:
            self.tun.write(w.p, w.n)
            self.slot_waiting[w.slot] -= 1
            w = backlog_next(&self.backlog)
        if self.backlog.count == 0:
            # A run of TCP segments being coalesced goes on into the next
            # turn while more of it waits: cut at each turn, it would make
            # smaller writes, and the receiver acknowledge more often.
            self.tun.flush()
        self._free_slots()
        backlog_turn(&self.backlog)

    cdef inline void _free_slots(self) noexcept nogil:
        while self.used and self.slot_waiting[self.first] == 0:
            self.first = (self.first + 1) % BATCH
            self.used -= 1
        if self.used == 0:
            self.first = 0  # the whole ring is free: one read may fill it

    cdef void _to_tun(self, uint8_t *p, size_t n) noexcept nogil:
        """A packet for the TUN: written now, or left waiting in its slot."""
        cdef uint32_t bucket
        if backlog_now(&self.backlog, p, n, &bucket):
            self.tun.write(p, n)
            return
        backlog_push(&self.backlog, p, n, self.slot, bucket)
        self.slot_waiting[self.slot] += 1

    cdef void _receive(self, int sock, uint8_t *p, size_t n, msghdr *m,
                       uint64_t now) noexcept nogil:
        """One datagram: check it, then deliver, drop or hand it up."""
        cdef Header h
        cdef int verdict = parse_header(p, n, &h, self.peers.keyed)
        if verdict == H_OK:
            if self.peers.keyed:
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
        # In clear there is one peer: a fleet needs keys (config.py).
        self._plain_from(<Peer>self.peers.at[0], sock, h, p, n, m, now)

    cdef void _plain_from(self, Peer peer, int sock, Header *h, uint8_t *p, size_t n,
                          msghdr *m, uint64_t now) noexcept nogil:
        cdef int path
        if h.ptype != T_DATA and self.paths.server:
            peer.learn(sock, h.path, m)
        path = peer.endpoint_for(sock, h.path, m)
        if path < 0:
            self.ctr.unknown_source += 1
            return
        peer.count_rx(path, n, now)
        peer.arrived(path, n)
        if h.ptype != T_DATA:
            if peer.keyring.adopt_session(h.session):
                self.event = True
            self._on_probe(peer, path, h, p, n, m, now)
        elif h.session != peer.keyring.peer_session:
            self.ctr.wrong_session += 1
        else:
            self._deliver(peer, path, window_check(&peer.keyring.win, h.seq), p, n)

    cdef void _receive_sealed(self, int sock, Header *h, uint8_t *p, size_t n,
                              msghdr *m, uint64_t now) noexcept nogil:
        cdef int peer
        if h.ptype >= T_HANDSHAKE_INIT:  # the keying's
            if h.ptype == T_HANDSHAKE_INIT and self.paths.server:
                if not self._first_message_passes(sock, h, p, m, now):
                    return
            elif not limiter_allow(&self.handshakes, <sockaddr_storage *>m.msg_name, now):
                self.ctr.handshakes_shed += 1
                return
            if not self.paths.server and (<Peer>self.peers.at[0]).endpoint_for(
                    sock, h.path, m) < 0:
                self.ctr.unknown_source += 1
                return
            # A first message's key id is new: on a fleet server, its peer is
            # found by the fingerprint it claims (multitun/peers.py), and the
            # keying proves it.
            peer = -1 if self.peers.fleet else 0
            self.control.push(peer, h.path, p, n, now, self.paths.socks[sock], m)
            return
        peer = self.peers.by_key(h.session)
        if peer < 0:
            self.ctr.wrong_session += 1
            return
        self._sealed_from(<Peer>self.peers.at[peer], sock, h, p, n, m, now)

    cdef void _sealed_from(self, Peer peer, int sock, Header *h, uint8_t *p, size_t n,
                           msghdr *m, uint64_t now) noexcept nogil:
        cdef Keypair *kp
        cdef int path, verdict
        cdef bint probe_to_server = self.paths.server and h.ptype != T_DATA
        if probe_to_server:
            # Probes name their path; a server learns where it is only from
            # one that proves authentic (below).
            path = h.path
        else:
            path = peer.endpoint_for(sock, h.path, m)
            if path < 0:
                self.ctr.unknown_source += 1
                return
            # From the path's endpoint: it counts for feedback even if it
            # turns out a copy that lost the race.
            peer.arrived(path, n)
        kp = peer.keyring.find(h.session)
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
        if peer.keyring.confirm(kp, now):
            self.event = True
        if probe_to_server:
            peer.learn(sock, path, m)
            peer.arrived(path, n + TAG_LEN)
        peer.count_rx(path, n + TAG_LEN, now)
        if h.ptype != T_DATA:
            self._on_probe(peer, path, h, p, n, m, now)
        elif not self.peers.sends_from(peer.index, p + HEADER_LEN, n - HEADER_LEN):
            # Authentic, but from an address that is not this peer's (a
            # client posing as another, inside its own tunnel): dropped.
            peer.c.source_refused += 1
        else:
            self._deliver(peer, path, W_NEW, p, n)

    cdef inline void _deliver(self, Peer peer, int path, int verdict, uint8_t *p,
                              size_t n) noexcept nogil:
        """DATA p[:n] (in clear) that the window judged: hand it to the TUN
        if it is the first copy, else count it."""
        cdef Endpoint *ep = &peer.eps[path]
        if verdict == W_NEW:
            self.ctr.delivered += 1
            self.ctr.delivered_bytes += n - HEADER_LEN
            peer.c.delivered += 1
            peer.c.delivered_bytes += n - HEADER_LEN
            ep.c.first_arrivals += 1
            self._to_tun(p + HEADER_LEN, n - HEADER_LEN)
        elif verdict == W_DUPLICATE:
            self.ctr.duplicates += 1
            ep.c.duplicates += 1
        else:
            self.ctr.too_old += 1

    cdef void _on_probe(self, Peer peer, int path, Header *h, uint8_t *p, size_t n,
                        msghdr *m, uint64_t now) noexcept nogil:
        """A probe (in clear now) is answered here, not in Python, so that
        the round trip has no interpreter in it: the same payload back, with
        feedback where the probe made room for it, so the reply is exactly
        as long as the probe (no amplification). A reply goes up to Python
        for the path's health and capacity."""
        cdef uint8_t reply[HEADER_LEN + PROBE_MAX_PAYLOAD + TAG_LEN]
        cdef size_t r
        cdef uint64_t fb
        if h.ptype == T_PROBE:
            memcpy(reply + HEADER_LEN, p + HEADER_LEN, n - HEADER_LEN)
            if n - HEADER_LEN >= PROBE_FEEDBACK_PAYLOAD:
                # Feedback for the prober's capacity estimate (docs/PROTOCOL.md):
                # when this end received the probe, and every byte that
                # arrived on the path so far (Endpoint.arrived_bytes). Written
                # into the room the probe left, so the reply is no longer
                # than the probe.
                fb = htobe64(now)
                memcpy(reply + HEADER_LEN + 16, &fb, 8)
                fb = htobe64(peer.eps[path].arrived_bytes)
                memcpy(reply + HEADER_LEN + 24, &fb, 8)
            r = peer.keyring.frame(reply, n - HEADER_LEN, T_PROBE_REPLY, <uint8_t>path, h.seq)
            if r:
                peer.send_one(path, reply, r)
        else:
            self.control.push(peer.index, path, p, n, now, peer.eps[path].fd, m)

    cdef bint _first_message_passes(self, int sock, Header *h, const uint8_t *p, msghdr *m,
                                    uint64_t now) noexcept nogil:
        """Whether a first message to this server goes up to the keying.

        Normally each source is held to its rate (limiter.pxd), and what
        passes is metered. Under load (addresstoken.pxd) the source must
        first prove its address: one without its token gets a RETRY, always,
        so that forged sources, which share the limiter's slots with real
        ones, cannot starve a real client of its token; one with its token
        is held to its rate among proven sources only."""
        cdef sockaddr_storage *source = <sockaddr_storage *>m.msg_name
        if loaded(&self.addresses, now):
            if token_valid(&self.addresses, source, h.seq, now):
                if limiter_allow(&self.proven, source, now):
                    return True
                self.ctr.handshakes_shed += 1
                return False
            # Metered within its source's rate only, so that one source
            # alone cannot keep the load on (and every client paying a
            # round trip more); a RETRY whatever its rate.
            if limiter_allow(&self.handshakes, source, now):
                under_load(&self.addresses, now)
            self._retry(sock, h, p, m, now)
            return False
        if not limiter_allow(&self.handshakes, source, now):
            self.ctr.handshakes_shed += 1
            return False
        if not under_load(&self.addresses, now) or token_valid(&self.addresses, source,
                                                                h.seq, now):
            return True
        self._retry(sock, h, p, m, now)  # the one that put the server under load
        return False

    cdef void _retry(self, int sock, Header *h, const uint8_t *p, msghdr *m,
                     uint64_t now) noexcept nogil:
        """Answer a first message that has not proved its source address, under
        load, with a RETRY (addresstoken.pxd): its source's token, and the
        start of the message's ephemeral key, from the address it was sent to.
        Shorter than the message: no amplification."""
        cdef uint8_t retry[HANDSHAKE_RETRY_LEN]
        cdef uint64_t cmsg[CMSG_WORDS]
        cdef size_t cmsglen = sticky_source(m, cmsg)
        put_header(retry, VERSION_SEALED, T_HANDSHAKE_RETRY, h.path, h.session,
                   address_token(&self.addresses, <sockaddr_storage *>m.msg_name,
                                 now // TOKEN_EPOCH_NS))
        memcpy(retry + HEADER_LEN, p + HEADER_LEN + FINGERPRINT_LEN, RETRY_ECHO_LEN)
        self.ctr.handshake_retries += 1
        send_datagram(self.paths.socks[sock], <sockaddr_storage *>m.msg_name, m.msg_namelen,
                      cmsg, cmsglen, retry, HANDSHAKE_RETRY_LEN)

    cdef inline void _rejected(self, msghdr *m) noexcept nogil:
        memcpy(&self.rejected_addr, m.msg_name, m.msg_namelen)
