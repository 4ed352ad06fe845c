"""Session keys (multitun/keying.py) between two keyed engines on loopback:
the client's and the server's sides of real handshakes, rekeying, expiry,
replay and rate limits. No root needed."""

import contextlib
import os
import select
import socket
import threading
import time

import pytest

from multitun import _fastpath, handshake_thread, keying, tickets, wire
from multitun._fastpath import Engine
from multitun.handshake_thread import HandshakeThread
from multitun.keying import ClientKeying, ServerKeying

from multitun.lab.engine_pair import EnginePair, ipv4, listening_server

PSK = os.urandom(32)


class Ends:
    """A client keying engine 0 and a server keying engine 1. ``now`` is the
    keying's clock (the engine keeps its own monotonic one)."""

    def __init__(self, server_psk: bytes = PSK, client_cipher: str = "auto",
                 server_cipher: str = "auto", aes: tuple[bool, bool] = (True, True),
                 ticket: bool = True) -> None:
        """``aes``: whether the client and the server have AES instructions.
        ``ticket``: the client holds a fresh ticket from this server (as after
        an earlier handshake), so a handshake takes one round trip."""
        self.pair = EnginePair(keyed=True, ready=False)
        self.client = ClientKeying(self.pair.engines[0], PSK, client_cipher)
        self.server = ServerKeying(self.pair.engines[1], server_psk, server_cipher)
        self.client.has_aes, self.server.has_aes = aes
        self.now = 1000.0
        if ticket:
            self.client.ticket = self.server.book.issue(self.now)
        self.sent: list[tuple[int, bytes]] = []  # what the server sent back

    def step(self) -> int:
        """Run both engines and hand control packets to the keying; how many
        handshakes completed."""
        a, b = self.pair.engines
        completed = 0
        for _ in range(3):
            b.run(0)
            for _, path, _, datagram, source, reply_to in b.take_control():
                self.server.on_control(path, datagram, source, reply_to, self.now)
            a.run(0)
            for _, path, _, datagram, source, reply_to in a.take_control():
                if self.client.on_control(path, datagram, source, reply_to, self.now):
                    completed += 1
                    a.send_probe(0, 1, 0)  # what the tunnel does: confirm at once
        return completed

    def connect(self) -> None:
        self.client.tick(self.now)
        assert self.step() == 1

    def close(self) -> None:
        self.pair.close()


@pytest.fixture
def ends():
    e = Ends()
    yield e
    e.close()


def slots(engine) -> dict:
    return {k["slot"]: k["id"] for k in engine.keys()}


def test_handshake_installs_and_confirms(ends):
    a, b = ends.pair.engines
    ends.connect()
    assert slots(a) == slots(b) == {"current": a.stats()["key_id"]}
    ends.pair.send(0, [ipv4(1)])
    ends.pair.send(1, [ipv4(2)])
    ends.pair.pump()
    assert ends.pair.received(1) == [ipv4(1)] and ends.pair.received(0) == [ipv4(2)]


def test_response_is_shorter_than_the_request(ends):
    ends.client.tick(ends.now)
    init = ends.pair.udp[1].recv(200)
    ends.pair.udp[0].send(init)  # deliver it to the server ourselves
    ends.pair.engines[1].run(0)
    (_, path, _, datagram, source, reply_to), = ends.pair.engines[1].take_control()
    ends.server.on_control(path, datagram, source, reply_to, ends.now)
    response = ends.pair.udp[0].recv(200)
    assert len(init) == wire.HANDSHAKE_INIT_LEN == 97
    assert len(response) == wire.HANDSHAKE_RESPONSE_LEN == 89 < len(init)
    assert wire.HANDSHAKE_COOKIE_LEN == 68 < len(init)


