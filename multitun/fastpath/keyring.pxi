# Under which numbers and keys packets leave and are accepted. In clear
# (version 1) that is our session id and sequence, and the peer's session
# with its window. Sealed (version 2) it is the key ring: what we send with,
# the keys before them (their packets may still be in flight), and a
# responder's new keys, unused until the initiator shows it has them. Each
# key has its own replay window. The control plane (multitun/keying.py)
# makes the handshakes; this only holds and uses their keys.

cdef enum:
    K_CURRENT = 0
    K_PREVIOUS = 1
    K_NEXT = 2
    KEY_SLOTS = 3


@cython.final
cdef class KeyRing:
    cdef bint keyed
    cdef TunnelCounters *ctr
    cdef uint32_t session
    cdef uint64_t tx_seq
    cdef uint32_t peer_session
    cdef uint32_t prev_session
    # Keys that became current (ctr.key_changes counts every peer's).
    cdef uint64_t changes
    cdef Window win
    cdef Keypair slot[KEY_SLOTS]

    def __cinit__(self, uint32_t session, bint keyed):
        self.session = session
        self.keyed = keyed

    def __dealloc__(self):
        cdef int i
        for i in range(KEY_SLOTS):
            clear_keypair(&self.slot[i])

    cdef inline size_t frame(self, uint8_t *p, size_t n, uint8_t ptype, uint8_t path,
                             uint64_t number) noexcept nogil:
        """Put the header before the payload p[HEADER_LEN:HEADER_LEN + n] and,
        sealed, seal it (the tag after it). DATA is numbered here; a probe
        carries its own number in clear, a fresh sequence number sealed.
        Returns the datagram's length, or 0 when there is no key to send
        with."""
        cdef Keypair *kp = &self.slot[K_CURRENT]
        if not self.keyed:
            if ptype == T_DATA:
                self.tx_seq += 1
                number = self.tx_seq
            put_header(p, VERSION_PLAIN, ptype, path, self.session, number)
            return n + HEADER_LEN
        if used_up(kp):
            return 0
        kp.tx_seq += 1
        put_header(p, VERSION_SEALED, ptype, path, kp.id, kp.tx_seq)
        if not seal_packet(kp, p, n + HEADER_LEN, kp.tx_seq):
            return 0
        return n + HEADER_LEN + TAG_LEN

    cdef inline Keypair *find(self, uint32_t id) noexcept nogil:
        cdef int i
        for i in range(KEY_SLOTS):
            if self.slot[i].id == id:
                return &self.slot[i]
        return NULL

    cdef bint confirm(self, Keypair *kp, uint64_t now) noexcept nogil:
        """An authentic packet arrived under kp. If kp was waiting in the next
        slot, the initiator has the keys too: they become current. True then."""
        kp.rx_packets += 1
        kp.last_rx_ns = now
        if kp != &self.slot[K_NEXT]:
            return False
        self._rotate(K_NEXT)
        return True

    cdef void _rotate(self, int into) noexcept nogil:
        """The keys in slot `into` become current, the current ones previous."""
        clear_keypair(&self.slot[K_PREVIOUS])
        self.slot[K_PREVIOUS] = self.slot[K_CURRENT]
        if into != K_CURRENT:
            self.slot[K_CURRENT] = self.slot[into]
            memset(&self.slot[into], 0, sizeof(Keypair))
        self.changes += 1
        self.ctr.key_changes += 1

    cdef bint adopt_session(self, uint32_t session) noexcept nogil:
        """A probe in clear names the peer's session. A new one means the peer
        restarted: its sequence numbers start again, so the window does. The
        previous id is remembered so that its packets still in flight cannot
        flip it back. True if it changed."""
        if session == self.peer_session or session == self.prev_session:
            return False
        self.prev_session = self.peer_session
        self.peer_session = session
        memset(&self.win, 0, sizeof(Window))
        self.ctr.session_changes += 1
        return True

    # ------------------------------------------------ for the control plane

    cdef install(self, uint32_t key_id, const uint8_t[:] send_key,
                 const uint8_t[:] receive_key, bint confirmed, int cipher):
        cdef Keypair kp
        if not self.keyed:
            raise ValueError("this engine has no keys (keyed=False)")
        if key_id == 0 or self.find(key_id) != NULL:
            raise ValueError(f"key id {key_id:#x} is 0 or in use")
        if send_key.shape[0] != KEY_LEN or receive_key.shape[0] != KEY_LEN:
            raise ValueError(f"keys are {KEY_LEN} bytes")
        if cipher != CIPHER_AES_256_GCM and cipher != CIPHER_CHACHA20_POLY1305:
            raise ValueError(f"no cipher {cipher}")
        memset(&kp, 0, sizeof(Keypair))
        kp.seal = new_cipher(&send_key[0], 1, cipher)
        kp.open = new_cipher(&receive_key[0], 0, cipher)
        if kp.seal == NULL or kp.open == NULL:
            clear_keypair(&kp)
            raise MemoryError(f"libcrypto could not set up cipher {cipher}")
        kp.id = key_id
        kp.cipher = cipher
        kp.installed_ns = now_ns()
        if confirmed:
            # The initiator, who has seen the response: in use at once.
            self._rotate(K_CURRENT)
            self.slot[K_CURRENT] = kp
        else:
            # The responder: they wait until the first authentic packet.
            clear_keypair(&self.slot[K_NEXT])
            self.slot[K_NEXT] = kp

    cdef bint drop(self, uint32_t key_id):
        cdef Keypair *kp = self.find(key_id) if key_id else NULL
        if kp == NULL:
            return False
        clear_keypair(kp)
        return True

    cdef list as_list(self):
        cdef int i
        cdef uint64_t t = now_ns()
        cdef Keypair *kp
        out = []
        for i, name in enumerate(("current", "previous", "next")):
            kp = &self.slot[i]
            if kp.id:
                out.append({"slot": name, "id": kp.id, "cipher": kp.cipher,
                            "age_s": (t - kp.installed_ns) / 1e9,
                            "tx_seq": kp.tx_seq, "rx_packets": kp.rx_packets,
                            "last_rx_ns": kp.last_rx_ns})
        return out
