"""What the tunnel asks of the host around it: CPU wake-up latency, file
descriptors for a fleet, and systemd's readiness protocol."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import sys
from collections.abc import Iterator

from .errors import SetupError

log = logging.getLogger("multitun")


def fds_for(peers: int) -> None:
    """Room for a fleet's file descriptors: each peer whose paths are paced
    has a timer of its own. The soft limit goes up to the hard one
    (getrlimit(2)), as servers of many clients do; systemd's default soft
    limit is 1024, its hard one far above."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if peers and soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def cpu_latency_qos() -> Iterator[None]:
    """Hold a PM QoS request for zero CPU wake-up latency while open
    (Documentation/power/pm_qos_interface.rst): idle CPUs poll instead of
    halting, so waking the engine costs no inter-processor interrupt."""
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise SetupError(f"--low-latency: cannot open /dev/cpu_dma_latency: {e.strerror}") from None
    try:
        os.write(fd, (0).to_bytes(4, sys.byteorder))
        log.info("low latency: idle CPUs kept out of sleep states while running")
        yield
    finally:
        os.close(fd)


def notify_systemd(state: str) -> None:
    """Tell systemd (Type=notify) what we are doing: sd_notify(3)'s protocol,
    one datagram to $NOTIFY_SOCKET ('@' starts an abstract name). Not under
    systemd: nothing."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(state.encode(), address)
        except OSError as e:
            log.warning("cannot notify systemd at %s: %s", path, e.strerror)
