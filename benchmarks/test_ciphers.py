"""The two AEADs of sealed mode, as the data plane calls them, with the CPU's
AES instructions and without them (OpenSSL's OPENSSL_ia32cap mask, as on a
board that lacks them): nanoseconds to seal one 1400-byte packet.

    python3 -m pytest benchmarks/test_ciphers.py -s

Each figure is the median of 3 rounds, the four cases alternating, each in a
process of its own (libcrypto reads the mask when it starts)."""

import os
import platform
import statistics
import subprocess
import sys

import pytest

from multitun.ciphers import CIPHERS

# openssl-ia32cap(3): clear AES-NI and PCLMULQDQ.
NO_AES = {"OPENSSL_ia32cap": "~0x200000200000000"}
PACKETS = 200_000


def seal_ns(cipher: str, env: dict) -> float:
    code = (f"from multitun import _testing; "
            f"print(_testing.seal_ns({CIPHERS[cipher]}, 1400, {PACKETS}))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                         capture_output=True, text=True, check=True, cwd="/")
    return float(out.stdout)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="OPENSSL_ia32cap is x86's mask")
def test_ciphers_with_and_without_aes_instructions(benchmark):
    cases = [(cipher, name, env) for cipher in CIPHERS
             for name, env in (("aes-ni", {}), ("no-aes-ni", NO_AES))]
    times = {case[:2]: [] for case in cases}

    def rounds():
        for _ in range(3):
            for cipher, name, env in cases:
                times[(cipher, name)].append(seal_ns(cipher, env))

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    figures = {f"{cipher}_{name}_ns": round(statistics.median(t), 1)
               for (cipher, name), t in times.items()}
    benchmark.extra_info.update(figures)
    print("\n" + "\n".join(f"{k} {v}" for k, v in figures.items()))
    # Without AES instructions AES-GCM falls to constant-time software, and
    # ChaCha20-Poly1305 is the faster of the two: what --cipher auto picks.
    assert figures["chacha20-poly1305_no-aes-ni_ns"] < figures["aes-256-gcm_no-aes-ni_ns"]
