"""The TUN device: opened here, configured through pyroute2.

pyroute2 can create TUN devices but closes the fd and leaves them persistent,
so /dev/net/tun is opened here (Documentation/networking/tuntap.rst). The device
is not made persistent: it disappears when the last fd closes, which is when this
process exits, however it exits.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from pyroute2 import IPRoute

from .config import IPInterface
from .errors import SetupError

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
# <linux/if_addr.h>: a TUN has no link-layer neighbours to detect duplicates on.
IFA_F_NODAD = 0x02


class TunDevice:
    def __init__(self, name: str) -> None:
        if len(name.encode()) >= IFNAMSIZ:
            raise SetupError(f"device name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SetupError("/dev/net/tun is missing (is the tun module loaded?)") from None
        except PermissionError:
            raise SetupError("needs root or CAP_NET_ADMIN to create a TUN device") from None
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
        try:
            ifr = fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError as e:
            os.close(self.fd)
            if e.errno == errno.EPERM:
                raise SetupError("needs root or CAP_NET_ADMIN to create a TUN device") from None
            raise SetupError(f"cannot create TUN device {name!r}: {e.strerror}") from None
        self.name = ifr[:IFNAMSIZ].rstrip(b"\0").decode()

    def configure(self, addresses: tuple[IPInterface, ...], mtu: int) -> None:
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.name)[0]
            try:
                ipr.link("set", index=index, mtu=mtu)
                for a in addresses:
                    ipr.addr("add", index=index, address=str(a.ip),
                             prefixlen=a.network.prefixlen,
                             **({"flags": IFA_F_NODAD} if a.version == 6 else {}))
                ipr.link("set", index=index, state="up")
            except Exception as e:  # pyroute2 raises NetlinkError, an OSError subclass or not
                raise SetupError(f"cannot configure {self.name}: {e}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
