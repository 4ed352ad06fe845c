# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The multitun data plane.

One ``Engine`` moves packets between a TUN fd and the path sockets:

    TUN --read()--> header [--seal] --sendmmsg()--> every path that has an endpoint
    path socket --recvmmsg()--> check header, source, key or session --> window
        [--open] --> write() TUN

``Engine.run()`` loops under ``nogil`` until its timeout, a wake-up fd turns
readable (Python's signal.set_wakeup_fd), or control packets are waiting for
Python. Nothing in the loop creates a Python object; buffers are allocated once.
Syscall errors become OSError only after the GIL is back. A send error on one
path is counted against that path and never ends the loop.

With a key (sealed mode, protocol version 2) every packet is sealed with
AES-256-GCM through libcrypto's EVP interface, under keys the control plane
derives by handshake (multitun/noise.py) and installs here. A packet is
opened only after the replay window says its number is new, so the copies of
a packet that lose the race cost no cryptography.

The wire format is in multitun/wire.py and docs/PROTOCOL.md.
"""

from libc.errno cimport (
    errno, EAGAIN, EINTR, EBADF, EFAULT, EINVAL, EIO, EMSGSIZE, ENOTSOCK,
)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memmove, memset, memcmp
from posix.unistd cimport read, write, close

cdef extern from "<sched.h>" nogil:
    int sched_yield()


from .includes.linux cimport *
from .includes.openssl cimport *

import ipaddress
import os

# Verdicts of the de-duplication window (multitun/_reference.py has the same).
cdef enum:
    W_NEW = 0
    W_DUPLICATE = 1
    W_TOO_OLD = 2

# What parse_header() makes of a datagram.
cdef enum:
    H_OK = 0
    H_MALFORMED = 1
    # Well formed, but of the other mode: a peer without a key while we have
    # one, or the reverse.
    H_OTHER_MODE = 2

# A key seals at most this many packets (a 64-bit counter never wraps in
# practice, and the control plane rekeys every two minutes anyway).
cdef uint64_t REJECT_AFTER_MESSAGES = 0xFFFFFFFFFFFFE000ULL


# ---------------------------------------------------------------- header codec

cdef inline void put_header(uint8_t *p, uint8_t version, uint8_t ptype, uint8_t path,
                            uint32_t session, uint64_t seq) noexcept nogil:
    cdef uint32_t s = htobe32(session)
    cdef uint64_t q = htobe64(seq)
    p[0] = version
    p[1] = ptype
    p[2] = path
    p[3] = 0
    memcpy(p + 4, &s, 4)
    memcpy(p + 8, &q, 8)


cdef inline bint payload_fits(uint8_t ptype, const uint8_t *payload, size_t n) noexcept nogil:
    """What a payload in clear must be: DATA an IP packet (with IFF_NO_PI the
    TUN takes the protocol from the first nibble), probes 16..64 bytes."""
    cdef uint8_t ipver
    if ptype == T_DATA:
        if n < 1:
            return False
        ipver = payload[0] >> 4
        return (ipver == 4 and n >= 20) or (ipver == 6 and n >= 40)
    if ptype == T_PROBE or ptype == T_PROBE_REPLY:
        return PROBE_MIN_PAYLOAD <= n <= PROBE_MAX_PAYLOAD
    return False


cdef inline bint sealed_length_fits(uint8_t ptype, size_t n) noexcept nogil:
    """What can be checked of a sealed datagram before opening it: its length."""
    if ptype == T_DATA:
        return n >= HEADER_LEN + TAG_LEN + 20
    if ptype == T_PROBE or ptype == T_PROBE_REPLY:
        return HEADER_LEN + TAG_LEN + PROBE_MIN_PAYLOAD <= n <= HEADER_LEN + TAG_LEN + PROBE_MAX_PAYLOAD
    if ptype == T_HANDSHAKE_INIT:
        return n == HANDSHAKE_INIT_LEN
    if ptype == T_HANDSHAKE_RESPONSE:
        return n == HANDSHAKE_RESPONSE_LEN
    return False


cdef inline int parse_header(const uint8_t *p, size_t n, Header *h, bint keyed) noexcept nogil:
    """Validate a datagram the way wire.unpack_header does: H_OK, H_MALFORMED,
    or H_OTHER_MODE for a well-formed packet of the mode we are not in."""
    cdef uint32_t s
    cdef uint64_t q
    cdef bint fits
    if n < HEADER_LEN or p[3] != 0 or p[2] >= MAX_PATHS:
        return H_MALFORMED
    memcpy(&s, p + 4, 4)
    memcpy(&q, p + 8, 8)
    h.version = p[0]
    h.ptype = p[1]
    h.path = p[2]
    h.session = be32toh(s)
    h.seq = be64toh(q)
    if h.session == 0:
        return H_MALFORMED
    if h.version == VERSION_PLAIN:
        fits = payload_fits(h.ptype, p + HEADER_LEN, n - HEADER_LEN)
    elif h.version == VERSION_SEALED:
        fits = sealed_length_fits(h.ptype, n)
    else:
        return H_MALFORMED
    if not fits:
        return H_MALFORMED
    if (h.version == VERSION_SEALED) != keyed:
        return H_OTHER_MODE
    return H_OK


def pack_header(int ptype, int path, uint32_t session, uint64_t seq,
                int version=VERSION_PLAIN):
    """Compiled twin of wire.pack_header (for tests and benchmarks)."""
    cdef uint8_t buf[HEADER_LEN]
    put_header(buf, <uint8_t>version, <uint8_t>ptype, <uint8_t>path, session, seq)
    return bytes(buf[:HEADER_LEN])


def unpack_header(const uint8_t[:] datagram):
    """Compiled twin of wire.unpack_header: (type, path, session, seq, version),
    or ValueError when the datagram is malformed. A version-2 datagram is
    checked as sealed (its length only)."""
    cdef Header h
    cdef const uint8_t *p = &datagram[0] if datagram.shape[0] else NULL
    cdef bint sealed = datagram.shape[0] > 0 and p[0] == VERSION_SEALED
    if parse_header(p, datagram.shape[0], &h, sealed) != H_OK:
        raise ValueError("malformed datagram")
    return (h.ptype, h.path, h.session, h.seq, h.version)


# ----------------------------------------------------------------------- AEAD
# AES-256-GCM through EVP (EVP_EncryptInit(3), "AEAD INTERFACE"). A context is
# keyed once; each packet only sets the nonce: Noise's for AESGCM, 32 zero
# bits, then the 64-bit sequence number big-endian. Sealing and opening work
# in place (out == in is allowed). AES-GCM rather than ChaCha20-Poly1305: with
# AES instructions it seals a 1400-byte packet in 0.6 us here against 1.45 us
# (libcrypto 3.0, the call sequence below), and on the cellular paths this
# tunnel serves the CPU is the limit once offloads are in.

cdef EVP_CIPHER_CTX *new_cipher(const uint8_t *key, int seal) noexcept nogil:
    cdef EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new()
    if ctx != NULL and EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL,
                                         key, NULL, seal) != 1:
        EVP_CIPHER_CTX_free(ctx)
        return NULL
    return ctx


cdef bint aead(EVP_CIPHER_CTX *ctx, bint seal, uint64_t seq, const uint8_t *ad,
               size_t adlen, uint8_t *data, size_t n, uint8_t *tag) noexcept nogil:
    """Seal or open data[:n] in place. Sealing writes the tag; opening checks
    it and returns False if the packet is not authentic."""
    cdef uint8_t nonce[NONCE_LEN]
    cdef uint8_t tail[TAG_LEN]
    cdef uint64_t be = htobe64(seq)
    cdef int outl
    memset(nonce, 0, 4)
    memcpy(nonce + 4, &be, 8)
    if EVP_CipherInit_ex(ctx, NULL, NULL, NULL, nonce, -1) != 1:
        return False
    if not seal and EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, tag) != 1:
        return False
    if adlen and EVP_CipherUpdate(ctx, NULL, &outl, ad, <int>adlen) != 1:
        return False
    if n and EVP_CipherUpdate(ctx, data, &outl, data, <int>n) != 1:
        return False
    if EVP_CipherFinal_ex(ctx, tail, &outl) != 1:
        return False
    return not seal or EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, tag) == 1


cdef inline bint seal_packet(Keypair *kp, uint8_t *p, size_t n, uint64_t seq) noexcept nogil:
    """Seal datagram p[:n] (header included) under kp; the tag goes at p[n].
    The header is the associated data, with DATA's path byte as 0: one
    ciphertext serves every path, and the sender patches the byte per path."""
    cdef uint8_t ad[HEADER_LEN]
    memcpy(ad, p, HEADER_LEN)
    if ad[1] == T_DATA:
        ad[2] = 0
    return aead(kp.seal, True, seq, ad, HEADER_LEN, p + HEADER_LEN, n - HEADER_LEN, p + n)


cdef inline bint open_packet(Keypair *kp, uint8_t *p, size_t n, uint64_t seq) noexcept nogil:
    """Open sealed datagram p[:n] in place; its plaintext is p[:n - TAG_LEN]."""
    cdef uint8_t ad[HEADER_LEN]
    memcpy(ad, p, HEADER_LEN)
    if ad[1] == T_DATA:
        ad[2] = 0
    return aead(kp.open, False, seq, ad, HEADER_LEN, p + HEADER_LEN,
                n - HEADER_LEN - TAG_LEN, p + n - TAG_LEN)


cdef void clear_keypair(Keypair *kp) noexcept nogil:
    # EVP_CIPHER_CTX_free cleanses the key schedule before freeing it.
    EVP_CIPHER_CTX_free(kp.seal)
    EVP_CIPHER_CTX_free(kp.open)
    memset(kp, 0, sizeof(Keypair))


def aead_seal(const uint8_t[:] key, uint64_t seq, const uint8_t[:] ad,
              const uint8_t[:] plaintext):
    """The data plane's AEAD, sealing: ciphertext + tag (for tests against
    other implementations)."""
    return _aead_once(key, True, seq, ad, plaintext)


def aead_open(const uint8_t[:] key, uint64_t seq, const uint8_t[:] ad,
              const uint8_t[:] sealed):
    """The data plane's AEAD, opening: the plaintext, or ValueError."""
    if sealed.shape[0] < TAG_LEN:
        raise ValueError("shorter than a tag")
    return _aead_once(key, False, seq, ad, sealed)