def test_each_end_takes_only_the_handshake_message_meant_for_it(ends):
    # A first message sent to a client, or a response sent to a server (by a
    # peer of the same role, or crafted), changes nothing and gets nothing.
    a, b = ends.pair.engines
    ends.client.tick(ends.now)
    init = ends.pair.udp[1].recv(200)
    ends.pair.udp[1].send(init)  # back to the client
    a.run(0)
    (_, path, _, datagram, source, reply_to), = a.take_control()
    pending = ends.client.pending
    assert ends.client.on_control(path, datagram, source, reply_to, ends.now) is False
    assert ends.client.pending is pending and ends.client.rejected.as_dict() == {
        "handshake_auth_failed": 0, "handshake_replayed": 0, "handshake_rate_limited": 0,
        "handshake_cookies": 0}
    ends.pair.udp[0].send(init)
    b.run(0)
    (_, path, _, datagram, source, reply_to), = b.take_control()
    assert ends.server.on_control(path, datagram, source, reply_to, ends.now) is False
    response = ends.pair.udp[0].recv(200)  # answered: a response now exists
    ends.pair.udp[0].send(response)  # back to the server
    b.run(0)
    (_, path, _, datagram, source, reply_to), = b.take_control()
    assert wire.peek_header(datagram).type == wire.PacketType.HANDSHAKE_RESPONSE
    assert ends.server.on_control(path, datagram, source, reply_to, ends.now) is False
    assert ends.server.handshakes == 1 and ends.server.rejected.replayed == 0
    with pytest.raises(BlockingIOError):
        ends.pair.udp[0].recv(200)
    assert a.keys() == []


def test_replayed_first_message_gets_no_response(ends):
    ends.client.tick(ends.now)
    init = ends.pair.udp[1].recv(200)
    b = ends.pair.engines[1]
    for when in (ends.now, ends.now + 0.1, ends.now + keying.COPIES_S + 1):
        ends.pair.udp[0].send(init)
        b.run(0)
        for _, path, _, datagram, source, reply_to in b.take_control():
            ends.server.on_control(path, datagram, source, reply_to, when)
    responses = []
    while True:
        try:
            responses.append(ends.pair.udp[0].recv(200))
        except BlockingIOError:
            break
    # The first is answered; the copies on the same path are replays (of the
    # latest first message: known as such without looking at the ticket).
    assert [wire.peek_header(r).type for r in responses] == [wire.PacketType.HANDSHAKE_RESPONSE]
    assert ends.server.rejected.replayed == 2 and ends.server.handshakes == 1
    assert [k["slot"] for k in b.keys()] == ["next"]


def test_a_first_message_with_a_used_ticket_is_refused(ends):
    # Two first messages with one ticket (a replay from before the latest
    # handshake looks like this): the second gets nothing, and no keys.
    ends.client.tick(ends.now)
    old = ends.pair.udp[1].recv(200)
    ends.client.pending = None
    ends.client.tick(ends.now)  # a newer handshake
    new = ends.pair.udp[1].recv(200)
    b = ends.pair.engines[1]
    for init in (new, old):
        ends.pair.udp[0].send(init)
        b.run(0)
        for _, path, _, datagram, source, reply_to in b.take_control():
            ends.server.on_control(path, datagram, source, reply_to, ends.now)
    assert ends.server.handshakes == 1 and ends.server.rejected.replayed == 1
    assert wire.peek_header(ends.pair.udp[0].recv(200)).type == wire.PacketType.HANDSHAKE_RESPONSE
    with pytest.raises(BlockingIOError):
        ends.pair.udp[0].recv(200)  # the replay: no answer


def test_wrong_key_never_answers(ends):
    e = Ends(server_psk=os.urandom(32))
    try:
        e.client.tick(e.now)
        assert e.step() == 0
        assert e.server.rejected.auth_failed == 1
        assert e.server.rejected.last_source == e.pair.udp[0].getsockname()
        assert e.pair.engines[1].keys() == []
    finally:
        e.close()


