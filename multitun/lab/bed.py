"""A test bed on one host: a client and a server network namespace joined by
N veth pairs, one per path, built with pyroute2 and always torn down.

Addresses are from the documentation ranges (RFC 5737 / RFC 3849) and exist only
inside the namespaces the bed makes:

    path i   client 192.0.2.2 / 198.51.100.2 / 203.0.113.2   (IPv6 2001:db8:i::2)
             server 192.0.2.1 / 198.51.100.1 / 203.0.113.1   (IPv6 2001:db8:i::1)
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyroute2 import IPRoute, netns
from pyroute2.ethtool import Ethtool

from .process import end

if TYPE_CHECKING:  # `python -m multitun.lab.emulator` must not find it imported already
    from .emulator import Impairment

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


def path_of(index: int) -> BedPath:
    """Path ``index``'s interface names and addresses (PATH_NETS)."""
    net = PATH_NETS[index]
    return BedPath(index, f"c{index}", f"s{index}", f"{net}.2", f"{net}.1",
                   f"2001:db8:{index}::2", f"2001:db8:{index}::1")


class Bed:
    """``with Bed(2) as bed:`` two namespaces, ``bed.client`` and ``bed.server``,
    joined by two paths (``bed.paths``).

    ``emulate`` gives, per path, None (a plain veth pair) or the impairments of
    its two directions, (client to server, server to client). Emulated paths run
    through a third namespace, ``bed.mid``, where multitun.lab.emulator bridges them.
    """

    def __init__(self, npaths: int = 2,
                 emulate: list[tuple[Impairment, Impairment] | None] | None = None,
                 seed: int | None = None) -> None:
        if not 1 <= npaths <= len(PATH_NETS):
            raise ValueError(f"a bed has 1..{len(PATH_NETS)} paths")
        self.emulate = list(emulate) if emulate else [None] * npaths
        if len(self.emulate) != npaths:
            raise ValueError("give one emulation (or None) per path")
        tag = f"{os.getpid() % 100000}x{next(_serial)}"
        self.client, self.server = f"mtc{tag}", f"mts{tag}"
        self.mid = f"mtm{tag}" if any(self.emulate) else None
        self.paths = [path_of(i) for i in range(npaths)]
        self.seed = seed
        self.emulator: subprocess.Popen | None = None
        self.emulator_start_ns = 0
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

    def _wire(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        """A veth pair with end ``name_a`` in ``ns_a`` and ``name_b`` in ``ns_b``."""
        tmp_a, tmp_b = f"mt{self._tag}{name_a}", f"mt{self._tag}{name_b}"
        with IPRoute() as ipr:
            ipr.link("add", ifname=tmp_a, kind="veth", peer=tmp_b)
            ipr.link("set", index=ipr.link_lookup(ifname=tmp_a)[0], net_ns_fd=ns_a)
            ipr.link("set", index=ipr.link_lookup(ifname=tmp_b)[0], net_ns_fd=ns_b)
        for ns, tmp, name in ((ns_a, tmp_a, name_a), (ns_b, tmp_b, name_b)):
            with IPRoute(netns=ns) as ipr:
                index = ipr.link_lookup(ifname=tmp)[0]
                ipr.link("set", index=index, ifname=name, state="up")

    def _build(self) -> None:
        for ns in filter(None, (self.client, self.server, self.mid)):
            netns.create(ns)
            self._made.append(ns)
            with IPRoute(netns=ns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        links = []
        for p, emulation in zip(self.paths, self.emulate):
            if emulation is None:
                self._wire(self.client, p.client_if, self.server, p.server_if)
                continue
            # client c<i> - a<i> [emulator] b<i> - s<i> server
            a, b = f"a{p.index}", f"b{p.index}"
            self._wire(self.client, p.client_if, self.mid, a)
            self._wire(self.mid, b, self.server, p.server_if)
            for ns, ifname in ((self.client, p.client_if), (self.mid, a),
                               (self.mid, b), (self.server, p.server_if)):
                _wire_sized_frames(ns, ifname)
            links.append({"a": a, "b": b, "ab": emulation[0].to_json(),
                          "ba": emulation[1].to_json()})
        for p in self.paths:
            self._address(p)
        if links:
            config = json.dumps({"seed": self.seed, "links": links})
            self.emulator = self.popen(self.mid, [sys.executable, "-m", "multitun.lab.emulator",
                                                  config], stdout=subprocess.PIPE,
                                       cwd=PACKAGE_ROOT)
            ready = json.loads(self.emulator.stdout.readline() or "{}")
            if not ready.get("ready"):
                raise RuntimeError("the path emulator did not start")
            self.emulator_start_ns = ready["start_ns"]

    def _address(self, p: BedPath, client_ip: str | None = None) -> None:
        for ns, side in ((self.client, "client"), (self.server, "server")):
            with IPRoute(netns=ns) as ipr:
                index = ipr.link_lookup(ifname=getattr(p, f"{side}_if"))[0]
                address = client_ip if side == "client" and client_ip else getattr(p, f"{side}_ip")
                ipr.addr("add", index=index, address=address, prefixlen=24)
                ipr.addr("add", index=index, address=getattr(p, f"{side}_ip6"),
                         prefixlen=64, flags=0x02)  # IFA_F_NODAD: usable at once

    def plug(self, index: int, client_ip: str | None = None) -> BedPath:
        """A veth path joined while the bed runs (a modem plugged in), with
        path ``index``'s names and addresses, the client's IPv4 one
        ``client_ip`` if given."""
        p = path_of(index)
        self._wire(self.client, p.client_if, self.server, p.server_if)
        self._address(p, client_ip)
        return p

    def unplug(self, index: int) -> None:
        """Delete path ``index``'s veth pair (a modem pulled out): both ends go."""
        with IPRoute(netns=self.client) as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname=path_of(index).client_if)[0])

    def close(self) -> None:
        """Remove the namespaces (their veths go with them) and whatever ran there."""
        if self.emulator is not None:
            end(self.emulator, signal.SIGTERM)
            self.emulator.stdout.close()
            self.emulator = None
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

    def multitun(self, ns: str, args: list[str], python: str | None = None,
                 **kw: object) -> subprocess.Popen:
        """Start ``python -m multitun ARGS`` in ``ns``: this process's multitun,
        or the one installed for another ``python`` (run from /, so that no
        source tree shadows it)."""
        return self.popen(ns, [python or sys.executable, "-m", "multitun", *args],
                          cwd="/" if python else PACKAGE_ROOT, **kw)

    def set_link(self, ns: str, ifname: str, up: bool) -> None:
        with IPRoute(netns=ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0],
                     state="up" if up else "down")

    def link_stats(self, ns: str, ifname: str) -> dict:
        with IPRoute(netns=ns) as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
            return dict(link.get("IFLA_STATS64"))

    def add_outsider(self) -> tuple[str, str, str]:
        """A third namespace with a link of its own to the server, as a host
        elsewhere on the Internet: (namespace, its address, the server's
        address on that link), from RFC 6598's shared space."""
        ns = f"mto{self._tag}"
        netns.create(ns)
        self._made.append(ns)
        self._wire(ns, "o0", self.server, "x0")
        outsider, server = "100.64.0.2", "100.64.0.1"
        for name, ifname, addr in ((ns, "o0", outsider), (self.server, "x0", server)):
            with IPRoute(netns=name) as ipr:
                ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=addr,
                         prefixlen=24)
        return ns, outsider, server

    def client_endpoints(self, v6: bool = False) -> str:
        """The -c argument for every path of the bed."""
        if v6:
            return ",".join(f"[{p.client_ip6}]:[{p.server_ip6}]" for p in self.paths)
        return ",".join(f"{p.client_ip}:{p.server_ip}" for p in self.paths)


# The directory that holds the multitun package this process imported (site-
# packages, or a source tree). Processes the lab starts run there: `python -m`
# puts the working directory first on sys.path, so they import the same package
# whatever the caller's own working directory holds.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _wire_sized_frames(ns: str, ifname: str) -> None:
    """Turn off segmentation and receive offloads (ethtool -K) so that every
    frame the emulator sees is one packet on the wire (loss, rate and delay
    then apply per packet, as on a real link), and checksum offload, so that
    checksums are filled in before the emulator copies the frame (a veth
    otherwise leaves them to the receiving end, CHECKSUM_PARTIAL)."""
    netns.pushns(ns)
    try:
        ethtool = Ethtool()
        try:
            features = ethtool.get_features(ifname)
            for name, feature in features.features.items():
                if ("segmentation" in name or "receive-offload" in name
                        or name.startswith("tx-checksum")):
                    feature.enable = False
            ethtool.set_features(ifname, features)
        finally:
            ethtool.close()
    finally:
        netns.popns()