cdef bytes _aead_once(const uint8_t[:] key, bint seal, uint64_t seq,
                      const uint8_t[:] ad, const uint8_t[:] data):
    cdef EVP_CIPHER_CTX *ctx
    cdef size_t n = data.shape[0] - (0 if seal else TAG_LEN)
    cdef bytearray buf = bytearray(data.shape[0] + (TAG_LEN if seal else 0))
    cdef uint8_t *b = buf
    cdef bint ok
    if key.shape[0] != KEY_LEN:
        raise ValueError(f"a key is {KEY_LEN} bytes")
    if data.shape[0]:
        memcpy(b, &data[0], data.shape[0])
    ctx = new_cipher(&key[0], seal)
    if ctx == NULL:
        raise MemoryError()
    ok = aead(ctx, seal, seq, &ad[0] if ad.shape[0] else NULL, ad.shape[0], b, n, b + n)
    EVP_CIPHER_CTX_free(ctx)
    if not ok:
        raise ValueError("authentication failed")
    return bytes(buf[:n + (TAG_LEN if seal else 0)])


# ------------------------------------------------------- de-duplication window
# RFC 6479: a ring of 64-bit words; moving forward clears only the words that
# slide out, so a test-and-set is O(1) whatever the jump. One word is slack.

cdef inline int window_test(const Window *w, uint64_t seq) noexcept nogil:
    """The verdict on seq, changing nothing (a sealed packet is marked only
    once it has proved authentic)."""
    if seq > w.top:
        return W_NEW
    if w.top - seq >= <uint64_t>(WINDOW_WORDS * 64 - 64):
        return W_TOO_OLD
    if w.words[(seq >> 6) & (WINDOW_WORDS - 1)] & ((<uint64_t>1) << (seq & 63)):
        return W_DUPLICATE
    return W_NEW


cdef inline void window_mark(Window *w, uint64_t seq) noexcept nogil:
    """Record seq as seen (window_test said W_NEW), sliding the window forward
    if seq is the newest yet."""
    cdef uint64_t cur, diff, i
    if seq > w.top:
        cur = w.top >> 6
        diff = (seq >> 6) - cur
        if diff > WINDOW_WORDS:
            diff = WINDOW_WORDS
        i = 1
        while i <= diff:
            w.words[(cur + i) & (WINDOW_WORDS - 1)] = 0
            i += 1
        w.top = seq
    w.words[(seq >> 6) & (WINDOW_WORDS - 1)] |= (<uint64_t>1) << (seq & 63)


cdef inline int window_check(Window *w, uint64_t seq) noexcept nogil:
    cdef int verdict = window_test(w, seq)
    if verdict == W_NEW:
        window_mark(w, seq)
    return verdict


cdef class ReplayWindow:
    """The data plane's window, exposed for tests and benchmarks."""

    bits = WINDOW_WORDS * 64

    def __cinit__(self):
        memset(&self.w, 0, sizeof(Window))

    def reset(self):
        memset(&self.w, 0, sizeof(Window))

    def check(self, uint64_t seq):
        return window_check(&self.w, seq)

    def check_many(self, const uint64_t[:] seqs):
        """Run a whole array through the window in C; returns how many were new."""
        cdef Py_ssize_t i
        cdef uint64_t fresh = 0
        with nogil:
            for i in range(seqs.shape[0]):
                if window_check(&self.w, seqs[i]) == W_NEW:
                    fresh += 1
        return fresh


# -------------------------------------------------------------------- helpers

cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef inline bint same_addr(const sockaddr_storage *a, const void *bp) noexcept nogil:
    # Compare family, port and address only: the kernel may fill other fields
    # (sin6_flowinfo, padding) differently from one datagram to the next.
    cdef const sockaddr_in *a4
    cdef const sockaddr_in *b4
    cdef const sockaddr_in6 *a6
    cdef const sockaddr_in6 *b6
    cdef const sockaddr_storage *b = <const sockaddr_storage *>bp
    if a.ss_family != b.ss_family:
        return False
    if a.ss_family == AF_INET:
        a4 = <const sockaddr_in *>a
        b4 = <const sockaddr_in *>b
        return a4.sin_port == b4.sin_port and a4.sin_addr.s_addr == b4.sin_addr.s_addr
    if a.ss_family == AF_INET6:
        a6 = <const sockaddr_in6 *>a
        b6 = <const sockaddr_in6 *>b
        return (a6.sin6_port == b6.sin6_port
                and memcmp(&a6.sin6_addr, &b6.sin6_addr, 16) == 0)
    return False


