"""Single-use handshake tickets: the server's defence against replayed first
messages, with no clock on the client.

A first message must carry a ticket the server made, within its lifetime and
never used before. A recorded first message replayed later carries a used
or stale ticket, so it changes nothing: no keys, no response. The server
hands out a new ticket in every response, so a client that rekeys (every two
minutes) always holds a fresh one. A client that has none, or only a stale
one (it restarted; the server restarted and its secret changed; it slept past
the lifetime), gets a cookie instead of a response: a new ticket, sealed to
that first message's ephemeral key under a key derived from the pre-shared
key, so that only the client can read it. It then sends a new first message
at once: one round trip more, and nothing depends on anyone's wall clock
(docs/SECURITY.md says why this is safe).

Tickets are stateless until used: an expiry (the server's monotonic clock, in
milliseconds), a 4-byte serial number (no two alike), and a MAC over both
under a secret the server draws at start. (A serial, not random bytes: only
holders of the pre-shared key ever see a ticket, the MAC is what makes it the
server's, and reading the system's random source would release the GIL on
the forwarding thread for each one, which hands it to the handshake thread:
handshake_thread.py.) The
server remembers used tickets until they expire; at most as many as it
answers handshakes in a lifetime (its rate limit bounds that).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .wire import NONCE_LEN, TICKET_LEN

# Longer than two rekey intervals (REKEY_AFTER_S in keying.py) with margin:
# a client's ticket is always fresh when it next needs one.
LIFETIME_S = 300.0
NONE = bytes(TICKET_LEN)
_EXPIRY_LEN = 8
_SIGNED_LEN = _EXPIRY_LEN + 4
_COOKIE_INFO = b"multitun protocol 2 cookie"


class TicketBook:
    """The server's: makes tickets and takes each once."""

    def __init__(self, lifetime_s: float = LIFETIME_S) -> None:
        self.lifetime_s = lifetime_s
        self._secret = secrets.token_bytes(32)
        self._serials = itertools.count()
        # Cookie nonces: a replayed first message gets a cookie under the
        # same key as the original's, so no nonce may come twice, also
        # across restarts: a counter from a random 96-bit start (two
        # restarts' runs of it overlap with a chance of about their length
        # over 2^96).
        self._nonce = secrets.randbits(8 * NONCE_LEN)
        self._used: dict[bytes, float] = {}

    def issue(self, now: float) -> bytes:
        signed = (int((now + self.lifetime_s) * 1000).to_bytes(_EXPIRY_LEN, "big")
                  + (next(self._serials) & 0xFFFFFFFF).to_bytes(_SIGNED_LEN - _EXPIRY_LEN, "big"))
        return signed + self._mac(signed)

    def nonce(self) -> bytes:
        """A nonce for a cookie, never the same twice (without reading the
        system's random source: see the module's docstring)."""
        self._nonce = (self._nonce + 1) % (1 << 8 * NONCE_LEN)
        return self._nonce.to_bytes(NONCE_LEN, "big")

    def redeem(self, ticket: bytes, now: float) -> str:
        """"ok" (now used), "missing", "stale" (expired, or not this
        server's: made before it restarted) or "used"."""
        if ticket == NONE:
            return "missing"
        expiry = int.from_bytes(ticket[:_EXPIRY_LEN], "big") / 1000
        if not hmac.compare_digest(ticket[_SIGNED_LEN:], self._mac(ticket[:_SIGNED_LEN])) \
                or expiry <= now:
            return "stale"
        if ticket in self._used:
            return "used"
        self._used = {t: until for t, until in self._used.items() if until > now}
        self._used[ticket] = expiry
        return "ok"

    def _mac(self, signed: bytes) -> bytes:
        return hmac.new(self._secret, signed, hashlib.sha256).digest()[:TICKET_LEN - _SIGNED_LEN]


def _cookie_key(psk: bytes, ephemeral: bytes) -> ChaCha20Poly1305:
    # Only holders of the pre-shared key derive it; the first message's
    # ephemeral key makes it that message's own.
    return ChaCha20Poly1305(HKDF(hashes.SHA256(), 32, salt=ephemeral, info=_COOKIE_INFO)
                            .derive(psk))


def seal_cookie(psk: bytes, ephemeral: bytes, header: bytes, ticket: bytes,
                nonce: bytes) -> bytes:
    """The cookie's body: the nonce (TicketBook.nonce()), then the sealed
    ticket; the header is associated data."""
    return nonce + _cookie_key(psk, ephemeral).encrypt(nonce, ticket, header)


def open_cookie(psk: bytes, ephemeral: bytes, header: bytes, body: bytes) -> bytes | None:
    """The ticket in a cookie for our first message, or None if it is not
    authentic."""
    try:
        return _cookie_key(psk, ephemeral).decrypt(body[:NONCE_LEN], body[NONCE_LEN:], header)
    except InvalidTag:
        return None
