# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The data plane's stateless parts, callable from Python for tests and
benchmarks: the same inline functions multitun._fastpath compiles in, so what
is tested here is what runs there. Not part of the engine's API."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from .includes.openssl cimport EVP_CIPHER_CTX, EVP_CIPHER_CTX_free
from .fastpath.constants cimport (
    CIPHER_AES_256_GCM, HEADER_LEN, KEY_LEN, NONCE_LEN, TAG_LEN, VERSION_PLAIN, VERSION_SEALED,
    WINDOW_WORDS,
)
from .fastpath.byteorder cimport now_ns
from .fastpath.header cimport H_OK, Header, parse_header, put_header
from .fastpath.window cimport W_NEW, Window, window_check
from .fastpath.checksum cimport csum_add, csum_fold
from .fastpath.aead cimport aead, new_cipher, sequence_nonce
from .fastpath.routes cimport RouteTable, route_add, route_find, routes_alloc, routes_free
from .fastpath.keyindex cimport KeyIndex, keyindex_add, keyindex_alloc, keyindex_find, keyindex_free
from .fastpath.flowqueue cimport (
    FQ_SETS, FQ_URGENT, FQ_WAYS, FlowQueue, QPacket, fq_clear, fq_dequeue, fq_enqueue,
    fq_flow_of, fq_init,
    qpacket_data,
)


def pack_header(int ptype, int path, uint32_t session, uint64_t seq,
                int version=VERSION_PLAIN):
    """Compiled twin of wire.pack_header."""
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


def aead_seal(const uint8_t[:] key, uint64_t seq, const uint8_t[:] ad,
              const uint8_t[:] plaintext, int cipher=CIPHER_AES_256_GCM):
    """The data plane's AEAD, sealing under the nonce of sequence number seq:
    ciphertext + tag."""
    return aead_nonce(True, key, _sequence_nonce(seq), ad, plaintext, cipher)


def aead_open(const uint8_t[:] key, uint64_t seq, const uint8_t[:] ad,
              const uint8_t[:] sealed, int cipher=CIPHER_AES_256_GCM):
    """The data plane's AEAD, opening: the plaintext, or ValueError."""
    return aead_nonce(False, key, _sequence_nonce(seq), ad, sealed, cipher)


cdef bytes _sequence_nonce(uint64_t seq):
    cdef uint8_t nonce[NONCE_LEN]
    sequence_nonce(nonce, seq)
    return bytes(nonce[:NONCE_LEN])


def aead_nonce(bint seal, const uint8_t[:] key, const uint8_t[:] nonce, const uint8_t[:] ad,
               const uint8_t[:] data, int cipher):
    """The data plane's AEAD under any 12-byte nonce (for published vectors):
    sealing gives ciphertext + tag; opening the plaintext, or ValueError."""
    cdef EVP_CIPHER_CTX *ctx
    cdef size_t n
    cdef bytearray buf
    cdef uint8_t *b
    cdef bint ok
    if key.shape[0] != KEY_LEN or nonce.shape[0] != NONCE_LEN:
        raise ValueError(f"a key is {KEY_LEN} bytes, a nonce {NONCE_LEN}")
    if not seal and data.shape[0] < TAG_LEN:
        raise ValueError("shorter than a tag")
    n = data.shape[0] - (0 if seal else TAG_LEN)
    buf = bytearray(data.shape[0] + (TAG_LEN if seal else 0))
    b = buf
    if data.shape[0]:
        memcpy(b, &data[0], data.shape[0])
    ctx = new_cipher(&key[0], seal, cipher)
    if ctx == NULL:
        raise ValueError(f"no cipher {cipher}")
    ok = aead(ctx, seal, &nonce[0], &ad[0] if ad.shape[0] else NULL, ad.shape[0], b, n, b + n)
    EVP_CIPHER_CTX_free(ctx)
    if not ok:
        raise ValueError("authentication failed")
    return bytes(buf[:n + (TAG_LEN if seal else 0)])


def seal_ns(int cipher, size_t size, int count):
    """Nanoseconds to seal one packet of ``size`` bytes, as the engine does
    (one keyed context, a new nonce and the header as associated data each
    time), over ``count`` packets."""
    cdef uint8_t key[KEY_LEN]
    cdef uint8_t nonce[NONCE_LEN]
    cdef uint8_t tag[TAG_LEN]
    cdef uint8_t *buf = <uint8_t *>malloc(size + HEADER_LEN)
    cdef EVP_CIPHER_CTX *ctx
    cdef uint64_t start, i
    cdef bint ok = True
    if buf == NULL:
        raise MemoryError()
    memset(key, 7, KEY_LEN)
    memset(buf, 0, size + HEADER_LEN)
    ctx = new_cipher(key, True, cipher)
    if ctx == NULL:
        free(buf)
        raise ValueError(f"no cipher {cipher}")
    with nogil:
        start = now_ns()
        for i in range(<uint64_t>count):
            sequence_nonce(nonce, i + 1)
            ok = ok and aead(ctx, True, nonce, buf, HEADER_LEN, buf + HEADER_LEN, size, tag)
        start = now_ns() - start
    EVP_CIPHER_CTX_free(ctx)
    free(buf)
    if not ok:
        raise MemoryError("libcrypto failed to seal")
    return start / count


