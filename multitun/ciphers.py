"""Which AEAD seals the data (--cipher), agreed in the handshake.

AES-256-GCM is the fastest where both ends have AES instructions;
ChaCha20-Poly1305 (RFC 8439) is fast in software, so it is the one for small
boards without them (a Raspberry Pi 4, for one). The client's first message
carries its setting and whether it has AES instructions; the server chooses,
and its response carries the choice, or a refusal when both ends insist on
different ciphers. Both messages are sealed and bound into the Noise
transcript, so no one without the key can change what was offered or chosen
(docs/SECURITY.md).
"""

from __future__ import annotations

import os

AUTO = "auto"
# The data plane's numbers for them (CIPHER_* in multitun/fastpath/constants.pxd;
# tests/test_codec.py holds the two equal). Pure Python: the command line reads
# these names without loading the compiled module.
CIPHERS = {"aes-256-gcm": 1, "chacha20-poly1305": 2}
NAMES = {number: name for name, number in CIPHERS.items()}
SETTINGS = (AUTO, *CIPHERS)

# The offer, one byte: the setting in the low bits (0 auto, else the cipher's
# number), and whether the sender has AES instructions.
_HAS_AES = 0x80
# The answer, one byte: the cipher's number, or this bit and the number the
# server insists on.
_REFUSED = 0x80

# OpenSSL's capability bits for AES instructions: bit 57 of the x86 vector
# (CPUID.1:ECX.AESNI, crypto/cpuid.c), bit 2 of the ARM one (ARMV8_AES,
# crypto/arm_arch.h). Their environment variables mask them, as in tests.
_IA32_AESNI = 1 << 57
_ARMV8_AES = 1 << 2


class CipherRefused(Exception):
    """The server insists on a cipher the client does not take."""

    def __init__(self, theirs: str) -> None:
        super().__init__(theirs)
        self.theirs = theirs


def aes_instructions(cpuinfo: str | None = None, env: dict | None = None) -> bool:
    """Whether this CPU has AES instructions that libcrypto will use: the
    ``aes`` flag in /proc/cpuinfo (x86 "flags", ARM "Features"), unless
    OPENSSL_ia32cap or OPENSSL_armcap masks them."""
    env = os.environ if env is None else env
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False  # not known: ChaCha20-Poly1305 is fast either way
    has = any(line.split(":", 1)[0].strip() in ("flags", "Features")
              and "aes" in line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
              if ":" in line)
    ia32 = env.get("OPENSSL_ia32cap", "").split(":")[0]
    if ia32:
        # A leading '~' masks the bits it names; without, the value replaces
        # the capability vector.
        bits = _number(ia32.lstrip("~"))
        has = has and (not bits & _IA32_AESNI if ia32.startswith("~") else bool(bits & _IA32_AESNI))
    armcap = env.get("OPENSSL_armcap")
    if armcap:
        has = has and bool(_number(armcap) & _ARMV8_AES)
    return has


def _number(text: str) -> int:
    """A number as OpenSSL reads these variables (strtoul(3) with base 0:
    0x hex, 0 octal, else decimal); 0 if it is none."""
    text = text.strip().lower()
    try:
        if text.startswith("0x"):
            return int(text, 16)
        return int(text, 8) if text.startswith("0") and len(text) > 1 else int(text)
    except ValueError:
        return 0


def offer(setting: str, has_aes: bool) -> bytes:
    return bytes([(CIPHERS.get(setting, 0)) | (_HAS_AES if has_aes else 0)])


def choose(offered: bytes, setting: str, has_aes: bool) -> bytes:
    """The server's answer to an offer: AES-256-GCM when both ends have AES
    instructions, else ChaCha20-Poly1305; what one end insists on, if only
    one does; a refusal when they insist on different ones."""
    theirs, their_aes = offered[0] & ~_HAS_AES, bool(offered[0] & _HAS_AES)
    ours = CIPHERS.get(setting, 0)
    if theirs not in NAMES:
        theirs = 0  # a cipher this version does not know: as if it said auto
    if theirs and ours and theirs != ours:
        return bytes([_REFUSED | ours])
    chosen = theirs or ours or (CIPHERS["aes-256-gcm"] if has_aes and their_aes
                                else CIPHERS["chacha20-poly1305"])
    return bytes([chosen])


def chosen(answer: bytes) -> int:
    """The cipher's number in the server's answer; CipherRefused if it refused."""
    number = answer[0] & ~_REFUSED
    if number not in NAMES:
        raise ValueError(f"an answer of cipher {number}")
    if answer[0] & _REFUSED:
        raise CipherRefused(NAMES[number])
    return number


def offered(offer_byte: bytes) -> str:
    """The setting an offer names, for the log."""
    return NAMES.get(offer_byte[0] & ~_HAS_AES, AUTO)
