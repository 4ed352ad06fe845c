# libcrypto's EVP cipher interface, as the data plane uses it: the AEADs
# (EVP_EncryptInit(3), "AEAD INTERFACE") and AES-256 on single blocks for the
# address tokens. Linked from the extension; no Python call per packet.

cdef extern from "<openssl/evp.h>" nogil:
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass

    enum:
        EVP_CTRL_AEAD_GET_TAG
        EVP_CTRL_AEAD_SET_TAG

    const EVP_CIPHER *EVP_aes_256_gcm()
    const EVP_CIPHER *EVP_chacha20_poly1305()
    const EVP_CIPHER *EVP_aes_256_ecb()
    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *impl,
                          const unsigned char *key, const unsigned char *iv, int enc)
    int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                         const unsigned char *inp, int inl)
    int EVP_CipherFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl)
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr)
    int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX *ctx, int padding)


cdef extern from "<openssl/crypto.h>" nogil:
    # OpenSSL_version(3): which libcrypto the data plane was linked with; its
    # AES-GCM speed differs by release (packaging/libcrypto.sh says why).
    enum:
        OPENSSL_VERSION
    const char *OpenSSL_version(int t)
