# Address tokens: a server under a flood of first messages asks each sender
# to prove that it receives at the address it sends from before the control
# plane spends anything on its message. Without that, a flood from forged
# source addresses passes the per-source limit (limiter.pxd) on every
# address, takes the answers meant for real clients, and fills the limiter's
# slots, which real clients share with it. WireGuard's cookie reply (its
# MAC2) and QUIC's Retry (RFC 9000, section 8.1) do the same.
#
# Under load (more than LOAD_PER_S first messages a second, from all sources
# together, within their sources' rates; and for LOAD_HOLD_NS after), a
# first message whose sequence field does not hold a valid token for its
# source is answered here, in C, with a RETRY that carries one; the client
# sends the same message again with it (receive.pxi has the order of checks).
# A token is a MAC of the source address and port, and of the epoch of the
# server's monotonic clock (TOKEN_EPOCH_NS long): valid in the epoch it was
# made and the next, so 120 to 240 seconds. Nothing is stored per sender.
#
# The MAC is AES-256 in CBC-MAC over one fixed-length input of two blocks, a
# PRF for inputs of one fixed length (Bellare, Kilian and Rogaway, "The
# security of the cipher block chaining message authentication code", 2000),
# keyed with random bytes drawn at start; libcrypto encrypts each block.

from libc.stdint cimport uint8_t, uint16_t, uint64_t
from libc.string cimport memcpy, memset
from ..includes.linux cimport AF_INET, AF_INET6, htobe64, sockaddr_in, sockaddr_in6, sockaddr_storage
from ..includes.openssl cimport *

# 120 s does not fit an enum (a C int): a 64-bit constant.
cdef extern from *:
    """
    #define MULTITUN_TOKEN_EPOCH_NS 120000000000ULL
    """
    const uint64_t TOKEN_EPOCH_NS "MULTITUN_TOKEN_EPOCH_NS"

cdef enum:
    # First messages a second from all sources that a server takes without
    # tokens: no more than one peer's keying answers (keying.HANDSHAKES_PER_S
    # and HANDSHAKE_BURST; tests/test_keying.py holds them to it), so that a
    # forged flood that claims one peer's key, just below the load, cannot
    # use up that peer's answers. A fleet's clients rekey every two minutes
    # on two paths or more: beyond about 600 of them, their first messages
    # too prove their addresses, at one round trip each.
    LOAD_PER_S = 20
    LOAD_INTERVAL_NS = 50000000  # 1 s / LOAD_PER_S (Cython cannot divide in an enum)
    LOAD_BURST = 20
    LOAD_HOLD_NS = 1000000000


cdef struct AddressCheck:
    # AES-256 on single blocks, keyed once.
    EVP_CIPHER_CTX *aes
    # The load meter: a GCRA over first messages from all sources (as in
    # limiter.pxd), and until when the server is under load.
    uint64_t load_due
    uint64_t loaded_until


cdef inline bint address_check_init(AddressCheck *ac, const uint8_t *key) noexcept nogil:
    """Key the MAC (32 bytes); False if libcrypto fails."""
    ac.load_due = ac.loaded_until = 0
    ac.aes = EVP_CIPHER_CTX_new()
    if ac.aes == NULL:
        return False
    if EVP_CipherInit_ex(ac.aes, EVP_aes_256_ecb(), NULL, key, NULL, 1) != 1:
        return False
    return EVP_CIPHER_CTX_set_padding(ac.aes, 0) == 1


cdef inline void address_check_free(AddressCheck *ac) noexcept nogil:
    EVP_CIPHER_CTX_free(ac.aes)  # NULL is allowed
    ac.aes = NULL


cdef inline uint64_t address_token(AddressCheck *ac, const sockaddr_storage *a,
                                   uint64_t epoch) noexcept nogil:
    """The token of address a (its family, port and address) in an epoch;
    never 0, which in a first message means none."""
    cdef uint8_t b[32]
    cdef uint8_t c[16]
    cdef int outl, i
    cdef uint64_t e = htobe64(epoch), t
    memset(b, 0, 32)
    memcpy(b, &e, 8)
    b[8] = <uint8_t>a.ss_family
    if a.ss_family == AF_INET:
        memcpy(b + 9, &(<const sockaddr_in *>a).sin_port, 2)
        memcpy(b + 16, &(<const sockaddr_in *>a).sin_addr, 4)
    elif a.ss_family == AF_INET6:
        memcpy(b + 9, &(<const sockaddr_in6 *>a).sin6_port, 2)
        memcpy(b + 16, &(<const sockaddr_in6 *>a).sin6_addr, 16)
    # CBC-MAC: c = E(E(b0) xor b1).
    if EVP_CipherUpdate(ac.aes, c, &outl, b, 16) != 1:
        return 0
    for i in range(16):
        b[16 + i] ^= c[i]
    if EVP_CipherUpdate(ac.aes, c, &outl, b + 16, 16) != 1:
        return 0
    memcpy(&t, c, 8)
    return t | 1


cdef inline bint token_valid(AddressCheck *ac, const sockaddr_storage *a, uint64_t token,
                             uint64_t now) noexcept nogil:
    """Whether a first message's token is its source's, of this epoch or the last."""
    cdef uint64_t epoch = now // TOKEN_EPOCH_NS
    if token == 0:
        return False
    return (token == address_token(ac, a, epoch)
            or (epoch > 0 and token == address_token(ac, a, epoch - 1)))


cdef inline bint loaded(const AddressCheck *ac, uint64_t now) noexcept nogil:
    """Whether the server is under load now."""
    return now < ac.loaded_until


cdef inline bint under_load(AddressCheck *ac, uint64_t now) noexcept nogil:
    """Count one first message; whether the server is now under load: over
    LOAD_PER_S, or was within the last LOAD_HOLD_NS."""
    if ac.load_due < now:
        ac.load_due = now
    if ac.load_due - now > <uint64_t>(LOAD_BURST - 1) * LOAD_INTERVAL_NS:
        ac.loaded_until = now + LOAD_HOLD_NS
    else:
        ac.load_due += LOAD_INTERVAL_NS
    return now < ac.loaded_until
