"""The TUN device: opened here, configured through pyroute2.

pyroute2 can create TUN devices but closes the fd and leaves them persistent,
so /dev/net/tun is opened here (Documentation/networking/tuntap.rst). The device
is not made persistent: it disappears when the last fd closes, which is when this
process exits, however it exits.

With offloads the device is opened with IFF_VNET_HDR: every read and write
starts with a struct virtio_net_hdr (<linux/virtio_net.h>, 10 bytes). After
TUNSETOFFLOAD (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6, and TUN_F_USO4 |
TUN_F_USO6 on Linux 6.2 and later) the kernel hands over TCP (and UDP) segments
of up to 64 KB with their checksums left to us, which the data plane splits;
and it accepts TCP segments back, which the data plane builds by coalescing
what arrives (drivers/net/tun.c, tun_get_user / tun_put_user).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from pyroute2 import IPRoute

from ._fastpath import SYSTEM
from .config import IPInterface
from .errors import SetupError

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
VNET_HDR_LEN = SYSTEM["VNET_HDR_LEN"]  # what the data plane reads and writes
IFNAMSIZ = 16
# <linux/if_addr.h>: a TUN has no link-layer neighbours to detect duplicates on.
IFA_F_NODAD = 0x02


class TunDevice:
    """``offload``: ask for virtio-net headers and segmentation offloads.
    ``vnet_hdr``, ``tso`` and ``uso`` say what the kernel granted."""

    def __init__(self, name: str, offload: bool = False) -> None:
        if len(name.encode()) >= IFNAMSIZ:
            raise SetupError(f"device name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SetupError("/dev/net/tun is missing (is the tun module loaded?)") from None
        except PermissionError:
            raise SetupError("needs root or CAP_NET_ADMIN to create a TUN device") from None
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), flags)
        try:
            ifr = fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError as e:
            os.close(self.fd)
            if e.errno == errno.EPERM:
                raise SetupError("needs root or CAP_NET_ADMIN to create a TUN device") from None
            raise SetupError(f"cannot create TUN device {name!r}: {e.strerror}") from None
        self.name = ifr[:IFNAMSIZ].rstrip(b"\0").decode()
        self.vnet_hdr = offload
        self.tso = self.uso = False
        if offload:
            self._offload()

    def _offload(self) -> None:
        """TUNSETOFFLOAD, with USO if the kernel knows it (EINVAL before 6.2),
        else TSO alone, else nothing: then reads carry a virtio-net header
        that never announces a segment, and that is all."""
        tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        try:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except OSError:
            return
        for flags in (tso | TUN_F_USO4 | TUN_F_USO6, tso):
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
            except OSError:
                continue
            self.tso, self.uso = True, bool(flags & TUN_F_USO4)
            return

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
