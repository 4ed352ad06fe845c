# Keys and the AEAD, through libcrypto's EVP interface (EVP_EncryptInit(3),
# "AEAD INTERFACE"): AES-256-GCM, fast where the CPU has AES instructions,
# or ChaCha20-Poly1305 (RFC 8439), fast everywhere else; the handshake picks
# one (multitun/keying.py). A context is keyed once, when the control plane
# installs a handshake's keys; each packet only sets the nonce: 32 zero bits,
# then the 64-bit sequence number big-endian. Sealing and opening work in
# place (out == in is allowed). Both ciphers take the same calls.

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from ..includes.linux cimport htobe64
from ..includes.openssl cimport *
from .constants cimport (
    CIPHER_AES_256_GCM, CIPHER_CHACHA20_POLY1305, HEADER_LEN, NONCE_LEN, T_DATA, TAG_LEN,
)
from .window cimport Window

cdef struct Keypair:
    # id 0: the slot is empty. The id travels in the header's session field.
    uint32_t id
    uint8_t cipher
    EVP_CIPHER_CTX *seal
    EVP_CIPHER_CTX *open
    # The sequence number is the nonce: never reused under one key.
    uint64_t tx_seq
    uint64_t installed_ns
    uint64_t last_rx_ns
    uint64_t rx_packets
    # The replay window of this key's packets (de-duplication too).
    Window win


cdef inline bint used_up(const Keypair *kp) noexcept nogil:
    # A key seals at most this many packets (a 64-bit counter never wraps in
    # practice, and the control plane rekeys every two minutes anyway).
    return kp.id == 0 or kp.tx_seq >= 0xFFFFFFFFFFFFE000ULL


cdef inline EVP_CIPHER_CTX *new_cipher(const uint8_t *key, int seal, int cipher) noexcept nogil:
    """A context keyed for one direction; NULL for an unknown cipher or if
    libcrypto fails."""
    cdef EVP_CIPHER_CTX *ctx
    cdef const EVP_CIPHER *kind
    if cipher == CIPHER_AES_256_GCM:
        kind = EVP_aes_256_gcm()
    elif cipher == CIPHER_CHACHA20_POLY1305:
        kind = EVP_chacha20_poly1305()
    else:
        return NULL
    ctx = EVP_CIPHER_CTX_new()
    if ctx != NULL and EVP_CipherInit_ex(ctx, kind, NULL, key, NULL, seal) != 1:
        EVP_CIPHER_CTX_free(ctx)
        return NULL
    return ctx


cdef inline void sequence_nonce(uint8_t *nonce, uint64_t seq) noexcept nogil:
    cdef uint64_t be = htobe64(seq)
    memset(nonce, 0, 4)
    memcpy(nonce + 4, &be, 8)


cdef inline bint aead(EVP_CIPHER_CTX *ctx, bint seal, const uint8_t *nonce, const uint8_t *ad,
                      size_t adlen, uint8_t *data, size_t n, uint8_t *tag) noexcept nogil:
    """Seal or open data[:n] in place under a NONCE_LEN-byte nonce. Sealing
    writes the tag; opening checks it and returns False if the packet is not
    authentic."""
    cdef uint8_t tail[TAG_LEN]
    cdef int outl
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


cdef inline void associated_data(uint8_t *ad, const uint8_t *p) noexcept nogil:
    # The header is the associated data, with DATA's path byte as 0: one
    # ciphertext serves every path, and the sender patches the byte per path.
    memcpy(ad, p, HEADER_LEN)
    if ad[1] == T_DATA:
        ad[2] = 0


cdef inline bint seal_packet(Keypair *kp, uint8_t *p, size_t n, uint64_t seq) noexcept nogil:
    """Seal datagram p[:n] (header included) under kp; the tag goes at p[n]."""
    cdef uint8_t ad[HEADER_LEN]
    cdef uint8_t nonce[NONCE_LEN]
    associated_data(ad, p)
    sequence_nonce(nonce, seq)
    return aead(kp.seal, True, nonce, ad, HEADER_LEN, p + HEADER_LEN, n - HEADER_LEN, p + n)


cdef inline bint open_packet(Keypair *kp, uint8_t *p, size_t n, uint64_t seq) noexcept nogil:
    """Open sealed datagram p[:n] in place; its plaintext is p[:n - TAG_LEN]."""
    cdef uint8_t ad[HEADER_LEN]
    cdef uint8_t nonce[NONCE_LEN]
    associated_data(ad, p)
    sequence_nonce(nonce, seq)
    return aead(kp.open, False, nonce, ad, HEADER_LEN, p + HEADER_LEN,
                n - HEADER_LEN - TAG_LEN, p + n - TAG_LEN)


cdef inline void clear_keypair(Keypair *kp) noexcept nogil:
    # EVP_CIPHER_CTX_free cleanses the key schedule before freeing it.
    EVP_CIPHER_CTX_free(kp.seal)
    EVP_CIPHER_CTX_free(kp.open)
    memset(kp, 0, sizeof(Keypair))
