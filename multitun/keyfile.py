"""Pre-shared keys: `multitun genkey` makes one, --key-file reads one.

A key is 32 random bytes written as one line of standard base64 (44
characters), like WireGuard's. Both peers hold the same key; multitun/noise.py
derives each session's keys from it.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
import sys
from pathlib import Path

from .errors import ConfigError

KEY_LEN = 32


def generate_key() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_LEN)).decode()


def decode_key(text: str, where: str) -> bytes:
    """The key in ``text`` (surrounding white space allowed)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_LEN:
        raise ConfigError(f"{where}: not a multitun key (one line of 44 base64 characters, "
                          "as `multitun genkey` prints)")
    return key


def load_key(path: Path) -> bytes:
    """Read a key file, refusing one that other users may read: whoever reads
    the key can read and inject tunnel traffic."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"key file {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"key file {path}: not a regular file")
        if mode & 0o077:
            raise ConfigError(f"key file {path}: readable or writable by other users "
                              f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 {path}")
        data = f.read(4096)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return decode_key(text, f"key file {path}")


def main(argv: list[str]) -> int:
    """`multitun genkey`: print a new key. Write it to a file only you can read:
    (umask 077; multitun genkey > /etc/multitun/key)"""
    if argv:
        print(f"multitun genkey: takes no arguments, got {' '.join(argv)!r}", file=sys.stderr)
        return 2
    print(generate_key())
    return 0