def internet_checksum(const uint8_t[:] data):
    """The data plane's RFC 1071 checksum, as the two bytes it would store."""
    cdef uint16_t c
    cdef size_t n = data.shape[0]
    c = ~csum_fold(csum_add(0, &data[0] if n else NULL, n))
    return bytes((<uint8_t *>&c)[:2])


def checksum_total(const uint8_t[:] data, size_t size, int count):
    """The sum of ``count`` folded checksums of ``size`` bytes of data, the
    i-th starting at byte i % 8 (so that none is computed only once), as
    integers in the host's byte order: for timing the checksum."""
    cdef uint64_t total = 0
    cdef int i
    if data.shape[0] < size + 8:
        raise ValueError("data must be 8 bytes longer than size")
    for i in range(count):
        total += csum_fold(csum_add(0, &data[i % 8], size))
    return total


cdef class ReplayWindow:
    """The data plane's window."""

    cdef Window w
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


cdef class FairQueue:
    """One paced path's queue (flowqueue.pxd), driven by the caller's clock
    (ns): enqueue IP packets, dequeue them in the order the path would send
    them, and see what CoDel or the byte limit dropped."""

    cdef FlowQueue *fq
    cdef uint64_t key

    def __cinit__(self, uint64_t target_ns=5000000, uint64_t interval_ns=100000000,
                  uint64_t limit_bytes=1 << 20, uint64_t key=0):
        self.fq = <FlowQueue *>malloc(sizeof(FlowQueue))
        if self.fq == NULL:
            raise MemoryError()
        fq_init(self.fq, target_ns, interval_ns, limit_bytes)
        self.key = key

    def __dealloc__(self):
        if self.fq != NULL:
            fq_clear(self.fq)
            free(self.fq)

    def flow_of(self, const uint8_t[:] packet):
        """The flow tag of a packet (URGENT for an urgent DSCP); the flow's
        set of buckets is its tag modulo FLOW_SETS."""
        return fq_flow_of(&packet[0], packet.shape[0], self.key)

    def enqueue(self, const uint8_t[:] packet, uint64_t now_ns):
        fq_enqueue(self.fq, fq_flow_of(&packet[0], packet.shape[0], self.key), &packet[0],
                   <uint32_t>packet.shape[0], now_ns)

    def dequeue(self, uint64_t now_ns):
        """The next packet, or None if the queue is empty."""
        cdef QPacket *q = fq_dequeue(self.fq, now_ns)
        if q == NULL:
            return None
        out = bytes(qpacket_data(q)[:q.len])
        free(q)
        return out

    @property
    def dropped(self):
        return self.fq.dropped

    @property
    def packets(self):
        return self.fq.packets

    @property
    def bytes(self):
        return self.fq.bytes


URGENT = FQ_URGENT
FLOW_SETS = FQ_SETS
FLOW_WAYS = FQ_WAYS


def route_lookup(routes, addresses, uint64_t key=0x5EED):
    """The data plane's allowed-IPs table (routes.pxd), built from (peer,
    packed address, prefix length) each: the peer of each packed address
    in ``addresses`` (-1: none), and for each route, the peer that already
    held its prefix when it was added (-1: none)."""
    cdef RouteTable t
    cdef const uint8_t[:] a
    memset(&t, 0, sizeof(RouteTable))
    t.key = key
    routes = list(routes)
    if routes_alloc(&t.v4, 4, len(routes)) < 0 or routes_alloc(&t.v6, 16, len(routes)) < 0:
        routes_free(&t)
        raise MemoryError()
    try:
        clashes = []
        for peer, address, length in routes:
            a = address
            clashes.append(route_add(&t, &a[0], length, peer, a.shape[0] == 16))
        found = []
        for address in addresses:
            a = address
            found.append(route_find(&t, &a[0], a.shape[0] == 16))
        return found, clashes
    finally:
        routes_free(&t)


def key_index(entries, ids, uint64_t key=0x5EED):
    """The data plane's key id index (keyindex.pxd), built from (id, peer)
    each: the peer of each id in ``ids`` (-1: none)."""
    cdef KeyIndex x
    x.key = key
    entries = list(entries)
    if keyindex_alloc(&x, len(entries)) < 0:
        raise MemoryError()
    try:
        for key_id, peer in entries:
            keyindex_add(&x, key_id, peer)
        return [keyindex_find(&x, key_id) for key_id in ids]
    finally:
        keyindex_free(&x)
