"""Session keys for sealed mode (--key-file): when a handshake is made, what
it installs in the engine, and when keys expire.

The client is always the initiator: it knows the server's addresses. It sends
its first message (multitun/noise.py) on every path at once, so the handshake
completes over the fastest path that works, and installs the keys when the
first response arrives. The server installs its side as *next* keys; the engine
makes them current on the first authentic packet under them (the client probes
every path at once for that), so an unconfirmed handshake, such as one replayed
by someone without the key, never replaces working keys.

Timers, after WireGuard's (whitepaper section 6): the client makes a new
handshake every REKEY_AFTER_S, or when nothing authentic arrived for
SILENCE_S (the server restarted, or every path failed), retrying every RETRY_S
until answered. Keys older than REJECT_AFTER_S are dropped on both sides.

A server under a flood of first messages asks their senders to prove their
addresses first (multitun/fastpath/addresstoken.pxd): it answers with a RETRY
that carries a token for the address, and the client sends the same message
again, with the token, on that path (and with it, on that path, for as long as
it is valid).

First messages carry a single-use ticket from the server (multitun/tickets.py):
a recorded first message replayed later carries a used or stale one and gets
no keys. A client without a fresh ticket is sent one in a cookie and tries
again at once. No clock is read for any of it. Copies of the latest first
message on other paths are answered (once per path, within COPIES_S) with
the same response. Every answer is shorter than the first message: no
amplification. Answers are also rate-limited. A server's cryptography runs
on its handshake thread (handshake_thread.py): this module checks a first
message, hands the work there, and installs what comes back.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field

from . import ciphers, noise, tickets, wire
from ._fastpath import Engine
from .handshake_thread import HandshakeThread
from .noise import HandshakeError, Initiator, Responder
from .ratelimit import TokenBucket

log = logging.getLogger("multitun")

REKEY_AFTER_S = 120.0
REJECT_AFTER_S = 180.0
RETRY_S = 1.0
SILENCE_S = 2.0
COPIES_S = 2.0
HANDSHAKES_PER_S = 20.0
HANDSHAKE_BURST = 20
UNANSWERED_LOG_S = 10.0

_PROLOGUE = b"multitun protocol 2, key id "
_FINGERPRINT_INFO = b"multitun key fingerprint "


def fingerprint(psk: bytes) -> bytes:
    """What a first message says of the key it is made with, in clear: a
    fleet server finds the peer by it (never by the sender's address). A
    one-way function of the key; it tells nothing of the key, but it does
    tell an onlooker that two first messages are one client's."""
    return hashlib.sha256(_FINGERPRINT_INFO + psk).digest()[:wire.FINGERPRINT_LEN]


def prologue(key_id: int, fingerprint: bytes) -> bytes:
    # Binds the key id in the clear header, and the fingerprint, to the
    # handshake: a message moved to another id, or with another fingerprint,
    # does not authenticate.
    return _PROLOGUE + key_id.to_bytes(4, "big") + fingerprint


def _message(ptype: wire.PacketType, path: int, key_id: int, body: bytes,
             token: int = 0) -> bytes:
    # A first message's sequence field carries the server's address token
    # for its path, if the client holds one; it is not part of the handshake.
    return wire.pack_header(ptype, path, key_id, token, wire.VERSION_SEALED) + body


@dataclass
class Rejections:
    """Handshakes refused, for the log and `multitun status`."""

    auth_failed: int = 0
    replayed: int = 0
    rate_limited: int = 0
    # First messages without a fresh ticket, answered with a cookie.
    cookies: int = 0
    last_source: tuple | None = None

    def as_dict(self) -> dict:
        return {"handshake_auth_failed": self.auth_failed,
                "handshake_replayed": self.replayed,
                "handshake_rate_limited": self.rate_limited,
                "handshake_cookies": self.cookies}


class Keying:
    """What both ends do: take the handshake messages meant for their side,
    expire old keys, report."""

    # The handshake messages this end takes; the others, sent by a peer of
    # the same role or crafted, are ignored.
    handshake_types: tuple[wire.PacketType, ...]

    def __init__(self, engine: Engine, psk: bytes, cipher: str = ciphers.AUTO,
                 peer: int = 0, name: str | None = None) -> None:
        """``peer``: the engine's index of the peer these keys are for;
        ``name``: a fleet server's name for it, which its log lines say."""
        self.engine, self.psk, self.cipher, self.peer = engine, psk, cipher, peer
        self.said = f"peer {name}: " if name else ""
        self.fingerprint = fingerprint(psk)
        self.has_aes = ciphers.aes_instructions()
        self.next_refusal_log = 0.0
        self.handshakes = 0
        self.rejected = Rejections()

    def on_control(self, path: int, datagram: bytes, source: tuple | None,
                   reply_to: object, now: float) -> bool:
        """A control packet from ``Engine.take_control()`` other than a probe
        reply; True when it put new keys in use (the caller then sends
        authentic packets on every path at once, which confirms them to the
        server). ``reply_to`` is the engine's and goes back to it unchanged."""
        if wire.peek_header(datagram).type not in self.handshake_types:
            return False
        return self._on_handshake(path, datagram, source, reply_to, now)

    def _on_handshake(self, path: int, datagram: bytes, source: tuple | None,
                      reply_to: object, now: float) -> bool:
        raise NotImplementedError

    def tick(self, now: float) -> None:
        for k in self.engine.keys(self.peer):
            if k["age_s"] > REJECT_AFTER_S:
                self.engine.drop_keys(k["id"], self.peer)
                log.info(self.said + "keys %08x expired after %.0fs", k["id"], k["age_s"],
                         extra={"event": "keys_expired", "key_id": f"{k['id']:08x}"})

    def current(self) -> dict | None:
        return next((k for k in self.engine.keys(self.peer) if k["slot"] == "current"), None)

    def snapshot(self) -> dict:
        cur = self.current()
        return {"keyed": True, "cipher": ciphers.NAMES[cur["cipher"]] if cur else None,
                "cipher_setting": self.cipher,
                "handshake": "Noise_NNpsk0_25519_ChaChaPoly_SHA256",
                "key_id": f"{cur['id']:08x}" if cur else None,
                "key_age_s": round(cur["age_s"], 1) if cur else None,
                "handshakes": self.handshakes, **self.rejected.as_dict()}

    def _refuse(self, kind: str, source: tuple | None) -> None:
        setattr(self.rejected, kind, getattr(self.rejected, kind) + 1)
        self.rejected.last_source = source

    def _log_refusal(self, now: float, message: str, *args: object) -> None:
        """A cipher refused: said once, then every UNANSWERED_LOG_S while
        it lasts (each retry would say it again)."""
        if now >= self.next_refusal_log:
            log.error(self.said + message, *args, extra={"event": "cipher_refused"})
            self.next_refusal_log = now + UNANSWERED_LOG_S


@dataclass
class _Pending:
    initiator: Initiator
    key_id: int
    sent_at: float
    # What follows the header: sent again, with a token, after a RETRY.
    body: bytes
    # The first message's ephemeral public key: a cookie for it is sealed to
    # it, and a RETRY for it echoes its start.
    ephemeral: bytes
    # It carried a ticket: the server may answer it with keys (without, only
    # with a cookie).
    ticketed: bool
    # The server answered it (refusing the cipher, say): its ticket is fresh.
    answered: bool = False
    # Paths it was sent again on with a token: once each, whatever comes.
    retried: set[int] = field(default_factory=set)


class ClientKeying(Keying):
    handshake_types = (wire.PacketType.HANDSHAKE_RESPONSE, wire.PacketType.HANDSHAKE_COOKIE,
                       wire.PacketType.HANDSHAKE_RETRY)

    def __init__(self, engine: Engine, psk: bytes, cipher: str = ciphers.AUTO) -> None:
        super().__init__(engine, psk, cipher)
        # The server's latest ticket (none yet: the first handshake takes a cookie).
        self.ticket = tickets.NONE
        self.pending: _Pending | None = None
        self.earlier: _Pending | None = None
        self.first_attempt: float | None = None
        self.next_unanswered_log = 0.0
        # The server's latest address token for each path. It is valid for 120
        # to 240 seconds (addresstoken.pxd), but one that is no longer (or a
        # path whose address changed) costs only a RETRY, and only while the
        # server is under load: it is sent until another replaces it.
        self.tokens: dict[int, int] = {}

    def tick(self, now: float) -> None:
        super().tick(now)
        cur = self.current()
        if cur is None or cur["age_s"] >= REKEY_AFTER_S or self._silent(cur):
            if self.pending is None or now - self.pending.sent_at >= RETRY_S:
                if self.pending is not None and not self.pending.answered:
                    # The server may have taken the ticket and its response
                    # been lost: ask for a fresh one rather than be taken for
                    # a replay.
                    self.ticket = tickets.NONE
                self._initiate(now)
        if self.first_attempt is not None and now - self.first_attempt >= UNANSWERED_LOG_S / 2 \
                and now >= self.next_unanswered_log:
            log.warning("no handshake answered for %.0fs: the server is unreachable, or its "
                        "key differs from ours", now - self.first_attempt,
                        extra={"event": "handshake_unanswered"})
            self.next_unanswered_log = now + UNANSWERED_LOG_S

    @staticmethod
    def _silent(key: dict) -> bool:
        # Nothing authentic for SILENCE_S under the current keys, although
        # the server answers probes every --probe-interval.
        quiet_s = min(key["age_s"], (time.monotonic_ns() - key["last_rx_ns"]) / 1e9)
        return quiet_s > SILENCE_S

    def _initiate(self, now: float) -> None:
        taken = {k["id"] for k in self.engine.keys()}
        key_id = 0
        while key_id == 0 or key_id in taken:
            key_id = secrets.randbits(32)
        initiator = Initiator(self.psk, prologue(key_id, self.fingerprint))
        message = initiator.write_init(self.ticket + ciphers.offer(self.cipher, self.has_aes))
        body = self.fingerprint + message
        self.earlier = self.pending
        self.pending = _Pending(initiator, key_id, now, body, message[:noise.DHLEN],
                                self.ticket != tickets.NONE)
        if self.first_attempt is None:
            self.first_attempt = now
        for p in self.engine.paths():
            if p["active"]:
                self.engine.send_control(p["path"], _message(
                    wire.PacketType.HANDSHAKE_INIT, p["path"], key_id, body,
                    self.tokens.get(p["path"], 0)))
        log.debug("handshake %08x sent", key_id)

    def _on_handshake(self, path: int, datagram: bytes, source: tuple | None,
                      reply_to: object, now: float) -> bool:
        """A response or a cookie; True when it completed a handshake (new
        keys in use)."""
        header = wire.peek_header(datagram)
        # The handshake it answers: the latest, or the one before (on a path
        # slower than RETRY_S the answer comes after the retry).
        pending = next((p for p in (self.pending, self.earlier)
                        if p is not None and p.key_id == header.session), None)
        if pending is None:
            return False  # a copy from a slower path, or one we gave up on
        if header.type == wire.PacketType.HANDSHAKE_COOKIE:
            if pending is not self.pending:
                # A cookie for a first message already followed by a newer
                # one (the copy on another path got a cookie too): answering
                # it would make a third, whose keys would replace the
                # second's on the server after we took the second's.
                return False
            return self._on_cookie(pending, datagram, source, now)
        if header.type == wire.PacketType.HANDSHAKE_RETRY:
            self._on_retry(pending, path, datagram, source, now)
            return False
        try:
            payload = pending.initiator.read_response(datagram[wire.HEADER_LEN:])
        except HandshakeError:
            self._refuse("auth_failed", source)
            return False
        self.ticket = payload[1:]  # for the next handshake, refused or not
        pending.answered = True
        try:
            cipher = ciphers.chosen(payload[:1])
        except ciphers.CipherRefused as e:
            self._log_refusal(now, "the server refuses %s: it is set to --cipher %s; nothing "
                              "passes until both ends take the same (or auto)",
                              self.cipher, e.theirs)
            return False
        except ValueError:  # a cipher this version does not know (a newer server)
            self._log_refusal(now, "the server chose cipher %d, which this multitun does "
                              "not know", payload[0])
            return False
        if self.cipher != ciphers.AUTO and cipher != ciphers.CIPHERS[self.cipher]:
            self._log_refusal(now, "the server chose %s although this end insists on %s",
                              ciphers.NAMES[cipher], self.cipher)
            return False
        send, receive = pending.initiator.keys()
        self.engine.install_keys(pending.key_id, send, receive, True, cipher)
        self.handshakes += 1
        if pending is self.earlier and self.pending is not None and self.pending.ticketed:
            # The newer first message may be answered too; its keys then
            # replace these on the server, so its response must still count.
            # (One without a ticket gets only a cookie, not to be followed.)
            self.earlier = None
        else:
            self.pending = self.earlier = None
        self.first_attempt = None
        log.log(logging.INFO if self.handshakes == 1 else logging.DEBUG,
                "handshake %08x complete on path %d: %s", pending.key_id, path,
                ciphers.NAMES[cipher],
                extra={"event": "handshake", "key_id": f"{pending.key_id:08x}", "path": path,
                       "cipher": ciphers.NAMES[cipher]})
        return True


    def _on_retry(self, pending: _Pending, path: int, datagram: bytes,
                  source: tuple | None, now: float) -> None:
        """The server is under load and wants this path's address proved:
        the path's token is kept, and the latest first message goes again
        on the path, with it. (A RETRY for the one before, which a cookie
        overtook, still brings the token.)"""
        if datagram[wire.HEADER_LEN:] != pending.ephemeral[:wire.RETRY_ECHO_LEN]:
            self._refuse("auth_failed", source)  # made by someone who never saw it
            return
        token = wire.peek_header(datagram).seq
        self.tokens[path] = token
        if pending is not self.pending or path in pending.retried:
            return  # once per path and message: more RETRYs make no more sends
        pending.retried.add(path)
        self.engine.send_control(path, _message(
            wire.PacketType.HANDSHAKE_INIT, path, pending.key_id, pending.body, token))
        log.debug("handshake %08x: the server is under load; sent again on path %d with "
                  "its address token", pending.key_id, path)

    def _on_cookie(self, pending: _Pending, datagram: bytes, source: tuple | None,
                   now: float) -> bool:
        """The server wants a fresh ticket in our first message: here it is;
        a new first message goes at once."""
        ticket = tickets.open_cookie(self.psk, pending.ephemeral,
                                     datagram[:wire.HEADER_LEN], datagram[wire.HEADER_LEN:])
        if ticket is None:
            self._refuse("auth_failed", source)
            return False
        self.ticket = ticket
        log.debug("handshake %08x: a new ticket from the server", pending.key_id)
        self._initiate(now)
        return False


@dataclass
class _Answered:
    body: bytes
    key_id: int
    response: bytes
    at: float
    paths: set[int] = field(default_factory=set)


@dataclass
class _InFlight:
    """A first message whose cryptography is under way (handshake_thread.py),
    and where to answer it: its path, and those its copies came by meanwhile."""

    key_id: int
    at: float
    source: tuple | None
    reply_to: dict[int, object]


def _respond(psk: bytes, prologue: bytes, message: bytes, setting: str, has_aes: bool,
             new_ticket: bytes) -> tuple | None:
    """The cryptography of answering a first message (on the handshake thread;
    no engine here): its ticket, the cipher answer, and the response and keys
    made with it (wasted if the ticket turns out stale or used: the rate limit
    bounds that); None if it is not authentic.

    Nothing here releases the GIL (the new ticket is made by the caller, on
    the forwarding thread): a thread that releases and takes it back cancels
    the forwarding thread's request for it (handshake_thread.py)."""
    responder = Responder(psk, prologue)
    try:
        payload = responder.read_init(message)
    except HandshakeError:
        return None
    offer = payload[wire.TICKET_LEN:wire.TICKET_LEN + 1]
    answer = ciphers.choose(offer, setting, has_aes)
    response = responder.write_response(answer + new_ticket)
    return payload[:wire.TICKET_LEN], offer, answer, response, responder.keys()


class ServerKeying(Keying):
    handshake_types = (wire.PacketType.HANDSHAKE_INIT,)

    def __init__(self, engine: Engine, psk: bytes, cipher: str = ciphers.AUTO,
                 peer: int = 0, name: str | None = None,
                 thread: HandshakeThread | None = None) -> None:
        """``thread``: where the cryptography runs (None: on the caller's
        thread, at once)."""
        super().__init__(engine, psk, cipher, peer, name)
        self.thread = thread
        self.book = tickets.TicketBook()
        self.latest: _Answered | None = None
        self.in_flight: dict[tuple[int, bytes], _InFlight] = {}
        self.bucket = TokenBucket(HANDSHAKES_PER_S, HANDSHAKE_BURST)
        # The peer left the fleet: results still on their way install nothing.
        self.closed = False

    def _on_handshake(self, path: int, datagram: bytes, source: tuple | None,
                      reply_to: object, now: float) -> bool:
        """A first message: answered when authentic and new. False always:
        the keys go in as *next*, in use only once the client confirms them."""
        self._answer(path, datagram, source, reply_to, now)
        return False

    def _answer(self, path: int, datagram: bytes, source: tuple | None,
                reply_to: object, now: float) -> None:
        if not self.bucket.take(now):
            self._refuse("rate_limited", source)
            return
        key_id = wire.peek_header(datagram).session
        body = datagram[wire.HEADER_LEN:]
        latest = self.latest
        if latest is not None and latest.body == body and latest.key_id == key_id:
            if now - latest.at <= COPIES_S and path not in latest.paths:
                latest.paths.add(path)
                self._send(reply_to, wire.PacketType.HANDSHAKE_RESPONSE, path, key_id,
                           latest.response)
            else:
                self._refuse("replayed", source)
            return
        flight = self.in_flight.get((key_id, body))
        if flight is not None:
            # A copy on another path while the first is being answered:
            # answered with it, once per path.
            if path in flight.reply_to:
                self._refuse("replayed", source)
            else:
                flight.reply_to[path] = reply_to
            return
        if body[:wire.FINGERPRINT_LEN] != self.fingerprint:
            self._refuse("auth_failed", source)  # made with another key: no work spent
            return
        self.in_flight[key_id, body] = _InFlight(key_id, now, source, {path: reply_to})
        work = functools.partial(_respond, self.psk, prologue(key_id, self.fingerprint),
                                 body[wire.FINGERPRINT_LEN:], self.cipher, self.has_aes,
                                 self.book.issue(now))
        then = functools.partial(self._answered, key_id, body)
        if self.thread is None:
            then(work())
        elif not self.thread.submit(work, then):
            del self.in_flight[key_id, body]
            self._refuse("rate_limited", source)

    def _answered(self, key_id: int, body: bytes, result: tuple | None) -> None:
        """Back on the forwarding thread: the ticket, the keys, the answers."""
        flight = self.in_flight.pop((key_id, body))
        if self.closed:
            return
        if result is None:
            self._refuse("auth_failed", flight.source)
            return
        ticket, offer, answer, response, (send, receive) = result
        now = flight.at
        ids = {k["id"]: k["slot"] for k in self.engine.keys(self.peer)}
        if ids.get(key_id, "next") != "next":
            self._refuse("replayed", flight.source)  # the id of keys in use: never reinstalled
            return
        verdict = self.book.redeem(ticket, now)
        if verdict != "ok":
            # No keys. A client that needs a fresh ticket gets a cookie,
            # which only the sender of this first message can open.
            if verdict == "used":
                # Replayed: no answer at all. (A client whose response was
                # lost asks again without a ticket, and gets a cookie.)
                self._refuse("replayed", flight.source)
                return
            self.rejected.cookies += 1
            ephemeral = body[wire.FINGERPRINT_LEN:][:noise.DHLEN]
            for path, reply_to in flight.reply_to.items():
                header = wire.pack_header(wire.PacketType.HANDSHAKE_COOKIE, path, key_id, 0,
                                          wire.VERSION_SEALED)
                self._send_back(reply_to, header + tickets.seal_cookie(
                    self.psk, ephemeral, header, self.book.issue(now), self.book.nonce()))
            return
        try:
            cipher = ciphers.chosen(answer)
        except ciphers.CipherRefused:
            # Said to the client (its log names ours), and nothing installed.
            self._log_refusal(now, "handshake refused: the client insists on %s, this end "
                              "on --cipher %s", ciphers.offered(offer), self.cipher)
            self._answer_all(flight, response)
            return
        self.engine.drop_keys(key_id, self.peer)
        try:
            self.engine.install_keys(key_id, send, receive, False, cipher, self.peer)
        except ValueError:
            # Another client's keys have this id (a fleet server): no answer;
            # this client's next first message draws another.
            self._refuse("replayed", flight.source)
            return
        self.latest = _Answered(body, key_id, response, now, set(flight.reply_to))
        self.handshakes += 1
        self._answer_all(flight, response)
        log.debug(self.said + "handshake %08x answered on path(s) %s", key_id,
                  ", ".join(map(str, flight.reply_to)))

    def _answer_all(self, flight: _InFlight, response: bytes) -> None:
        for path, reply_to in flight.reply_to.items():
            self._send(reply_to, wire.PacketType.HANDSHAKE_RESPONSE, path, flight.key_id,
                       response)

    def _send(self, reply_to: object, ptype: wire.PacketType, path: int, key_id: int,
              body: bytes) -> None:
        self._send_back(reply_to, _message(ptype, path, key_id, body))

    def _send_back(self, reply_to: object, datagram: bytes) -> None:
        try:
            self.engine.send_back(reply_to, datagram)
        except ValueError:
            # So many control packets came meanwhile that the engine no
            # longer holds where this one came from: the answer is lost, as
            # on a lossy path, and the client asks again.
            log.debug(self.said + "an answer's return address expired")
