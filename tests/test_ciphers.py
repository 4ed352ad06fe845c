"""The cipher choice (multitun/ciphers.py): what each end offers and what the
server chooses, and how AES instructions are found. No root needed."""

import pytest

from multitun import ciphers

X86 = "processor\t: 0\nflags\t\t: fpu vme sse2 aes pclmulqdq avx\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"
PI4 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"


@pytest.mark.parametrize("cpuinfo,env,has", [
    (X86, {}, True),
    (ARM, {}, True),
    (PI4, {}, False),
    # OpenSSL's own masks (openssl-ia32cap(3)): what a test uses to play a CPU
    # without AES instructions.
    (X86, {"OPENSSL_ia32cap": "~0x200000200000000"}, False),
    (X86, {"OPENSSL_ia32cap": "~0x4"}, True),
    (X86, {"OPENSSL_ia32cap": "0x200000000000000"}, True),
    (X86, {"OPENSSL_ia32cap": "0x1"}, False),
    (ARM, {"OPENSSL_armcap": "0x1"}, False),
    (ARM, {"OPENSSL_armcap": "0x5"}, True),
])
def test_aes_instructions(cpuinfo, env, has):
    assert ciphers.aes_instructions(cpuinfo, env) is has


def test_this_machine_is_read():
    assert ciphers.aes_instructions() in (True, False)


AES, CHACHA = ciphers.CIPHERS["aes-256-gcm"], ciphers.CIPHERS["chacha20-poly1305"]


@pytest.mark.parametrize("client,client_aes,server,server_aes,answer", [
    ("auto", True, "auto", True, AES),
    ("auto", False, "auto", True, CHACHA),
    ("auto", True, "auto", False, CHACHA),
    ("aes-256-gcm", False, "auto", False, AES),
    ("auto", True, "chacha20-poly1305", True, CHACHA),
    ("chacha20-poly1305", True, "chacha20-poly1305", True, CHACHA),
    ("chacha20-poly1305", True, "aes-256-gcm", True, None),
])
def test_the_server_chooses(client, client_aes, server, server_aes, answer):
    reply = ciphers.choose(ciphers.offer(client, client_aes), server, server_aes)
    if answer is None:
        with pytest.raises(ciphers.CipherRefused) as refused:
            ciphers.chosen(reply)
        assert refused.value.theirs == server
    else:
        assert ciphers.chosen(reply) == answer


def test_an_unknown_offer_counts_as_auto_and_an_unknown_answer_is_refused():
    assert ciphers.chosen(ciphers.choose(bytes([0x05]), "auto", True)) == CHACHA
    with pytest.raises(ValueError):
        ciphers.chosen(bytes([7]))
