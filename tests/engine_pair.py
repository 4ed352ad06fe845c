"""Two engines facing each other on loopback UDP, each with a datagram
socketpair standing in for its TUN (the engine only read()s and write()s that
fd, and a datagram socket keeps packet boundaries as a TUN does). Needs no
root: the data plane, whole, without devices."""

import socket

from multitun import wire
from multitun._fastpath import Engine


class EnginePair:
    def __init__(self, gso: bool = True) -> None:
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
                               0x1000 + i, gso=gso) for i in range(2)]
        port = [s.getsockname()[1] for s in self.udp]
        for i, e in enumerate(self.engines):
            e.set_remote(0, socket.inet_aton("127.0.0.1"), port[1 - i], True)
        self.handshake()

    def handshake(self) -> None:
        """A probe each way: each end adopts the other's session."""
        a, b = self.engines
        a.send_control(0, wire.probe(0, a.session, 1, 0))
        b.run(0)  # b adopts a's session and replies
        a.run(0)  # a adopts b's
        a.take_control()

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


def ipv4(n: int, size: int = 1400) -> bytes:
    """An IPv4-looking packet (what the engine checks: first nibble, length)."""
    return bytes([0x45]) + n.to_bytes(4, "big") + bytes(size - 5)
