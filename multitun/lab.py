"""A test bed on one host: a client and a server network namespace joined by
N veth pairs, one per path, built with pyroute2 and always torn down.

Addresses are from the documentation ranges (RFC 5737 / RFC 3849) and exist only
inside the namespaces the bed makes:

    path i   client 192.0.2.2 / 198.51.100.2 / 203.0.113.2   (IPv6 2001:db8:i::2)
             server 192.0.2.1 / 198.51.100.1 / 203.0.113.1   (IPv6 2001:db8:i::1)
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

from pyroute2 import IPRoute, netns

PATH_NETS = ("192.0.2", "198.51.100", "203.0.113")
_serial = itertools.count()


@dataclass(frozen=True)
class BedPath:
    index: int
    client_if: str
    server_if: str
    client_ip: str
    server_ip: str
    client_ip6: str
    server_ip6: str


class Bed:
    """``with Bed(2) as bed:`` two namespaces, ``bed.client`` and ``bed.server``,
    joined by two paths (``bed.paths``)."""

    def __init__(self, npaths: int = 2) -> None:
        if not 1 <= npaths <= len(PATH_NETS):
            raise ValueError(f"a bed has 1..{len(PATH_NETS)} paths")
        tag = f"{os.getpid() % 100000}x{next(_serial)}"
        self.client, self.server = f"mtc{tag}", f"mts{tag}"
        self.paths = [
            BedPath(i, f"c{i}", f"s{i}", f"{net}.2", f"{net}.1",
                    f"2001:db8:{i}::2", f"2001:db8:{i}::1")
            for i, net in enumerate(PATH_NETS[:npaths])
        ]
        self._tag = tag
        self._made: list[str] = []

    def __enter__(self) -> Bed:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        for ns in (self.client, self.server):
            netns.create(ns)
            self._made.append(ns)
        with IPRoute() as ipr:
            for p in self.paths:
                # Unique names in the root namespace; renamed once moved.
                a, b = f"mt{self._tag}a{p.index}", f"mt{self._tag}b{p.index}"
                ipr.link("add", ifname=a, kind="veth", peer=b)
                ipr.link("set", index=ipr.link_lookup(ifname=a)[0], net_ns_fd=self.client)
                ipr.link("set", index=ipr.link_lookup(ifname=b)[0], net_ns_fd=self.server)
        for ns, side in ((self.client, "client"), (self.server, "server")):
            with IPRoute(netns=ns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                for p in self.paths:
                    old = f"mt{self._tag}{'a' if side == 'client' else 'b'}{p.index}"
                    new = getattr(p, f"{side}_if")
                    index = ipr.link_lookup(ifname=old)[0]
                    ipr.link("set", index=index, ifname=new)
                    ipr.addr("add", index=index, address=getattr(p, f"{side}_ip"), prefixlen=24)
                    ipr.addr("add", index=index, address=getattr(p, f"{side}_ip6"),
                             prefixlen=64, flags=0x02)  # IFA_F_NODAD: usable at once
                    ipr.link("set", index=index, state="up")

    def close(self) -> None:
        """Remove the namespaces (their veths go with them) and whatever ran there."""
        for ns in self._made:
            for pid in netns.ns_pids().get(ns, ()):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            try:
                netns.remove(ns)
            except OSError:
                pass
        self._made.clear()

    # ------------------------------------------------------------ using it

    def socket(self, ns: str, family: int = socket.AF_INET,
               type: int = socket.SOCK_DGRAM) -> socket.socket:
        """A socket that lives in namespace ``ns`` (sockets keep the namespace
        they were made in)."""
        return netns.create_socket(ns, family, type)

    def command(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, ns: str, argv: list[str], **kw: object) -> subprocess.Popen:
        return subprocess.Popen(self.command(ns, argv), **kw)

    def multitun(self, ns: str, args: list[str], **kw: object) -> subprocess.Popen:
        """Start ``python -m multitun ARGS`` in ``ns``."""
        return self.popen(ns, [sys.executable, "-m", "multitun", *args], **kw)

    def set_link(self, ns: str, ifname: str, up: bool) -> None:
        with IPRoute(netns=ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0],
                     state="up" if up else "down")

    def link_stats(self, ns: str, ifname: str) -> dict:
        with IPRoute(netns=ns) as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
            return dict(link.get("IFLA_STATS64"))

    def client_endpoints(self, v6: bool = False) -> str:
        """The -c argument for every path of the bed."""
        if v6:
            return ",".join(f"[{p.client_ip6}]:[{p.server_ip6}]" for p in self.paths)
        return ",".join(f"{p.client_ip}:{p.server_ip}" for p in self.paths)