def test_handshakes_are_rate_limited(ends):
    b = ends.pair.engines[1]
    inits = []
    for _ in range(keying.HANDSHAKE_BURST + 10):
        ends.client.pending = None
        ends.client.ticket = ends.server.book.issue(ends.now)  # each its own
        ends.client.tick(ends.now)
        inits.append(ends.pair.udp[1].recv(200))
    for init in inits:
        ends.pair.udp[0].send(init)
    b.run(0)
    for _, path, _, datagram, source, reply_to in b.take_control():
        ends.server.on_control(path, datagram, source, reply_to, ends.now)
    # From one address, the data plane sheds what is over its rate first
    # (limiter.pxd); the control plane's own limit takes the rest.
    shed = b.stats()["handshakes_shed"]
    assert ends.server.rejected.rate_limited + shed == 10
    assert ends.server.handshakes == keying.HANDSHAKE_BURST


def test_retry_until_answered(ends):
    ends.client.tick(ends.now)
    ends.pair.udp[1].recv(200)  # lost
    ends.client.tick(ends.now + keying.RETRY_S / 2)
    with pytest.raises(BlockingIOError):
        ends.pair.udp[1].recv(200)  # not yet
    ends.client.tick(ends.now + keying.RETRY_S)
    assert ends.step() == 1


def test_rekey_loses_nothing(ends, monkeypatch):
    a, b = ends.pair.engines
    ends.connect()
    first = a.stats()["key_id"]
    monkeypatch.setattr(keying, "REKEY_AFTER_S", 0.0)
    ends.pair.send(0, [ipv4(i) for i in range(5)])
    a.run(0)  # in flight under the first keys
    ends.client.tick(ends.now + 1)
    assert ends.step() == 1
    second = a.stats()["key_id"]
    assert second != first
    assert slots(a) == slots(b) == {"current": second, "previous": first}
    ends.pair.send(0, [ipv4(i) for i in range(5, 10)])
    ends.pair.pump()
    assert ends.pair.received(1) == [ipv4(i) for i in range(10)]


def test_silence_starts_a_new_handshake(ends, monkeypatch):
    ends.connect()
    monkeypatch.setattr(keying, "SILENCE_S", 0.0)
    ends.client.tick(ends.now + 1)
    assert wire.peek_header(ends.pair.udp[1].recv(200)).type == wire.PacketType.HANDSHAKE_INIT


def test_old_keys_expire(ends, monkeypatch):
    ends.connect()
    monkeypatch.setattr(keying, "REJECT_AFTER_S", 0.0)
    ends.server.tick(ends.now)
    assert ends.pair.engines[1].keys() == []
    ends.pair.send(1, [ipv4(1)])
    ends.pair.engines[1].run(0)
    assert ends.pair.engines[1].stats()["no_key"] == 1


@pytest.mark.parametrize("client,server,aes,chosen", [
    ("auto", "auto", (True, True), "aes-256-gcm"),
    ("auto", "auto", (False, True), "chacha20-poly1305"),
    ("auto", "auto", (True, False), "chacha20-poly1305"),
    ("chacha20-poly1305", "auto", (True, True), "chacha20-poly1305"),
    ("auto", "aes-256-gcm", (False, False), "aes-256-gcm"),
    ("aes-256-gcm", "aes-256-gcm", (False, True), "aes-256-gcm"),
])
def test_the_cipher_is_agreed_in_the_handshake(client, server, aes, chosen):
    ends = Ends(client_cipher=client, server_cipher=server, aes=aes)
    try:
        ends.connect()
        a, b = ends.pair.engines
        ends.pair.send(0, [ipv4(1)])
        ends.pair.pump()
        assert ends.pair.received(1) == [ipv4(1)]
        for keyed in (ends.client, ends.server):
            assert keyed.snapshot()["cipher"] == chosen
    finally:
        ends.close()


def test_ciphers_insisted_on_that_differ_install_nothing(caplog):
    ends = Ends(client_cipher="chacha20-poly1305", server_cipher="aes-256-gcm")
    try:
        for _ in range(3):  # retries: refused each time, said once
            ends.client.tick(ends.now)
            assert ends.step() == 0
            ends.now += keying.RETRY_S
        assert ends.pair.engines[0].keys() == ends.pair.engines[1].keys() == []
        said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert said == [
            "handshake refused: the client insists on chacha20-poly1305, this end on "
            "--cipher aes-256-gcm",
            "the server refuses chacha20-poly1305: it is set to --cipher aes-256-gcm; nothing "
            "passes until both ends take the same (or auto)"]
    finally:
        ends.close()


