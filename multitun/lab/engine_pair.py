"""Two engines facing each other on loopback UDP, each with a datagram
socketpair standing in for its TUN (the engine only read()s and write()s that
fd, and a datagram socket keeps packet boundaries as a TUN does). Needs no
root: the data plane, whole, without devices.

``keyed`` pairs run sealed (protocol version 2) under keys from a real Noise
handshake between the two (no network needed for that part)."""

import contextlib
import functools
import socket
import struct

from multitun import noise
from multitun.ciphers import CIPHERS
from multitun._fastpath import Engine
from multitun.lab.traffic import internet_checksum

KEY_ID = 0x5EA1ED


@functools.cache
def session_keys(psk: bytes = bytes(range(32))) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """(initiator's (send, receive), responder's (send, receive)) of one
    handshake per psk (remembered, so tests can open what an engine sealed)."""
    initiator = noise.Initiator(psk, b"test")
    responder = noise.Responder(psk, b"test")
    responder.read_init(initiator.write_init(b""))
    initiator.read_response(responder.write_response(b""))
    return initiator.keys(), responder.keys()


class EnginePair:
    def __init__(self, gso: bool = True, keyed: bool = False, ready: bool = True,
                 vnet_hdr: bool = False, cipher: int = CIPHERS["aes-256-gcm"]) -> None:
        """``ready``: sessions adopted (in clear) or keys installed (sealed),
        for ``cipher`` (multitun.ciphers.CIPHERS). ``vnet_hdr``: the "TUN"
        carries virtio-net headers (TUN offloads)."""
        self.keyed, self.cipher = keyed, cipher
        self.udp = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
                    for _ in range(2)]
        for s in self.udp:
            s.bind(("127.0.0.1", 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.udp[0].connect(self.udp[1].getsockname())
        self.udp[1].connect(self.udp[0].getsockname())
        # tun[i][0] is engine i's "TUN" fd; the test writes and reads tun[i][1].
        self.tun = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(2)]
        for inner, outer in self.tun:
            inner.setblocking(False)
            outer.setblocking(False)
            for s in (inner, outer):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.engines = [Engine(self.tun[i][0].fileno(), [self.udp[i].fileno()], False,
                               0x1000 + i, gso=gso, keyed=keyed, vnet_hdr=vnet_hdr)
                        for i in range(2)]
        port = [s.getsockname()[1] for s in self.udp]
        for i, e in enumerate(self.engines):
            e.set_remote(0, socket.inet_aton("127.0.0.1"), port[1 - i], True)
        if ready:
            self.handshake()

    def handshake(self) -> None:
        """In clear, a probe each way: each end adopts the other's session.
        Sealed, each end gets its side of a handshake's keys."""
        a, b = self.engines
        if self.keyed:
            (a_send, a_receive), (b_send, b_receive) = session_keys()
            a.install_keys(KEY_ID, a_send, a_receive, True, self.cipher)
            b.install_keys(KEY_ID, b_send, b_receive, True, self.cipher)
        a.send_probe(0, 1, 0)
        b.run(0)  # b (in clear: adopts a's session and) replies
        a.run(0)  # a (adopts b's and) takes the reply
        assert len(a.take_control()) == 1

    def send(self, i: int, packets: list[bytes]) -> None:
        for p in packets:
            self.tun[i][1].send(p)

    def pump(self) -> None:
        for e in self.engines:
            e.run(0)
        for e in reversed(self.engines):
            e.run(0)

    def received(self, i: int) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.tun[i][1].recv(65536))
            except BlockingIOError:
                return out

    def close(self) -> None:
        for s in self.udp:
            s.close()
        for pair in self.tun:
            for s in pair:
                s.close()


@contextlib.contextmanager
def listening_server():
    """A keyed server engine on a loopback socket, and that socket's address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield Engine(tun[0].fileno(), [sock.fileno()], True, 0x2000, keyed=True), \
            sock.getsockname()
    finally:
        for s in (sock, *tun):
            s.close()


def ipv4(n: int, size: int = 1400) -> bytes:
    """An IPv4-looking packet (what the engine checks: first nibble, length)."""
    return bytes([0x45]) + n.to_bytes(4, "big") + bytes(size - 5)


def udp4(sport: int, dport: int, size: int = 1400, tos: int = 0, seq: int = 0,
         src: str = "10.0.0.1", dst: str = "10.0.0.2") -> bytes:
    """An IPv4/UDP packet of ``size`` bytes from src:sport to dst:dport, with
    ``tos`` and ``seq`` at the payload's start (what a paced path's queue
    tells flows by), its header checksum right (a kernel takes it from a
    TUN) and no UDP checksum (RFC 768 allows that over IPv4)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, tos, size, 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", sport, dport, size - 20, 0)
    return (ip + udp + struct.pack("!I", seq)).ljust(size, b".")


def seq_of(packet: bytes) -> int:
    """The ``seq`` udp4() put in a packet."""
    return struct.unpack_from("!I", packet, 28)[0]
