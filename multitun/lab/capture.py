"""Frames seen on an interface of a bed, captured with an AF_PACKET socket
(packet(7)): what an eavesdropper on a path sees, with no tcpdump needed."""

from __future__ import annotations

import select
import socket
import struct
import threading

from pyroute2 import netns

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_HEADER = 14


class Capture:
    """``with Capture(ns, ifname) as cap:`` every frame on the interface, both
    directions, in ``cap.frames`` once the ``with`` ends."""

    def __init__(self, ns: str, ifname: str) -> None:
        self.ns, self.ifname = ns, ifname
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Capture:
        # The socket belongs to the namespace it was made in.
        self._sock = netns.create_socket(self.ns, socket.AF_PACKET, socket.SOCK_RAW,
                                         socket.htons(ETH_P_ALL))
        self._sock.bind((self.ifname, 0))
        self._sock.setblocking(False)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        while not self._stop.is_set():
            if select.select([self._sock], [], [], 0.05)[0]:
                try:
                    while True:
                        self.frames.append(self._sock.recv(65536))
                except BlockingIOError:
                    pass

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sock.close()

    def udp_payloads(self, dst: str, dst_port: int) -> list[bytes]:
        """The payloads of the IPv4 UDP datagrams to dst:dst_port, in order."""
        out = []
        target = socket.inet_aton(dst)
        for f in self.frames:
            if len(f) < ETH_HEADER + 28 or struct.unpack_from("!H", f, 12)[0] != ETH_P_IP:
                continue
            ip = f[ETH_HEADER:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != socket.IPPROTO_UDP or ip[16:20] != target:
                continue
            port, length = struct.unpack_from("!2xHH", ip, ihl)
            if port == dst_port:
                out.append(ip[ihl + 8:ihl + length])
        return out
