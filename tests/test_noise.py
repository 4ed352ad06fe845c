"""The handshake (multitun/noise.py) against the published test vector of
Noise_NNpsk0_25519_ChaChaPoly_SHA256 and against itself."""

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from multitun import noise

# The Noise test-vector suite's standard inputs (cacophony, the entry for
# Noise_NNpsk0_25519_ChaChaPoly_SHA256): prologue "John Galt", the PSK "This is
# my Austrian perspective!", fixed ephemeral keys, and the expected messages.
VECTOR = {
    "prologue": "4a6f686e2047616c74",
    "psk": "54686973206973206d7920417573747269616e20706572737065637469766521",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    "messages": [
        ("4c756477696720766f6e204d69736573",
         "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944"
         "79b962b8aff8485742ac32f905ba45369e2465fb59e138a93d67a0d1266b6a54"),
        ("4d757272617920526f746862617264",
         "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843"
         "d6062704d5a9c422a8e834423f8c1feada7e8d0d910a1a2cd030fb584221e3"),
        ("462e20412e20486179656b", "e632c3763d7669067383433197a3baddf146e9e70ad4b4e9e59e0f"),
        ("4361726c204d656e676572", "64c6bee32ea91c8474bb4c21d7a700109ad45af77b29764ba5eb1e"),
    ],
}


def key(hexstr: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(hexstr))


def test_known_vector():
    v, h = VECTOR, bytes.fromhex
    initiator = noise.Initiator(h(v["psk"]), h(v["prologue"]), key(v["init_ephemeral"]))
    responder = noise.Responder(h(v["psk"]), h(v["prologue"]), key(v["resp_ephemeral"]))
    (p0, c0), (p1, c1), (p2, c2), (p3, c3) = [(h(p), h(c)) for p, c in v["messages"]]
    assert initiator.write_init(p0) == c0
    assert responder.read_init(c0) == p0
    assert responder.write_response(p1) == c1
    assert initiator.read_response(c1) == p1
    # Transport messages: the first under each side's send key (nonce 0, no
    # associated data) show that the split keys are right.
    init_send, init_receive = initiator.keys()
    resp_send, resp_receive = responder.keys()
    assert (init_send, init_receive) == (resp_receive, resp_send)
    assert ChaCha20Poly1305(init_send).encrypt(bytes(12), p2, b"") == c2
    assert ChaCha20Poly1305(resp_send).encrypt(bytes(12), p3, b"") == c3


def handshake(psk_i: bytes, psk_r: bytes, prologue_i=b"p", prologue_r=b"p"):
    initiator, responder = noise.Initiator(psk_i, prologue_i), noise.Responder(psk_r, prologue_r)
    responder.read_init(initiator.write_init(b"hello"))
    initiator.read_response(responder.write_response(b""))
    return initiator, responder


def test_fresh_keys_every_handshake():
    psk = os.urandom(32)
    first, second = handshake(psk, psk)[0].keys(), handshake(psk, psk)[0].keys()
    assert first[0] != second[0] and first[1] != second[1]


def test_other_psk_fails_on_the_first_message():
    initiator = noise.Initiator(os.urandom(32), b"p")
    with pytest.raises(noise.HandshakeError):
        noise.Responder(os.urandom(32), b"p").read_init(initiator.write_init(b""))


def test_other_prologue_fails():
    psk = os.urandom(32)
    with pytest.raises(noise.HandshakeError):
        handshake(psk, psk, b"key id 1", b"key id 2")


@pytest.mark.parametrize("which", ["init", "response"])
def test_tampered_messages_fail(which):
    psk = os.urandom(32)
    initiator, responder = noise.Initiator(psk, b"p"), noise.Responder(psk, b"p")
    init = bytearray(initiator.write_init(b"ts"))
    if which == "init":
        init[40] ^= 1
        with pytest.raises(noise.HandshakeError):
            responder.read_init(bytes(init))
        return
    responder.read_init(bytes(init))
    response = responder.write_response(b"")
    for i in range(len(response)):
        bad = bytearray(response)
        bad[i] ^= 0x80
        with pytest.raises(noise.HandshakeError):
            initiator.read_response(bytes(bad))
    # A forgery does not spoil the handshake: the genuine response completes it.
    initiator.read_response(response)
    assert initiator.keys() == responder.keys()[::-1]


def test_short_and_low_order_keys_are_refused():
    psk = os.urandom(32)
    with pytest.raises(noise.HandshakeError):
        noise.Responder(psk, b"p").read_init(bytes(20))
    initiator, responder = noise.Initiator(psk, b"p"), noise.Responder(psk, b"p")
    responder.read_init(initiator.write_init(b""))
    with pytest.raises(noise.HandshakeError):
        initiator.read_response(bytes(32) + bytes(16))  # the all-zero point
