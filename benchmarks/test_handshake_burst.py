"""How long a server's forwarding thread is away from the data plane while it
answers a burst of first messages (a client's rekey times the server's
answer budget, HANDSHAKE_BURST of them at once), with the handshake
cryptography on that thread (as before multitun/handshake_thread.py) and
on the handshake thread, alternating, in one run:

    python3 -m pytest benchmarks/test_handshake_burst.py -s

A server engine on loopback, its keying fed authentic first messages with
fresh tickets (each a full handshake: keys made, installed, answered), and a
loop as the tunnel's: run the engine, hand the control packets to the
keying, take the results back. Each turn of that loop away from the engine
is a time no packet is forwarded; the longest one is the figure.
"""

import os
import socket
import statistics
import time

from multitun import ciphers, keying, wire
from multitun._fastpath import WAKE, Engine
from multitun.handshake_thread import HandshakeThread
from multitun.keying import ServerKeying
from multitun.noise import Initiator

PSK = os.urandom(32)
ROUNDS = 5


def burst(thread: HandshakeThread | None) -> tuple[float, float]:
    """(longest turn away from the engine, time until all were answered), in
    seconds, for one burst of HANDSHAKE_BURST first messages."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.bind(("127.0.0.1", 0))
        client.bind(("127.0.0.1", 0))
        engine = Engine(tun[0].fileno(), [udp.fileno()], True, 0x77,
                        (thread.fd,) if thread else (), keyed=True)
        server = ServerKeying(engine, PSK, thread=thread)
        now = time.monotonic()
        fp = keying.fingerprint(PSK)
        for key_id in range(1, keying.HANDSHAKE_BURST + 1):
            init = Initiator(PSK, keying.prologue(key_id, fp)).write_init(
                server.book.issue(now) + ciphers.offer(ciphers.AUTO, True))
            client.sendto(wire.pack_header(wire.PacketType.HANDSHAKE_INIT, 0, key_id, 0,
                                           wire.VERSION_SEALED) + fp + init,
                          udp.getsockname())
        longest, start = 0.0, time.perf_counter()
        while server.handshakes < keying.HANDSHAKE_BURST:
            t = time.perf_counter()
            flags = engine.run(0)
            for _, path, _, datagram, source, reply_to in engine.take_control():
                server.on_control(path, datagram, source, reply_to, now)
            if thread and flags & WAKE["fd"]:
                thread.finish()
            longest = max(longest, time.perf_counter() - t)
            assert time.perf_counter() - start < 10, "the burst was not answered"
        return longest, time.perf_counter() - start
    finally:
        for s in (udp, client, *tun):
            s.close()


def test_a_burst_of_first_messages_keeps_the_forwarding_thread_free():
    thread = HandshakeThread()
    try:
        runs = {"on the forwarding thread": [], "on the handshake thread": []}
        for _ in range(ROUNDS):
            runs["on the forwarding thread"].append(burst(None))
            runs["on the handshake thread"].append(burst(thread))
    finally:
        thread.close()
    figures = {where: (statistics.median(r[0] for r in rs) * 1e3,
                       statistics.median(r[1] for r in rs) * 1e3)
               for where, rs in runs.items()}
    print(f"\na burst of {keying.HANDSHAKE_BURST} first messages, medians of {ROUNDS} rounds:")
    for where, (away, total) in figures.items():
        print(f"  cryptography {where}: longest turn away from the data plane "
              f"{away:.3f} ms; all answered in {total:.2f} ms")
    inline, threaded = (figures["on the forwarding thread"][0],
                        figures["on the handshake thread"][0])
    assert threaded < inline / 3
