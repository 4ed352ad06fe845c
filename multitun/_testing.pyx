# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The data plane's stateless parts, callable from Python for tests and
benchmarks: the same inline functions multitun._fastpath compiles in, so what
is tested here is what runs there. Not part of the engine's API."""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from .includes.openssl cimport EVP_CIPHER_CTX, EVP_CIPHER_CTX_free
from .fastpath.constants cimport HEADER_LEN, KEY_LEN, TAG_LEN, VERSION_PLAIN, VERSION_SEALED, WINDOW_WORDS
from .fastpath.header cimport H_OK, Header, parse_header, put_header
from .fastpath.window cimport W_NEW, Window, window_check
from .fastpath.checksum cimport csum_add, csum_fold
from .fastpath.aead cimport aead, new_cipher


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
              const uint8_t[:] plaintext):
    """The data plane's AEAD, sealing: ciphertext + tag."""
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


def internet_checksum(const uint8_t[:] data):
    """The data plane's RFC 1071 checksum, as the two bytes it would store."""
    cdef uint16_t c
    cdef size_t n = data.shape[0]
    c = ~csum_fold(csum_add(0, &data[0] if n else NULL, n))
    return bytes((<uint8_t *>&c)[:2])


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
