"""The lab: multitun's test beds and the tools that measure across them.

- ``bed``: a client and a server network namespace joined by up to three paths,
  each a veth pair or an emulated link (multitun.lab.emulator), always torn down;
  paths can be plugged in and pulled out while it runs (a modem);
- ``tunnel_pair``: a multitun server and client (or another tunnel) across a bed;
- ``traffic``: ping, UDP streams and floods, one-way latency probes, TCP
  transfers (iperf3 when installed), and percentiles of what they measured;
- ``capture``: the frames on a path, as an eavesdropper sees them;
- ``emulator``: the path emulator the bed runs in its middle namespace;
- ``engine_pair``: two engines on loopback with socketpairs as TUNs (no root).

The test suite, the benchmarks and ``multitun demo`` are built on it.
"""

from .bed import PATH_NETS, Bed, BedPath
from .capture import Capture
from .traffic import (
    Transfer, added_under_stream, latency_probe, percentile, ping, ping_interleaved,
    ping_under_stream, summarise, tcp_throughput, tcp_transfer, udp_flood, udp_stream, wait_udp,
)
from .tunnel_pair import TUN_CLIENT, TUN_CLIENT6, TUN_SERVER, TUN_SERVER6, TunnelPair

__all__ = [
    "PATH_NETS", "Bed", "BedPath", "Capture", "Transfer", "TUN_CLIENT", "TUN_CLIENT6", "TUN_SERVER",
    "TUN_SERVER6", "TunnelPair", "added_under_stream", "latency_probe", "percentile", "ping",
    "ping_interleaved", "ping_under_stream", "summarise", "tcp_throughput", "tcp_transfer",
    "udp_flood", "udp_stream", "wait_udp",
]