cdef size_t sticky_source(msghdr *rx, uint64_t *out) noexcept nogil:
    """From a received IP_PKTINFO/IPV6_PKTINFO, build the control message that
    sends from the address the datagram was addressed to (ip(7): on send,
    ipi_spec_dst is the source; ipv6(7): ipi6_addr is). Returns its length."""
    cdef cmsghdr *c = CMSG_FIRSTHDR(rx)
    cdef cmsghdr *o = <cmsghdr *>out
    cdef in_pktinfo *i4
    cdef in6_pktinfo *i6
    while c != NULL:
        if c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_PKTINFO:
            o.cmsg_level = IPPROTO_IP
            o.cmsg_type = IP_PKTINFO
            o.cmsg_len = CMSG_LEN(sizeof(in_pktinfo))
            i4 = <in_pktinfo *>CMSG_DATA(o)
            memset(i4, 0, sizeof(in_pktinfo))
            i4.ipi_spec_dst = (<in_pktinfo *>CMSG_DATA(c)).ipi_addr
            return CMSG_SPACE(sizeof(in_pktinfo))
        if c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_PKTINFO:
            o.cmsg_level = IPPROTO_IPV6
            o.cmsg_type = IPV6_PKTINFO
            o.cmsg_len = CMSG_LEN(sizeof(in6_pktinfo))
            i6 = <in6_pktinfo *>CMSG_DATA(o)
            memset(i6, 0, sizeof(in6_pktinfo))
            i6.ipi6_addr = (<in6_pktinfo *>CMSG_DATA(c)).ipi6_addr
            return CMSG_SPACE(sizeof(in6_pktinfo))
        c = CMSG_NXTHDR(rx, c)
    return 0


cdef size_t gro_segment_size(msghdr *rx) noexcept nogil:
    """The segment size of a UDP GRO train (udp(7) UDP_GRO), or 0."""
    cdef cmsghdr *c = CMSG_FIRSTHDR(rx)
    while c != NULL:
        if c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO:
            return <size_t>(<int *>CMSG_DATA(c))[0]
        c = CMSG_NXTHDR(rx, c)
    return 0


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


cdef inline uint16_t be16(uint16_t v) noexcept nogil:
    return ((v & 0xff) << 8) | (v >> 8)


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t rd32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline void wr16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xff


cdef inline void wr32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xff
    p[2] = (v >> 8) & 0xff
    p[3] = v & 0xff


# ------------------------------------------------------ Internet checksums
# RFC 1071: the ones'-complement sum of 16-bit words. Summed here in the
# host's byte order, 32 bits at a time into 64 bits, then folded; the result
# is stored in the host's byte order too, which gives the right bytes either
# way (RFC 1071 section 2(B), byte order independence).

cdef inline uint64_t csum_add(uint64_t acc, const uint8_t *p, size_t n) noexcept nogil:
    cdef uint64_t w
    cdef uint32_t h
    cdef uint16_t s = 0
    while n >= 8:
        memcpy(&w, p, 8)
        acc += (w & 0xffffffffULL) + (w >> 32)
        p += 8
        n -= 8
    if n >= 4:
        memcpy(&h, p, 4)
        acc += h
        p += 4
        n -= 4
    if n >= 2:
        memcpy(&s, p, 2)
        acc += s
        p += 2
        n -= 2
    if n:
        s = 0
        memcpy(&s, p, 1)  # the odd byte is the high half of a word padded with 0
        acc += s
    return acc


cdef inline uint16_t csum_fold(uint64_t acc) noexcept nogil:
    while acc >> 16:
        acc = (acc & 0xffff) + (acc >> 16)
    return <uint16_t>acc


cdef inline uint64_t pseudo_header(const uint8_t *ip, bint v6, size_t l4len,
                                   uint8_t proto=6) noexcept nogil:
    """The sum of the TCP or UDP pseudo-header (RFC 9293 3.1, RFC 768,
    RFC 8200 8.1): both addresses (contiguous in either IP header), the
    protocol, the L4 length."""
    cdef uint8_t tail[4]
    tail[0] = 0
    tail[1] = proto
    wr16(tail + 2, <uint16_t>l4len)
    if v6:
        return csum_add(csum_add(0, ip + 8, 32), tail, 4)
    return csum_add(csum_add(0, ip + 12, 8), tail, 4)


cdef inline void set_ipv4_checksum(uint8_t *ip, size_t iphl) noexcept nogil:
    cdef uint16_t c
    ip[10] = 0
    ip[11] = 0
    c = ~csum_fold(csum_add(0, ip, iphl))
    memcpy(ip + 10, &c, 2)


def internet_checksum(const uint8_t[:] data):
    """The data plane's RFC 1071 checksum, as the two bytes it would store
    (for tests against a reference)."""
    cdef uint16_t c
    cdef size_t n = data.shape[0]
    c = ~csum_fold(csum_add(0, &data[0] if n else NULL, n))
    return bytes((<uint8_t *>&c)[:2])


cdef inline bint fatal(int e) noexcept nogil:
    # Errors that mean our fd or buffer is wrong, not that a path is unwell.
    return e == EBADF or e == EFAULT or e == EINVAL or e == ENOTSOCK


cdef inline size_t tcp_segment_headers(const uint8_t *pkt, size_t n, size_t *iphl) noexcept nogil:
    """If pkt is a TCP segment that may be coalesced (IPv4 unfragmented or
    IPv6 without extension headers; payload; only ACK and PSH set), the
    length of its IP and TCP headers (IP's in *iphl); else 0."""
    cdef size_t l, thl
    if n < 40:
        return 0
    if pkt[0] >> 4 == 4:
        l = (pkt[0] & 15) * 4
        if l < 20 or pkt[9] != 6 or rd16(pkt + 2) != n or rd16(pkt + 6) & 0x3fff:
            return 0
    elif pkt[0] >> 4 == 6:
        l = 40
        if pkt[6] != 6 or <size_t>rd16(pkt + 4) + 40 != n:
            return 0
    else:
        return 0
    if n < l + 20:
        return 0
    thl = (pkt[l + 12] >> 4) * 4
    if thl < 20 or l + thl >= n or pkt[l + 13] & ~0x18 or not pkt[l + 13] & 0x10:
        return 0
    iphl[0] = l
    return l + thl


# --------------------------------------------------------------------- engine

