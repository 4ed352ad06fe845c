"""Paths that follow the kernel's interfaces.

A client path names its local side by address (the original's form), by
interface name, or by a pattern of names (multitun/config.py). What that
means changes as leases renew, modems re-attach and USB modems come and go.
The kernel announces each change on rtnetlink (rtnetlink(7): RTM_NEWLINK,
RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR). ``LinkWatch`` listens through
pyroute2; the engine wakes on its socket as on any other fd, and the client's
role (roles.py) then takes a fresh look at the interfaces and moves its
paths to match. Nothing polls.
"""

from __future__ import annotations

import errno
import fnmatch
import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

from .config import IPAddress, PathSpec

# <linux/if.h>, <linux/if_addr.h>
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
# IFLA_OPERSTATE (Documentation/networking/operstates.rst): a link that can
# carry packets is "UP", or "UNKNOWN" for drivers that do not say (tun, lo).
CARRYING = ("UP", "UNKNOWN")
# RT_SCOPE_LINK: an IPv6 link-local address needs a scope id, never reaches a
# server elsewhere, and is not what a path binds to.
SCOPE_LINK = 253


@dataclass(frozen=True)
class Interface:
    index: int
    name: str
    up: bool
    addresses: tuple[IPAddress, ...]
    loopback: bool = False


@dataclass(frozen=True)
class Binding:
    """What a path is bound to now. ``address`` None: waiting (no such
    interface or address now); ``up`` False: its link is down."""

    interface: str | None = None
    index: int = 0
    address: IPAddress | None = None
    up: bool = False

    @property
    def usable(self) -> bool:
        return self.address is not None and self.up


def interfaces(ipr: IPRoute) -> dict[str, Interface]:
    """Every interface, whether its link carries packets, and the addresses
    a socket can bind to now: not tentative, not failed duplicate detection,
    not deprecated; an IPv6 privacy (temporary) address only after the
    stable ones, so that their rotation does not move the path."""
    addresses: dict[int, list[tuple[bool, IPAddress]]] = {}
    for msg in ipr.get_addr():
        flags = msg.get("IFA_FLAGS", msg["flags"])
        if flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED | IFA_F_DEPRECATED) \
                or msg["scope"] == SCOPE_LINK:
            continue
        text = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if text:
            addresses.setdefault(msg["index"], []).append(
                (bool(flags & IFA_F_TEMPORARY), ipaddress.ip_address(text)))
    out = {}
    for link in ipr.get_links():
        name = link.get("IFLA_IFNAME")
        up = bool(link["flags"] & IFF_UP) and link.get("IFLA_OPERSTATE") in CARRYING
        held = sorted(addresses.get(link["index"], ()), key=lambda a: a[0])  # stable first
        out[name] = Interface(link["index"], name, up, tuple(a for _, a in held),
                              bool(link["flags"] & IFF_LOOPBACK))
    return out


def resolve(spec: PathSpec, found: dict[str, Interface]) -> dict[str | None, Binding]:
    """What ``spec`` stands for now. An address or a name: one binding (key
    None), waiting if nothing holds it. A pattern: one per matching interface,
    keyed by its name (clientpaths.py makes a path of one only once it is up
    with an address of the server's family, and removes it only when the
    interface goes)."""
    if spec.local is not None:
        holder = next((i for i in found.values() if spec.local in i.addresses), None)
        return {None: Binding(holder.name, holder.index, spec.local, holder.up) if holder
                else Binding()}
    if not spec.is_pattern:
        iface = found.get(spec.interface)
        address = _address(iface, spec.remote.version) if iface else None
        return {None: Binding(spec.interface, iface.index, address, iface.up) if iface
                else Binding()}
    return {iface.name: Binding(iface.name, iface.index, _address(iface, spec.remote.version),
                                iface.up)
            for iface in sorted(found.values(), key=lambda i: i.index)
            if fnmatch.fnmatchcase(iface.name, spec.interface)}


def _address(iface: Interface, version: int) -> IPAddress | None:
    # The first the kernel lists: its primary address on that interface.
    return next((a for a in iface.addresses if a.version == version), None)


class LinkWatch:
    """rtnetlink's link and address events, as an fd to wake on.

    The events are only a wake-up: look() dumps the interfaces afresh through
    pyroute2. They arrive on a plain netlink socket of our own, drained
    without blocking: pyroute2's event socket reads in an event loop of its
    own, buffers what we do not take, and stays broken after one ENOBUFS (a
    burst of events overflowing it), which here must only mean "something
    changed" (netlink(7))."""

    def __init__(self, exclude: set[str] = frozenset()) -> None:
        self.exclude = exclude
        self.events = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                    | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.events.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        self.query = IPRoute()

    def fileno(self) -> int:
        return self.events.fileno()

    def changed(self) -> bool:
        """Whether events came since the last call; takes them all, never
        waiting."""
        got = False
        while True:
            try:
                self.events.recv(65536)
            except BlockingIOError:
                return got
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
            got = True

    def look(self) -> dict[str, Interface]:
        """The interfaces a path may use: not loopback, not the ones excluded
        (the tunnel's own TUN device: a path through it would carry the
        tunnel inside itself)."""
        return {name: i for name, i in interfaces(self.query).items()
                if name not in self.exclude and not i.loopback}

    def close(self) -> None:
        self.events.close()
        self.query.close()