def test_without_a_ticket_a_cookie_then_the_handshake(monkeypatch):
    # A client that never spoke to this server (or restarted): one round
    # trip more, and the ticket it gets serves its next handshake.
    ends = Ends(ticket=False)
    try:
        ends.connect()
        assert ends.server.rejected.cookies == 1 and ends.server.handshakes == 1
        monkeypatch.setattr(keying, "REKEY_AFTER_S", 0.0)
        ends.client.tick(ends.now + 1)  # a rekey: straight through, with the new ticket
        assert ends.step() == 1
        assert ends.server.rejected.cookies == 1 and ends.server.handshakes == 2
    finally:
        ends.close()


def test_a_stale_ticket_gets_a_cookie():
    # The ticket outlived its lifetime (the client slept), or the server
    # restarted since (its secret is new): both stale.
    for late, book in ((tickets.LIFETIME_S + 1, None), (0, tickets.TicketBook())):
        ends = Ends()
        try:
            if book:
                ends.server.book = book
            ends.now += late
            ends.connect()
            assert ends.server.rejected.cookies == 1
        finally:
            ends.close()


def test_no_clock_is_read_for_a_handshake(monkeypatch):
    # A board without a battery-backed clock (1970 at boot, or a day behind):
    # nothing in the handshake depends on the wall clock, on either side.
    def no_clock():
        raise AssertionError("the wall clock was read")

    monkeypatch.setattr(time, "time", no_clock)
    monkeypatch.setattr(time, "time_ns", no_clock)
    ends = Ends(ticket=False)
    try:
        ends.connect()
    finally:
        ends.close()


def test_a_cookie_that_is_not_authentic_changes_nothing():
    ends = Ends(ticket=False)
    try:
        a, b = ends.pair.engines
        ends.client.tick(ends.now)
        init = ends.pair.udp[1].recv(200)
        key_id = wire.peek_header(init).session
        header = wire.pack_header(wire.PacketType.HANDSHAKE_COOKIE, 0, key_id, 0,
                                  wire.VERSION_SEALED)
        forged = header + tickets.seal_cookie(os.urandom(32), init[16:48], header, bytes(24),
                                              os.urandom(12))
        ends.pair.udp[1].send(forged)
        a.run(0)
        (_, path, _, datagram, source, reply_to), = a.take_control()
        assert ends.client.on_control(path, datagram, source, reply_to, ends.now) is False
        assert ends.client.ticket == tickets.NONE and ends.client.rejected.auth_failed == 1
    finally:
        ends.close()


def test_a_lost_response_costs_a_cookie_not_the_connection(ends):
    # The server took the ticket, and its response was lost: the retry asks
    # without a ticket, gets a cookie, and connects.
    ends.client.tick(ends.now)
    b = ends.pair.engines[1]
    b.run(0)
    for _, path, _, datagram, source, reply_to in b.take_control():
        ends.server.on_control(path, datagram, source, reply_to, ends.now)
    ends.pair.udp[0].recv(200)  # the response, lost
    ends.client.tick(ends.now + keying.RETRY_S)
    assert ends.step() == 1
    assert ends.server.rejected.cookies == 1 and ends.server.rejected.replayed == 0


