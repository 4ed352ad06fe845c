"""The Noise handshake multitun keys its sessions with:
Noise_NNpsk0_25519_ChaChaPoly_SHA256.

The Noise Protocol Framework (revision 34) defines it; section 5 gives the
state machine followed here, section 9 the PSK modifier. Pattern NNpsk0:

    -> psk, e          initiator: its ephemeral key, and a payload sealed
                       under a key mixed from the pre-shared key
    <- e, ee           responder: its ephemeral key, and a sealed payload
                       under the Diffie-Hellman of both ephemeral keys

Only holders of the pre-shared key can make a first message the responder
accepts or a response the initiator accepts. Each handshake's keys come from
fresh ephemeral keys on both sides, so they never repeat (a restarted peer
cannot reuse a nonce) and a stolen pre-shared key does not open traffic
recorded before (forward secrecy against a passive recorder).

The primitives are the ``cryptography`` package's. This module knows nothing
of multitun's packets: multitun/keying.py wraps the messages.
"""

from __future__ import annotations

import copy

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL_NAME = b"Noise_NNpsk0_25519_ChaChaPoly_SHA256"
DHLEN = 32
HASHLEN = 32
TAG_LEN = 16


class HandshakeError(ValueError):
    """A handshake message that is not authentic or not well formed."""


def _sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def _hkdf(chaining_key: bytes, ikm: bytes, outputs: int) -> list[bytes]:
    # Noise's HKDF (section 4.3) is RFC 5869 with the chaining key as salt and
    # no info: its outputs are the 32-byte blocks T(1), T(2), ...
    okm = HKDF(algorithm=hashes.SHA256(), length=HASHLEN * outputs, salt=chaining_key,
               info=b"").derive(ikm)
    return [okm[i:i + HASHLEN] for i in range(0, len(okm), HASHLEN)]


def _nonce(n: int) -> bytes:
    # ChaChaPoly's nonce (section 12.3): 32 zero bits, then n little-endian.
    return bytes(4) + n.to_bytes(8, "little")


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


class _SymmetricState:
    """Section 5.2: the chaining key, the handshake hash, and the cipher key."""

    def __init__(self, prologue: bytes) -> None:
        name = PROTOCOL_NAME
        self.h = name.ljust(HASHLEN, b"\0") if len(name) <= HASHLEN else _sha256(name)
        self.ck = self.h
        self.k: bytes | None = None
        self.n = 0
        self.mix_hash(prologue)

    def mix_hash(self, data: bytes) -> None:
        self.h = _sha256(self.h + data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, ikm, 2)
        self.n = 0

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, self.k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        assert self.k is not None  # NNpsk0 has a key before its first payload
        ciphertext = ChaCha20Poly1305(self.k).encrypt(_nonce(self.n), plaintext, self.h)
        self.n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        assert self.k is not None
        try:
            plaintext = ChaCha20Poly1305(self.k).decrypt(_nonce(self.n), ciphertext, self.h)
        except InvalidTag:
            raise HandshakeError("not authentic (the pre-shared keys differ?)") from None
        self.n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def mix_ephemeral(self, public: bytes) -> None:
        # Token "e" in a PSK handshake (section 9.2): hashed, and mixed into
        # the key too, so the payload after it is sealed under a fresh key.
        self.mix_hash(public)
        self.mix_key(public)

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return k1, k2


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point: the shared secret would be all zero
        raise HandshakeError("unusable ephemeral key") from None


class _Party:
    """Either side's start: the prologue, then token "psk" (mixed first, as
    the psk0 modifier says), and an ephemeral key of its own (given only by
    tests reproducing a vector)."""

    def __init__(self, psk: bytes, prologue: bytes,
                 ephemeral: X25519PrivateKey | None = None) -> None:
        self._state = _SymmetricState(prologue)
        self._state.mix_key_and_hash(psk)
        self._e = ephemeral or X25519PrivateKey.generate()


class Initiator(_Party):
    """Writes the first message, reads the response, then has the keys."""

    def write_init(self, payload: bytes) -> bytes:
        e = public_bytes(self._e)
        self._state.mix_ephemeral(e)
        return e + self._state.encrypt_and_hash(payload)

    def read_response(self, message: bytes) -> bytes:
        """The response's payload. A message that is not authentic leaves
        this handshake as it was, so the genuine response still completes it."""
        if len(message) < DHLEN + TAG_LEN:
            raise HandshakeError(f"response of {len(message)} bytes")
        state = copy.copy(self._state)
        re = message[:DHLEN]
        state.mix_ephemeral(re)
        state.mix_key(_dh(self._e, re))
        payload = state.decrypt_and_hash(message[DHLEN:])
        self._state = state
        return payload

    def keys(self) -> tuple[bytes, bytes]:
        """(send, receive) after read_response."""
        return self._state.split()


class Responder(_Party):
    """Reads the first message, writes the response, then has the keys."""

    _re = b""

    def read_init(self, message: bytes) -> bytes:
        if len(message) < DHLEN + TAG_LEN:
            raise HandshakeError(f"first message of {len(message)} bytes")
        self._re = message[:DHLEN]
        self._state.mix_ephemeral(self._re)
        return self._state.decrypt_and_hash(message[DHLEN:])

    def write_response(self, payload: bytes) -> bytes:
        e = public_bytes(self._e)
        self._state.mix_ephemeral(e)
        self._state.mix_key(_dh(self._e, self._re))
        return e + self._state.encrypt_and_hash(payload)

    def keys(self) -> tuple[bytes, bytes]:
        """(send, receive) after write_response."""
        k1, k2 = self._state.split()
        return k2, k1