cdef class Engine:
    """The packet loop of one tunnel end.

    ``socks`` are the path sockets' fds. A client passes one connect()ed socket
    per path (path i is socket i). A server passes its one listening socket;
    its endpoints are learned from probes, path by path. ``run()`` returns
    when any of ``wake_fds`` is readable (signals, status requests).
    ``keyed`` engines speak protocol version 2 only and send nothing until
    the control plane installs keys.
    """

    def __cinit__(self, int tun_fd, socks, bint server, uint32_t session,
                  wake_fds=(), bint gso=False, int busy_poll_us=0, bint keyed=False,
                  bint vnet_hdr=False):
        cdef int i
        cdef epoll_event ev
        if session == 0:
            raise ValueError("session must be non-zero")
        if not 0 < len(socks) <= MAX_PATHS or (server and len(socks) != 1):
            raise ValueError("a client takes 1..16 path sockets, a server one")
        self.epfd = -1
        self.txbuf = <uint8_t *>malloc(BATCH * SLOT)
        self.rxbuf = <uint8_t *>malloc(BATCH * SLOT)
        self.gsobuf = <uint8_t *>malloc(SLOT)
        self.grobuf = <uint8_t *>malloc(GRO_ROOM)
        if self.txbuf == NULL or self.rxbuf == NULL or self.gsobuf == NULL or self.grobuf == NULL:
            raise MemoryError()
        self.vnet = vnet_hdr
        self.tun_fd = tun_fd
        self.server = server
        self.session = session
        self.keyed = keyed
        self.busy_poll_ns = <uint64_t>busy_poll_us * 1000
        self.nsocks = len(socks)
        for i in range(MAX_PATHS):
            memset(&self.eps[i], 0, sizeof(Endpoint))
            self.eps[i].fd = -1
            self.eps[i].gso = gso
        for i in range(self.nsocks):
            self.socks[i] = socks[i]
            if not server:
                self.eps[i].fd = socks[i]
                self.eps[i].connected = True  # until set_remote() says otherwise
        for i in range(BATCH):
            self.rxiov[i].iov_base = self.rxbuf + i * SLOT
            self.rxiov[i].iov_len = SLOT
            self.rxmsg[i].msg_hdr.msg_iov = &self.rxiov[i]
            self.rxmsg[i].msg_hdr.msg_iovlen = 1
            self.rxmsg[i].msg_hdr.msg_name = &self.rxaddr[i]
            self.rxmsg[i].msg_hdr.msg_control = self.rxcmsg[i]
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, os.strerror(errno))
        self._watch(tun_fd, TAG_TUN)
        for fd in wake_fds:
            self._watch(fd, TAG_WAKE)
        for i in range(self.nsocks):
            self._watch(self.socks[i], i)

    def _watch(self, int fd, uint32_t tag):
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = 0
        ev.data.u32 = tag
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, os.strerror(errno))

    def __dealloc__(self):
        cdef int i
        for i in range(KEY_SLOTS):
            clear_keypair(&self.keyring[i])
        if self.epfd >= 0:
            close(self.epfd)
        free(self.txbuf)
        free(self.rxbuf)
        free(self.gsobuf)
        free(self.grobuf)

    # ------------------------------------------------------------ Python API

    @property
    def session(self):
        return self.session

    @property
    def peer_session(self):
        return self.peer_session

    def run(self, int timeout_ms):
        """Move packets for up to ``timeout_ms``. Returns a mask of WAKE_* flags
        saying why it stopped early (control packets queued, wake fd readable,
        a signal, an endpoint or peer session changed) or WAKE_TIMEOUT."""
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
        for send_back()."""
        cdef int i
        cdef ControlPacket *c
        out = []
        for i in range(self.nctrl):
            c = &self.ctrl[i]
            out.append((c.path, c.rx_ns, bytes(c.data[:c.length]),
                        sockaddr_to_tuple(&c.source.addr),
                        bytes((<uint8_t *>&c.source)[:sizeof(ReturnAddress)])))
        self.nctrl = 0
        return out

    def send_control(self, int path, const uint8_t[:] datagram):
        """Send one datagram as it is on a path; 0 or the errno it failed with."""
        if not 0 <= path < MAX_PATHS or self.eps[path].fd < 0:
            raise ValueError(f"no endpoint on path {path}")
        return self._send_one(path, &datagram[0], datagram.shape[0])

    def send_back(self, const uint8_t[:] reply_to, const uint8_t[:] datagram):
        """Send a datagram to where a control packet came from (take_control's
        ``reply_to``), from the address it was sent to; 0 or an errno."""
        cdef ReturnAddress ra
        cdef msghdr m
        cdef iovec v
        cdef int i
        if reply_to.shape[0] != sizeof(ReturnAddress):
            raise ValueError("not a reply_to from take_control()")
        memcpy(&ra, &reply_to[0], sizeof(ReturnAddress))
        for i in range(self.nsocks):
            if self.socks[i] == ra.fd:
                break
        else:
            raise ValueError("not a reply_to from take_control()")
        v.iov_base = <void *>&datagram[0]
        v.iov_len = datagram.shape[0]
        memset(&m, 0, sizeof(msghdr))
        m.msg_iov = &v
        m.msg_iovlen = 1
        m.msg_name = &ra.addr
        m.msg_namelen = ra.addrlen
        if ra.cmsglen:
            m.msg_control = ra.cmsg
            m.msg_controllen = ra.cmsglen
        if sendmsg(ra.fd, &m, MSG_DONTWAIT) < 0:
            return errno
        return 0

    def send_probe(self, int path, uint64_t number, uint64_t timestamp_ns):
        """Probe a path: the payload is the timestamp and the probe's number.
        0, the errno the send failed with, or ENOKEY (sealed mode, no key yet)."""
        cdef uint8_t buf[HEADER_LEN + PROBE_MIN_PAYLOAD + TAG_LEN]
        cdef uint8_t payload[PROBE_MIN_PAYLOAD]
        cdef uint64_t t = htobe64(timestamp_ns), q = htobe64(number)
        cdef size_t n
        if not 0 <= path < MAX_PATHS or self.eps[path].fd < 0:
            raise ValueError(f"no endpoint on path {path}")
        memcpy(payload, &t, 8)
        memcpy(payload + 8, &q, 8)
        n = self._put_probe(buf, T_PROBE, path, number, payload, PROBE_MIN_PAYLOAD)
        if n == 0:
            return ENOKEY
        return self._send_one(path, buf, n)

    # ---------------------------------------------------------------- keys

    def install_keys(self, uint32_t key_id, const uint8_t[:] send_key,
                     const uint8_t[:] receive_key, bint confirmed):
        """Install the keys of a handshake. ``confirmed`` (the initiator, who
        has seen the response): they become current at once and the current
        ones previous. Not confirmed (the responder): they wait in the next
        slot until the first authentic packet under them arrives."""
        cdef Keypair *kp
        cdef EVP_CIPHER_CTX *seal
        cdef EVP_CIPHER_CTX *open_
        if not self.keyed:
            raise ValueError("this engine has no keys (keyed=False)")
        if key_id == 0 or self._keypair(key_id) != NULL:
            raise ValueError(f"key id {key_id:#x} is 0 or in use")
        if send_key.shape[0] != KEY_LEN or receive_key.shape[0] != KEY_LEN:
            raise ValueError(f"keys are {KEY_LEN} bytes")
        seal = new_cipher(&send_key[0], 1)
        open_ = new_cipher(&receive_key[0], 0)
        if seal == NULL or open_ == NULL:
            EVP_CIPHER_CTX_free(seal)
            EVP_CIPHER_CTX_free(open_)
            raise MemoryError("libcrypto could not set up AES-256-GCM")
        if confirmed:
            clear_keypair(&self.keyring[K_PREVIOUS])
            self.keyring[K_PREVIOUS] = self.keyring[K_CURRENT]
            kp = &self.keyring[K_CURRENT]
            self.ctr.key_changes += 1
        else:
            clear_keypair(&self.keyring[K_NEXT])
            kp = &self.keyring[K_NEXT]
        memset(kp, 0, sizeof(Keypair))
        kp.id = key_id
        kp.seal = seal
        kp.open = open_
        kp.installed_ns = now_ns()

    def drop_keys(self, uint32_t key_id):
        """Forget the keys with this id (expired); True if there were any."""
        cdef Keypair *kp = self._keypair(key_id) if key_id else NULL
        if kp == NULL:
            return False
        clear_keypair(kp)
        return True

    def keys(self):
        """The installed keys: slot name, id, age and use."""
        cdef int i
        cdef uint64_t t = now_ns()
        out = []
        for i, slot in enumerate(("current", "previous", "next")):
            if self.keyring[i].id:
                out.append({"slot": slot, "id": self.keyring[i].id,
                            "age_s": (t - self.keyring[i].installed_ns) / 1e9,
                            "tx_seq": self.keyring[i].tx_seq,
                            "rx_packets": self.keyring[i].rx_packets,
                            "last_rx_ns": self.keyring[i].last_rx_ns})
        return out

    def set_remote(self, int path, const uint8_t[:] address, int port, bint connected):
        """Client: path ``path`` sends to ``address`` (4 or 16 packed bytes)
        ``port``. When its socket is connect()ed the kernel fills in the
        destination and filters the source; when not (no route yet at start),
        the engine does both."""
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

    def forget(self, int path):
        """Stop sending to a server-side endpoint (it was silent too long)."""
        if self.server and 0 <= path < MAX_PATHS:
            self.eps[path].fd = -1
            self.eps[path].addrlen = 0
            self.eps[path].cmsglen = 0

    def stats(self):
        cdef dict d = self.ctr
        return dict(d, session=self.session, peer_session=self.peer_session,
                    tx_seq=self.tx_seq, keyed=self.keyed, key_id=self.keyring[K_CURRENT].id,
                    rejected_from=sockaddr_to_tuple(&self.rejected_addr))

    def paths(self):
        """Per-path endpoint and counters, for every path ever used."""
        cdef int i
        cdef Endpoint *ep
        cdef dict d
        out = []
        for i in range(MAX_PATHS):
            ep = &self.eps[i]
            if ep.fd < 0 and ep.learned == 0:
                continue
            d = ep.c
            d["path"] = i
            d["active"] = ep.fd >= 0
            d["udp_gso"] = ep.gso
            d["remote"] = sockaddr_to_tuple(&ep.addr) if ep.addrlen else None
            out.append(d)
        return out

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
            if self.nctrl:
                flags |= WAKE_CONTROL
            if self.event:
                flags |= WAKE_EVENT
                self.event = False
            if flags:
                return flags
            if t >= deadline:
                return WAKE_TIMEOUT

    cdef int _tun_to_paths(self) noexcept nogil:
        cdef int err = 0
        cdef ssize_t r
        cdef uint8_t *p
        cdef size_t room = VNET_HDR_LEN if self.vnet else 0
        # Take only what is queued now (EAGAIN ends the batch): never wait.
        # A packet is read just after its slot's header room (less the
        # virtio-net header's, which lands in that room).
        self.ntx = 0
        while self.ntx < BATCH:
            p = self.txbuf + self.ntx * SLOT + HEADER_LEN - room
            r = read(self.tun_fd, p, SLOT - HEADER_LEN - TAG_LEN + room)
            if r < 0:
                if errno == EINTR:
                    continue
                if errno != EAGAIN:
                    err = -errno
                break
            if r <= <ssize_t>room:
                break
            if self.vnet:
                self._from_vnet(p, <size_t>r - room)
            else:
                self._stage(<size_t>r)
        self._flush_tx()
        return err

    cdef void _from_vnet(self, uint8_t *p, size_t n) noexcept nogil:
        """A packet read after its virtio-net header at p: complete its
        checksum, or split it if it is a TSO segment, and stage the result."""
        cdef VnetHdr h
        cdef uint8_t *pkt = p + VNET_HDR_LEN
        cdef uint8_t gso
        cdef uint16_t c
        memcpy(&h, p, VNET_HDR_LEN)
        gso = h.gso_type & ~VNET_GSO_ECN
        if gso == VNET_GSO_NONE:
            if h.flags & VNET_F_NEEDS_CSUM:
                # CHECKSUM_PARTIAL: the field holds the pseudo-header sum;
                # summing from csum_start over it completes the checksum.
                if <size_t>h.csum_start + h.csum_offset + 2 > n:
                    self.ctr.tun_gso_dropped += 1
                    return
                c = ~csum_fold(csum_add(0, pkt + h.csum_start, n - h.csum_start))
                memcpy(pkt + h.csum_start + h.csum_offset, &c, 2)
            self._stage(n)
            return
        self.ctr.tun_gso_reads += 1
        if (gso != VNET_GSO_TCPV4 and gso != VNET_GSO_TCPV6 and gso != VNET_GSO_UDP_L4
                or h.gso_size == 0):
            self.ctr.tun_gso_dropped += 1
            return
        # Segments go into the slots from this one on: move the whole out.
        memcpy(self.gsobuf, pkt, n)
        if gso == VNET_GSO_UDP_L4:
            self._segment_udp(self.gsobuf, n, h.gso_size)
        else:
            self._segment_tcp(self.gsobuf, n, h.gso_size, gso == VNET_GSO_TCPV6)

    cdef void _segment_udp(self, const uint8_t *pkt, size_t n, size_t mss) noexcept nogil:
        """Split a UDP GSO segment into datagrams of mss bytes of payload
        (the last may be shorter), as the kernel's __udp_gso_segment() does
        (net/ipv4/udp_offload.c): headers copied, lengths set, IPv4 ids
        counted up, checksums computed (0 is sent as 0xffff, RFC 768)."""
        cdef size_t iphl, payload, off = 0, seg
        cdef uint16_t id0, c
        cdef uint8_t *out
        cdef uint8_t *udp
        cdef int i = 0
        cdef bint v6 = pkt[0] >> 4 == 6
        if v6:
            iphl = 40
            if n < iphl + 8 or pkt[6] != 17:
                self.ctr.tun_gso_dropped += 1
                return
        else:
            iphl = (pkt[0] & 15) * 4
            if pkt[0] >> 4 != 4 or iphl < 20 or n < iphl + 8 or pkt[9] != 17:
                self.ctr.tun_gso_dropped += 1
                return
        payload = n - iphl - 8
        id0 = rd16(pkt + 4)
        while off < payload:
            seg = payload - off if payload - off < mss else mss
            if self.ntx == BATCH:
                self._flush_tx()
            out = self.txbuf + self.ntx * SLOT + HEADER_LEN
            memcpy(out, pkt, iphl + 8)
            memcpy(out + iphl + 8, pkt + iphl + 8 + off, seg)
            udp = out + iphl
            wr16(udp + 4, <uint16_t>(8 + seg))
            if v6:
                wr16(out + 4, <uint16_t>(8 + seg))
            else:
                wr16(out + 2, <uint16_t>(iphl + 8 + seg))
                wr16(out + 4, <uint16_t>(id0 + i))
                set_ipv4_checksum(out, iphl)
            udp[6] = 0
            udp[7] = 0
            c = ~csum_fold(csum_add(pseudo_header(out, v6, 8 + seg, 17), udp, 8 + seg))
            if c == 0:
                c = 0xffff
            memcpy(udp + 6, &c, 2)
            self._stage(iphl + 8 + seg)
            off += seg
            i += 1

    cdef void _segment_tcp(self, const uint8_t *pkt, size_t n, size_t mss,
                           bint v6) noexcept nogil:
        """Split a TSO segment into packets of mss bytes of payload, as the
        kernel's tcp_gso_segment() would (net/ipv4/tcp_offload.c): the
        headers copied, sequence numbers advanced, IPv4 ids counted up, FIN
        and PSH only on the last packet, CWR only on the first, and every
        checksum computed."""
        cdef size_t iphl, thl, hdrlen, payload, off = 0, seg
        cdef uint32_t seq0
        cdef uint16_t id0, c
        cdef uint8_t flags, f
        cdef uint8_t *out
        cdef uint8_t *tcp
        cdef int i = 0
        if v6:
            iphl = 40
            if n < iphl + 20 or pkt[0] >> 4 != 6 or pkt[6] != 6:  # next header TCP, no extensions
                self.ctr.tun_gso_dropped += 1
                return
        else:
            iphl = (pkt[0] & 15) * 4
            if iphl < 20 or n < iphl + 20 or pkt[0] >> 4 != 4 or pkt[9] != 6:
                self.ctr.tun_gso_dropped += 1
                return
        thl = (pkt[iphl + 12] >> 4) * 4
        hdrlen = iphl + thl
        if thl < 20 or hdrlen >= n:
            self.ctr.tun_gso_dropped += 1
            return
        payload = n - hdrlen
        seq0 = rd32(pkt + iphl + 4)
        id0 = rd16(pkt + 4)
        flags = pkt[iphl + 13]
        while off < payload:
            seg = payload - off if payload - off < mss else mss
            if self.ntx == BATCH:
                self._flush_tx()
            out = self.txbuf + self.ntx * SLOT + HEADER_LEN
            memcpy(out, pkt, hdrlen)
            memcpy(out + hdrlen, pkt + hdrlen + off, seg)
            tcp = out + iphl
            wr32(tcp + 4, seq0 + <uint32_t>off)
            f = flags
            if off + seg < payload:
                f &= ~(0x01 | 0x08)  # FIN, PSH
            if i > 0:
                f &= ~0x80  # CWR
            tcp[13] = f
            if v6:
                wr16(out + 4, <uint16_t>(thl + seg))
            else:
                wr16(out + 2, <uint16_t>(hdrlen + seg))
                wr16(out + 4, <uint16_t>(id0 + i))
                set_ipv4_checksum(out, iphl)
            tcp[16] = 0
            tcp[17] = 0
            c = ~csum_fold(csum_add(pseudo_header(out, v6, thl + seg), tcp, thl + seg))
            memcpy(tcp + 16, &c, 2)
            self._stage(hdrlen + seg)
            off += seg
            i += 1

    cdef void _stage(self, size_t n) noexcept nogil:
        """The packet of n bytes in slot ntx (after its header room) is to be
        sent: give it its header (and seal it) and take the next slot."""
        cdef uint8_t *p = self.txbuf + self.ntx * SLOT
        cdef Keypair *kp = &self.keyring[K_CURRENT]
        self.ctr.tun_rx_packets += 1
        self.ctr.tun_rx_bytes += n
        if not self.keyed:
            self.tx_seq += 1
            put_header(p, VERSION_PLAIN, T_DATA, 0, self.session, self.tx_seq)
            self.txlen[self.ntx] = n + HEADER_LEN
        else:
            # No key yet (handshake under way) or this one is used up: the
            # packet cannot leave. Sealed once, sent on every path.
            if kp.id == 0 or kp.tx_seq >= REJECT_AFTER_MESSAGES:
                self.ctr.no_key += 1
                return
            kp.tx_seq += 1
            put_header(p, VERSION_SEALED, T_DATA, 0, kp.id, kp.tx_seq)
            if not seal_packet(kp, p, n + HEADER_LEN, kp.tx_seq):
                self.ctr.no_key += 1
                return
            self.txlen[self.ntx] = n + HEADER_LEN + TAG_LEN
        self.ntx += 1

    cdef void _flush_tx(self) noexcept nogil:
        cdef int path
        if self.ntx == 0:
            return
        self.ctr.tun_batches += 1
        for path in range(MAX_PATHS):
            if self.eps[path].fd >= 0:
                self._send_batch(path, self.ntx)
        self.ntx = 0

    cdef void _send_batch(self, int path, int n) noexcept nogil:
        """Send the n packets read from the TUN on one path: one sendmmsg()
        whose messages are single datagrams, or with UDP GSO trains of
        equal-size datagrams (udp(7) UDP_SEGMENT)."""
        cdef Endpoint *ep = &self.eps[path]
        cdef uint8_t *p
        cdef int i, g, r, e, ngroups, sent = 0, first = 0
        for i in range(n):
            p = self.txbuf + i * SLOT
            p[2] = <uint8_t>path  # sendmmsg copies before returning: patch in place
            self.txiov[i].iov_base = p
            self.txiov[i].iov_len = self.txlen[i]
        ngroups = self._group(ep, 0, n)
        while sent < ngroups:
            r = sendmmsg(ep.fd, &self.txmsg[sent], ngroups - sent, MSG_DONTWAIT)
            if r >= 0:
                for g in range(sent, sent + r):
                    for i in range(self.txfirst[g], self.txfirst[g] + <int>self.txmsg[g].msg_hdr.msg_iovlen):
                        ep.c.tx_packets += 1
                        ep.c.tx_bytes += self.txlen[i]
                sent += r
                continue
            e = errno
            first = self.txfirst[sent]
            if e == EINTR:
                continue
            if e == EAGAIN:
                # Socket buffer full: drop rather than stall every path.
                self.ctr.send_dropped += <uint64_t>(n - first)
                return
            if (ep.gso and self.txmsg[sent].msg_hdr.msg_iovlen > 1
                    and (e == EIO or e == EINVAL or e == EMSGSIZE)):
                # The path cannot take a train: no checksum offload on its
                # device (EIO, before Linux 6.11), or segments larger than its
                # MTU (EINVAL; EMSGSIZE on newer kernels). Datagrams from now
                # on; the kernel fragments them if they exceed the MTU.
                ep.gso = False
                ep.c.last_errno = e
                self.ctr.gso_fallbacks += 1
                self.event = True
                ngroups = self._group(ep, first, n)
                sent = 0
                continue
            ep.c.last_errno = e
            if e == EMSGSIZE:
                # This one datagram is too big; the rest may go.
                ep.c.send_errors += self.txmsg[sent].msg_hdr.msg_iovlen
                sent += 1
                continue
            # ENETUNREACH, EPERM, EHOSTUNREACH, ENOBUFS, ECONNREFUSED...:
            # the path is unwell now. Count the rest; try again next batch.
            ep.c.send_errors += <uint64_t>(n - first)
            return

    cdef int _group(self, Endpoint *ep, int first, int n) noexcept nogil:
        """Fill txmsg[] with packets first..n-1 for ep, one message per
        datagram, or per train when ep.gso: a run of equal-size datagrams,
        the last of which may be shorter (that is what UDP_SEGMENT cuts).
        Returns the number of messages."""
        cdef int g = 0, i = first, j, limit
        cdef size_t seg, ctllen
        cdef msghdr *m
        cdef cmsghdr *c
        while i < n:
            seg = self.txlen[i]
            j = i + 1
            if ep.gso:
                limit = GSO_MAX_BYTES // <int>seg
                if limit > GSO_MAX_SEGMENTS:
                    limit = GSO_MAX_SEGMENTS
                while j < n and j - i < limit and self.txlen[j] == seg:
                    j += 1
                if j < n and j - i < limit and self.txlen[j] < seg:
                    j += 1
            m = &self.txmsg[g].msg_hdr
            m.msg_iov = &self.txiov[i]
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

    cdef int _send_one(self, int path, const uint8_t *data, size_t n) noexcept nogil:
        cdef Endpoint *ep = &self.eps[path]
        cdef msghdr m
        cdef iovec v
        v.iov_base = <void *>data
        v.iov_len = n
        memset(&m, 0, sizeof(msghdr))
        m.msg_iov = &v
        m.msg_iovlen = 1
        if not ep.connected:
            m.msg_name = <void *>&ep.addr
            m.msg_namelen = ep.addrlen
        if ep.cmsglen:
            m.msg_control = <void *>ep.cmsg
            m.msg_controllen = ep.cmsglen
        if sendmsg(ep.fd, &m, MSG_DONTWAIT) < 0:
            ep.c.send_errors += 1
            ep.c.last_errno = errno
            return errno
        ep.c.tx_packets += 1
        ep.c.tx_bytes += n
        return 0

    cdef int _paths_to_tun(self, int sock) noexcept nogil:
        cdef int r, i, e
        cdef size_t n, seg, off
        cdef uint8_t *p
        cdef mmsghdr *m
        cdef uint64_t now
        for i in range(BATCH):
            self.rxmsg[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            self.rxmsg[i].msg_hdr.msg_controllen = CMSG_ROOM
            self.rxmsg[i].msg_hdr.msg_flags = 0
        while True:
            r = recvmmsg(self.socks[sock], self.rxmsg, BATCH, MSG_DONTWAIT, NULL)
            if r >= 0:
                break
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
                self.eps[sock].c.last_errno = e
            return 0
        now = now_ns()
        self.ctr.rx_batches += 1
        for i in range(r):
            m = &self.rxmsg[i]
            p = self.rxbuf + i * SLOT
            n = m.msg_len
            if m.msg_hdr.msg_flags & MSG_TRUNC:
                self.ctr.malformed += 1
                continue
            # With UDP_GRO a slot may hold a train of datagrams, each `seg`
            # long but the last (udp(7)); each is a datagram of its own.
            seg = gro_segment_size(&m.msg_hdr)
            if seg == 0:
                seg = n
            off = 0
            while off < n:
                self._receive(sock, p + off, seg if n - off > seg else n - off, m, now)
                off += seg
        self._flush_gro()
        return 0

    cdef void _receive(self, int sock, uint8_t *p, size_t n, mmsghdr *m,
                       uint64_t now) noexcept nogil:
        """One datagram: check it, then deliver, drop or hand it up."""
        cdef Header h
        cdef int verdict = parse_header(p, n, &h, self.keyed)
        if verdict == H_OK:
            if self.keyed:
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
                             mmsghdr *m, uint64_t now) noexcept nogil:
        cdef int path
        if h.ptype != T_DATA and self.server:
            self._learn(sock, h.path, m)
        path = self._endpoint_for(sock, h.path, m)
        if path < 0:
            self.ctr.unknown_source += 1
            return
        self._count_rx(path, n, now)
        if h.ptype != T_DATA:
            self._adopt_session(h.session)
            self._on_probe(path, h, p, n, m, now)
        elif h.session != self.peer_session:
            self.ctr.wrong_session += 1
        else:
            self._deliver(path, window_check(&self.win, h.seq), p, n)

    cdef void _receive_sealed(self, int sock, Header *h, uint8_t *p, size_t n,
                              mmsghdr *m, uint64_t now) noexcept nogil:
        cdef Keypair *kp
        cdef int path, verdict
        cdef bint probe_to_server = self.server and h.ptype != T_DATA
        if probe_to_server:
            # Probes and handshakes name their path; a server learns where it
            # is only from one that proves authentic (below, or in Python).
            path = h.path
        else:
            path = self._endpoint_for(sock, h.path, m)
            if path < 0:
                self.ctr.unknown_source += 1
                return
        if h.ptype == T_HANDSHAKE_INIT or h.ptype == T_HANDSHAKE_RESPONSE:
            self._queue_control(path, p, n, now, self.socks[sock], m)
            return
        kp = self._keypair(h.session)
        if kp == NULL:
            self.ctr.wrong_session += 1
            return
        # The window first: a copy that lost the race, or a replay, is
        # dropped without spending a decryption on it.
        verdict = window_test(&kp.win, h.seq)
        if verdict == W_NEW:
            if not open_packet(kp, p, n, h.seq):
                self.ctr.auth_failed += 1
                self._rejected(m)
                return
            if not payload_fits(h.ptype, p + HEADER_LEN, n - HEADER_LEN - TAG_LEN):
                self.ctr.malformed += 1  # authentic, but not what the protocol allows
                return
            window_mark(&kp.win, h.seq)
            kp.rx_packets += 1
            kp.last_rx_ns = now
            self._confirmed(kp)
            if probe_to_server:
                self._learn(sock, path, m)
        elif h.ptype != T_DATA:
            # Probes are never sent twice: this is a replay.
            self.ctr.duplicates += 1
            return
        self._count_rx(path, n, now)
        n -= TAG_LEN
        if h.ptype != T_DATA:
            self._on_probe(path, h, p, n, m, now)
        else:
            self._deliver(path, verdict, p, n)

    cdef void _count_rx(self, int path, size_t n, uint64_t now) noexcept nogil:
        cdef Endpoint *ep = &self.eps[path]
        ep.c.rx_packets += 1
        ep.c.rx_bytes += n
        ep.c.last_rx_ns = now

    cdef void _deliver(self, int path, int verdict, uint8_t *p, size_t n) noexcept nogil:
        """DATA p[:n] (in clear) that the window judged: hand it to the TUN
        if it is the first copy, else count it."""
        cdef Endpoint *ep = &self.eps[path]
        if verdict == W_NEW:
            self.ctr.delivered += 1
            self.ctr.delivered_bytes += n - HEADER_LEN
            ep.c.first_arrivals += 1
            self._to_tun(p + HEADER_LEN, n - HEADER_LEN)
        elif verdict == W_DUPLICATE:
            self.ctr.duplicates += 1
            ep.c.duplicates += 1
        else:
            self.ctr.too_old += 1

    cdef void _to_tun(self, uint8_t *pkt, size_t n) noexcept nogil:
        """Write a packet to the TUN; with virtio-net headers, TCP segments
        of one flow that follow each other are coalesced first (as the
        kernel's GRO would) and written as one, so the stack above makes one
        pass for them. pkt has HEADER_LEN bytes of room before it."""
        cdef uint8_t *run = self.grobuf + VNET_HDR_LEN
        cdef size_t iphl, hdrlen
        cdef uint8_t flags
        if not self.vnet:
            self._write_tun(pkt, n)
            return
        hdrlen = tcp_segment_headers(pkt, n, &iphl)
        if hdrlen and self.gro.len and self._coalesce(pkt, n, iphl, hdrlen):
            return
        self._flush_gro()
        if hdrlen:
            flags = pkt[iphl + 13]
            memcpy(run, pkt, n)
            self.gro.len = n
            self.gro.iphl = iphl
            self.gro.hdrlen = hdrlen
            self.gro.mss = n - hdrlen
            self.gro.next_seq = rd32(pkt + iphl + 4) + <uint32_t>(n - hdrlen)
            self.gro.segments = 1
            self.gro.closed = (flags & 0x08) != 0  # PSH: nothing may follow it
            self.gro.v6 = pkt[0] >> 4 == 6
            return
        memset(pkt - VNET_HDR_LEN, 0, VNET_HDR_LEN)  # no offload asked for this one
        self._write_tun(pkt - VNET_HDR_LEN, n + VNET_HDR_LEN)

    cdef bint _coalesce(self, const uint8_t *pkt, size_t n, size_t iphl,
                        size_t hdrlen) noexcept nogil:
        """Append TCP segment pkt (its headers iphl and hdrlen long) to the
        run if it is the next segment of the same flow with the same headers
        (but for lengths, ids, sequence numbers, checksums and PSH), no
        longer than the first, and all fits in one IP packet
        (net/ipv4/tcp_offload.c, tcp_gro_receive(), flushes on the same
        differences)."""
        cdef GroRun *g = &self.gro
        cdef const uint8_t *run = self.grobuf + VNET_HDR_LEN
        cdef const uint8_t *a
        cdef const uint8_t *b
        cdef size_t payload
        if g.closed or g.segments >= GRO_MAX_SEGMENTS:
            return False
        if hdrlen != g.hdrlen or iphl != g.iphl or (pkt[0] >> 4 == 6) != g.v6:
            return False
        payload = n - hdrlen
        if payload > g.mss or g.len + payload > 65535 + (40 if g.v6 else 0):
            return False
        a = run + iphl
        b = pkt + iphl
        if rd32(b + 4) != g.next_seq:
            return False
        if g.v6:
            if memcmp(run, pkt, 4) != 0 or memcmp(run + 6, pkt + 6, 34) != 0:
                return False
        elif (memcmp(run, pkt, 2) != 0 or memcmp(run + 6, pkt + 6, 4) != 0
              or memcmp(run + 12, pkt + 12, iphl - 12) != 0):
            return False
        if (memcmp(a, b, 4) != 0 or memcmp(a + 8, b + 8, 5) != 0
                or (a[13] ^ b[13]) & ~0x08 or memcmp(a + 14, b + 14, 2) != 0
                or memcmp(a + 18, b + 18, hdrlen - iphl - 18) != 0):
            return False
        memcpy(self.grobuf + VNET_HDR_LEN + g.len, pkt + hdrlen, payload)
        g.len += payload
        g.next_seq += <uint32_t>payload
        g.segments += 1
        if payload < g.mss or b[13] & 0x08:
            # A short segment ends what the sender wrote; PSH says deliver now.
            (self.grobuf + VNET_HDR_LEN + iphl)[13] |= b[13] & 0x08
            g.closed = True
        return True

    cdef void _flush_gro(self) noexcept nogil:
        """Write the run to the TUN: one segment as it came, several as one
        packet with a virtio-net header asking the kernel to treat it as
        GSO, its checksum partial (the pseudo-header sum, as the kernel's
        own CHECKSUM_PARTIAL packets carry)."""
        cdef GroRun *g = &self.gro
        cdef uint8_t *run = self.grobuf + VNET_HDR_LEN
        cdef VnetHdr h
        cdef uint16_t c
        if g.len == 0:
            return
        memset(&h, 0, sizeof(VnetHdr))
        if g.segments > 1:
            if g.v6:
                wr16(run + 4, <uint16_t>(g.len - 40))
            else:
                wr16(run + 2, <uint16_t>g.len)
                set_ipv4_checksum(run, g.iphl)
            c = csum_fold(pseudo_header(run, g.v6, g.len - g.iphl))
            memcpy(run + g.iphl + 16, &c, 2)
            h.flags = VNET_F_NEEDS_CSUM
            h.gso_type = VNET_GSO_TCPV6 if g.v6 else VNET_GSO_TCPV4
            h.hdr_len = <uint16_t>g.hdrlen
            h.gso_size = <uint16_t>g.mss
            h.csum_start = <uint16_t>g.iphl
            h.csum_offset = 16
            self.ctr.gro_writes += 1
            self.ctr.gro_coalesced += g.segments
        memcpy(self.grobuf, &h, VNET_HDR_LEN)
        self._write_tun(self.grobuf, VNET_HDR_LEN + g.len)
        g.len = 0

    cdef bint _write_tun(self, uint8_t *buf, size_t n) noexcept nogil:
        cdef ssize_t w
        while True:
            w = write(self.tun_fd, buf, n)
            if w >= 0 or errno != EINTR:
                break
        if w < 0:
            self.ctr.tun_write_errors += 1
            return False
        return True

    cdef Keypair *_keypair(self, uint32_t id) noexcept nogil:
        cdef int i
        for i in range(KEY_SLOTS):
            if self.keyring[i].id == id:
                return &self.keyring[i]
        return NULL

    cdef void _confirmed(self, Keypair *kp) noexcept nogil:
        """An authentic packet arrived under kp. If kp was waiting in the next
        slot, the initiator has the keys too: they become current."""
        if kp != &self.keyring[K_NEXT]:
            return
        clear_keypair(&self.keyring[K_PREVIOUS])
        self.keyring[K_PREVIOUS] = self.keyring[K_CURRENT]
        self.keyring[K_CURRENT] = self.keyring[K_NEXT]
        memset(&self.keyring[K_NEXT], 0, sizeof(Keypair))
        self.ctr.key_changes += 1
        self.event = True

    cdef void _rejected(self, mmsghdr *m) noexcept nogil:
        # Who sent the last packet that failed authentication or was of the
        # other mode, for the control plane's (rate-limited) log line.
        memcpy(&self.rejected_addr, m.msg_hdr.msg_name, m.msg_hdr.msg_namelen)

    cdef int _endpoint_for(self, int sock, int path, mmsghdr *m) noexcept nogil:
        """The path a datagram belongs to, or -1 if its source is not that
        path's endpoint."""
        if not self.server:
            # The socket is the path. A connected socket's source was filtered
            # by the kernel; an unconnected one's is checked here.
            if path != sock or not (self.eps[sock].connected or
                                    same_addr(&self.eps[sock].addr, m.msg_hdr.msg_name)):
                return -1
            return sock
        if self.eps[path].fd < 0 or not same_addr(&self.eps[path].addr, m.msg_hdr.msg_name):
            return -1
        return path

    cdef void _learn(self, int sock, int path, mmsghdr *m) noexcept nogil:
        """Server: a well-formed probe names (or moves) the endpoint of its path."""
        cdef Endpoint *ep = &self.eps[path]
        ep.cmsglen = sticky_source(&m.msg_hdr, ep.cmsg)
        if ep.fd >= 0 and same_addr(&ep.addr, m.msg_hdr.msg_name):
            return
        memcpy(&ep.addr, m.msg_hdr.msg_name, m.msg_hdr.msg_namelen)
        ep.addrlen = m.msg_hdr.msg_namelen
        ep.fd = self.socks[sock]
        ep.learned += 1
        self.ctr.endpoint_changes += 1
        self.event = True

    cdef void _adopt_session(self, uint32_t session) noexcept nogil:
        # A new session id in a probe means the peer restarted: its sequence
        # numbers start again, so the window starts again. The previous id is
        # remembered so that its packets still in flight cannot flip it back.
        if session == self.peer_session or session == self.prev_session:
            return
        self.prev_session = self.peer_session
        self.peer_session = session
        memset(&self.win, 0, sizeof(Window))
        self.ctr.session_changes += 1
        self.event = True

    cdef size_t _put_probe(self, uint8_t *p, uint8_t ptype, int path, uint64_t number,
                           const uint8_t *payload, size_t payload_len) noexcept nogil:
        """Build a probe or probe reply in p; its length, or 0 when sealed mode
        has no key to send with. In clear the header carries the probe's
        number; sealed, a fresh sequence number of the current key (the
        number is in the payload either way)."""
        cdef Keypair *kp = &self.keyring[K_CURRENT]
        cdef size_t n = HEADER_LEN + payload_len
        memmove(p + HEADER_LEN, payload, payload_len)
        if not self.keyed:
            put_header(p, VERSION_PLAIN, ptype, <uint8_t>path, self.session, number)
            return n
        if kp.id == 0 or kp.tx_seq >= REJECT_AFTER_MESSAGES:
            return 0
        kp.tx_seq += 1
        put_header(p, VERSION_SEALED, ptype, <uint8_t>path, kp.id, kp.tx_seq)
        if not seal_packet(kp, p, n, kp.tx_seq):
            return 0
        return n + TAG_LEN

    cdef void _on_probe(self, int path, Header *h, uint8_t *p, size_t n, mmsghdr *m,
                        uint64_t now) noexcept nogil:
        """A probe (in clear now) is answered here, not in Python, so that
        the round trip has no interpreter in it: the same payload back, so
        the reply is exactly as long as the probe (no amplification). A
        reply goes up to Python for the path's health."""
        cdef uint8_t reply[HEADER_LEN + PROBE_MAX_PAYLOAD + TAG_LEN]
        cdef size_t r
        if h.ptype == T_PROBE:
            r = self._put_probe(reply, T_PROBE_REPLY, path, h.seq,
                                p + HEADER_LEN, n - HEADER_LEN)
            if r:
                self._send_one(path, reply, r)
        else:
            self._queue_control(path, p, n, now, self.eps[path].fd, m)

    cdef void _queue_control(self, int path, uint8_t *pkt, size_t n, uint64_t now,
                             int fd, mmsghdr *m) noexcept nogil:
        cdef ControlPacket *c
        if self.nctrl == CTRL_SLOTS:
            self.ctr.control_dropped += 1
            return
        c = &self.ctrl[self.nctrl]
        c.path = path
        c.rx_ns = now
        c.length = n
        memcpy(c.data, pkt, n)
        c.source.fd = fd
        memcpy(&c.source.addr, m.msg_hdr.msg_name, m.msg_hdr.msg_namelen)
        c.source.addrlen = m.msg_hdr.msg_namelen
        c.source.cmsglen = sticky_source(&m.msg_hdr, c.source.cmsg)
        self.nctrl += 1


CONSTANTS = {
    "VERSION_PLAIN": VERSION_PLAIN, "VERSION_SEALED": VERSION_SEALED,
    "HEADER_LEN": HEADER_LEN, "MAX_PATHS": MAX_PATHS,
    "T_DATA": T_DATA, "T_PROBE": T_PROBE, "T_PROBE_REPLY": T_PROBE_REPLY,
    "T_HANDSHAKE_INIT": T_HANDSHAKE_INIT, "T_HANDSHAKE_RESPONSE": T_HANDSHAKE_RESPONSE,
    "PROBE_MIN_PAYLOAD": PROBE_MIN_PAYLOAD, "PROBE_MAX_PAYLOAD": PROBE_MAX_PAYLOAD,
    "KEY_LEN": KEY_LEN, "TAG_LEN": TAG_LEN,
    "HANDSHAKE_INIT_LEN": HANDSHAKE_INIT_LEN, "HANDSHAKE_RESPONSE_LEN": HANDSHAKE_RESPONSE_LEN,
}

WAKE = {"timeout": WAKE_TIMEOUT, "fd": WAKE_FD, "control": WAKE_CONTROL,
        "signal": WAKE_SIGNAL, "event": WAKE_EVENT}