def test_cookies_for_both_copies_of_a_first_message_make_one_handshake():
    # A client without a ticket sends its first message on every path; each
    # copy gets a cookie. Taking both would make two new first messages, and
    # the server's keys for the second would replace the first's after the
    # client took the first's: two seconds of nothing (found at fleet scale).
    e = Ends(ticket=False)
    try:
        a, b = e.pair.engines
        e.client.tick(e.now)
        b.run(0)
        ((_, _, _, init, source, reply_to),) = b.take_control()
        for _ in range(2):  # the copy on another path is the same message (this
            e.server.on_control(0, init, source, reply_to, e.now)  # pair has one path)
        assert e.server.rejected.cookies == 2
        assert sum(e.step() for _ in range(3)) == 1
        assert e.server.handshakes == 1
        e.pair.send(0, [ipv4(1)])
        e.pair.pump()
        assert e.pair.received(1) == [ipv4(1)]
        assert slots(a) == slots(b) == {"current": a.stats()["key_id"]}
    finally:
        e.close()


def test_a_client_proves_its_address_to_a_server_under_load(monkeypatch):
    """A server under load (addresstoken.pxd) answers the client's first
    message with a RETRY; the client sends it again with the token, then
    follows the cookie, carrying the token on that path, and connects. A
    RETRY that does not echo its message is refused; a second one for the
    same path sends nothing more."""
    with listening_server() as (server_engine, address), contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in tun:
            stack.enter_context(s)
        sock.bind(("127.0.0.1", 0))
        sock.connect(address)
        engine = Engine(tun[0].fileno(), [sock.fileno()], False, 0x3000, keyed=True)
        engine.set_remote(0, socket.inet_aton(address[0]), address[1], True)
        client = ClientKeying(engine, PSK)
        server = ServerKeying(server_engine, PSK)
        now = 1000.0
        for i in range(1, 3):  # 40 first messages from elsewhere: under load
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                other.bind((f"127.0.1.{i}", 0))
                for _ in range(20):
                    other.sendto(wire.pack_header(wire.PacketType.HANDSHAKE_INIT, 0, 99, 0,
                                                  wire.VERSION_SEALED)
                                 + os.urandom(wire.HANDSHAKE_INIT_LEN - wire.HEADER_LEN),
                                 address)
            server_engine.run(0)
            server_engine.take_control()

        def step() -> list[int]:
            """Both ends' turn; the types the client's keying was handed."""
            server_engine.run(0)
            for _, path, _, datagram, source, reply_to in server_engine.take_control():
                server.on_control(path, datagram, source, reply_to, now)
            engine.run(0)
            taken = engine.take_control()
            for _, path, _, datagram, source, reply_to in taken:
                client.on_control(path, datagram, source, reply_to, now)
            return [wire.peek_header(c[3]).type for c in taken]

        retries = server_engine.stats()["handshake_retries"]
        assert retries > 0
        client.tick(now)
        assert step() == [wire.PacketType.HANDSHAKE_RETRY]
        assert server.rejected.cookies == 0  # the keying has seen nothing yet
        token = client.tokens[0]
        assert step() == [wire.PacketType.HANDSHAKE_COOKIE]
        assert step() == [wire.PacketType.HANDSHAKE_RESPONSE]
        assert server.handshakes == client.handshakes == 1
        # Only the first message without a token was sent a RETRY.
        assert server_engine.stats()["handshake_retries"] == retries + 1

        monkeypatch.setattr(keying, "REKEY_AFTER_S", 0.0)
        client.tick(now + 1)  # a rekey: the token goes along
        pending = client.pending
        retry = wire.pack_header(wire.PacketType.HANDSHAKE_RETRY, 0, pending.key_id, token,
                                 wire.VERSION_SEALED)
        forged = retry + os.urandom(wire.RETRY_ECHO_LEN)
        assert not client.on_control(0, forged, None, None, now)
        assert client.rejected.auth_failed == 1 and client.tokens[0] == token
        genuine = retry + pending.ephemeral[:wire.RETRY_ECHO_LEN]
        client.on_control(0, genuine, None, None, now)
        client.on_control(0, genuine, None, None, now)
        assert pending.retried == {0}
        server_engine.run(0)
        inits = server_engine.take_control()
        # The rekey's first message and one resend: a RETRY storm makes no more.
        assert [wire.peek_header(c[3]).seq for c in inits] == [token, token]
        # A RETRY for the first message before the latest (a cookie overtook
        # it) brings its token, and sends nothing.
        client._initiate(now)
        assert client.earlier is pending
        newer = wire.pack_header(wire.PacketType.HANDSHAKE_RETRY, 0, pending.key_id,
                                 token + 2, wire.VERSION_SEALED)
        client.on_control(0, newer + pending.ephemeral[:wire.RETRY_ECHO_LEN], None, None, now)
        assert client.tokens[0] == token + 2
        server_engine.run(0)
        assert [wire.peek_header(c[3]).session
                for c in server_engine.take_control()] == [client.pending.key_id]


