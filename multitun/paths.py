"""The UDP sockets that carry the tunnel, one per path.

A client has one socket per path, bound to the path's local address, pinned to
the interface that holds it and connect()ed to the server: the kernel then routes
it out of that interface and drops datagrams from anyone but the server.
A server has one socket on the listening address.
"""

from __future__ import annotations

import errno
import socket

from ._fastpath import SYSTEM
from .config import IPAddress
from .errors import SetupError

# Values Python's socket module lacks, from the headers the data plane was
# compiled against: ip(7) IP_PKTINFO; socket(7) SO_SNDBUFFORCE and
# SO_RCVBUFFORCE (SO_SNDBUF/SO_RCVBUF above net.core.*mem_max, with
# CAP_NET_ADMIN, which a tunnel has); udp(7) UDP_SEGMENT and UDP_GRO.
IP_PKTINFO = SYSTEM["IP_PKTINFO"]
SO_SNDBUFFORCE = SYSTEM["SO_SNDBUFFORCE"]
SO_RCVBUFFORCE = SYSTEM["SO_RCVBUFFORCE"]
UDP_SEGMENT = SYSTEM["UDP_SEGMENT"]
UDP_GRO = SYSTEM["UDP_GRO"]
SOCKET_BUFFER = 4 << 20


def _family(addr: IPAddress) -> int:
    return socket.AF_INET6 if addr.version == 6 else socket.AF_INET


def _size_buffers(sock: socket.socket) -> None:
    # Large buffers absorb bursts (a batch of 64 full packets per path) without
    # drops; the kernel doubles the value it is given (socket(7)).
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def enable_udp_gro(sock: socket.socket) -> bool:
    """Ask for UDP GRO trains on receive (udp(7) UDP_GRO, Linux 5.0); False
    where the kernel has no such option."""
    try:
        sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def kernel_offloads() -> tuple[bool, bool]:
    """Whether the kernel knows UDP_SEGMENT (udp(7), Linux 4.18) and UDP_GRO
    (Linux 5.0). A path whose device cannot take trains is found out at the
    first send, per path."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.getsockopt(socket.SOL_UDP, UDP_SEGMENT)
            gso = True
        except OSError:
            gso = False
        return gso, enable_udp_gro(probe)


def _bind_error(e: OSError, addr: IPAddress, port: int) -> SetupError:
    if e.errno == errno.EADDRINUSE:
        return SetupError(f"UDP port {port} on {addr} is already in use")
    if e.errno == errno.EADDRNOTAVAIL:
        return SetupError(f"address {addr} is not on this host")
    return SetupError(f"cannot bind to {addr} port {port}: {e.strerror}")


def open_server_socket(listen: IPAddress, port: int, gro: bool) -> socket.socket:
    sock = socket.socket(_family(listen), socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        if listen.version == 6:
            # '::' takes IPv4 clients too, as v4-mapped addresses.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if listen.is_unspecified:
            # Learn which of our addresses each client wrote to, so that replies
            # leave from that address (ip(7) IP_PKTINFO, ipv6(7) IPV6_RECVPKTINFO).
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            if listen.version == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        _size_buffers(sock)
        if gro:
            enable_udp_gro(sock)
        sock.bind((str(listen), port))
    except OSError as e:
        sock.close()
        raise _bind_error(e, listen, port) from None
    return sock


def open_client_socket(local: IPAddress, device: str | None, gro: bool) -> socket.socket:
    """A socket bound to a path's local address and pinned to the interface
    that holds it; the caller connects it (connect_client_socket). OSError if
    the address went away in the meantime."""
    sock = socket.socket(_family(local), socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    try:
        _size_buffers(sock)
        sock.bind((str(local), 0))
        if device:
            # Leave by the interface that owns the address even when the main
            # routing table prefers another one (socket(7) SO_BINDTODEVICE).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if gro:
            enable_udp_gro(sock)
    except OSError:
        sock.close()
        raise
    return sock


def connect_client_socket(sock: socket.socket, remote: IPAddress, port: int) -> OSError | None:
    """connect() a path's socket to the server; the error if there is no
    route now (the path is then used unconnected and connected later)."""
    try:
        sock.connect((str(remote), port))
    except OSError as e:
        return e
    return None