def test_the_load_never_starts_above_a_peers_answers():
    # addresstoken.pxd: a forged flood just below the load, claiming one
    # peer's key, must not be able to use up that peer's answers.
    assert _fastpath.LIMITS["LOAD_PER_S"] <= keying.HANDSHAKES_PER_S
    assert _fastpath.LIMITS["LOAD_BURST"] <= keying.HANDSHAKE_BURST


@pytest.fixture
def threaded():
    """Ends whose server does its cryptography on a HandshakeThread, as a
    tunnel's does."""
    e = Ends()
    e.server.thread = HandshakeThread()
    yield e
    e.server.thread.close()
    e.close()


def _results(thread: HandshakeThread) -> None:
    """Wait until the thread's results are back, and hand them over."""
    assert select.select([thread.fd], [], [], 5)[0] == [thread.fd]
    while thread.pending:
        select.select([thread.fd], [], [], 5)
        thread.finish()


def test_the_cryptography_runs_off_the_forwarding_thread(threaded, monkeypatch):
    """A first message is checked on the forwarding thread and answered
    there once the handshake thread has done the cryptography: on_control
    returns at once, nothing is sent or installed until finish(); a copy on
    another path meanwhile gets the same response."""
    ran_on = []
    respond = keying._respond
    monkeypatch.setattr(keying, "_respond",
                        lambda *a: ran_on.append(threading.get_ident()) or respond(*a))
    a, b = threaded.pair.engines
    threaded.client.tick(threaded.now)
    b.run(0)
    (control,) = b.take_control()
    _, path, _, datagram, source, reply_to = control
    threaded.server.on_control(path, datagram, source, reply_to, threaded.now)
    threaded.server.on_control(1, datagram, source, reply_to, threaded.now)  # the copy
    assert b.keys() == [] and threaded.server.handshakes == 0
    _results(threaded.server.thread)
    assert ran_on and ran_on[0] != threading.get_ident()
    assert [k["slot"] for k in b.keys()] == ["next"] and threaded.server.handshakes == 1
    assert threaded.server.latest.paths == {0, 1}
    a.run(0)
    ((_, p, _, d, s, r),) = a.take_control()
    # Path 1's copy came back too; this one-path client drops it.
    assert a.stats()["unknown_source"] == 1
    assert threaded.client.on_control(p, d, s, r, threaded.now)


def test_a_result_for_a_peer_that_left_installs_nothing(threaded):
    b = threaded.pair.engines[1]
    threaded.client.tick(threaded.now)
    b.run(0)
    for _, path, _, datagram, source, reply_to in b.take_control():
        threaded.server.on_control(path, datagram, source, reply_to, threaded.now)
    threaded.server.closed = True  # what a reload does to a peer it removes
    _results(threaded.server.thread)
    assert b.keys() == [] and threaded.server.handshakes == 0
    with pytest.raises(BlockingIOError):
        threaded.pair.udp[0].recv(200)


def test_too_many_awaited_results_are_refused(threaded, monkeypatch):
    monkeypatch.setattr(handshake_thread, "MAX_PENDING", 0)
    b = threaded.pair.engines[1]
    threaded.client.tick(threaded.now)
    b.run(0)
    for _, path, _, datagram, source, reply_to in b.take_control():
        threaded.server.on_control(path, datagram, source, reply_to, threaded.now)
    assert threaded.server.rejected.rate_limited == 1 and threaded.server.in_flight == {}
