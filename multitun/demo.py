"""``multitun demo``: a tunnel on a two-path test bed, shown against the bare path.

It builds two network namespaces joined by two veth paths (multitun.lab), runs
a multitun server and client across them, and measures, side by side: ping
round trips, one TCP stream, and a stream of datagrams while one path is cut.
Everything it makes is removed when it ends, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from .lab import TUN_CLIENT, TUN_SERVER, Bed, TunnelPair, ping_interleaved, tcp_transfer, udp_stream


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="multitun demo",
        description="Run a tunnel over two veth paths between two network namespaces "
                    "and compare it with a bare path. Needs root; leaves nothing behind.")


def main(argv: list[str]) -> int:
    build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("multitun demo: error: needs root or CAP_NET_ADMIN (network namespaces, "
              "TUN devices)", file=sys.stderr)
        return 2
    try:
        return _run()
    except KeyboardInterrupt:  # the bed is gone by now: its with-block ended
        print("interrupted; namespaces removed", file=sys.stderr)
        return 130


def _run() -> int:
    with tempfile.TemporaryDirectory() as logs, Bed(2) as bed, \
            TunnelPair(bed, Path(logs)) as pair:
        bare = bed.paths[0].server_ip
        print(f"namespaces {bed.client} (client) and {bed.server} (server), paths "
              + ", ".join(f"{p.client_ip} -> {p.server_ip}" for p in bed.paths))
        print(f"tunnel {TUN_CLIENT} -> {TUN_SERVER} carrying after {pair.wait_carrying():.2f} s")
        rtts = ping_interleaved(bed, bed.client, [bare, TUN_SERVER], count=500, interval=0.001)
        for name, dst in (("bare path 0", bare), ("tunnel", TUN_SERVER)):
            got = [r for r in rtts[dst] if r is not None]
            print(f"  ping {name:12} median {statistics.median(got) * 1e6:6.0f} us, "
                  f"{len(rtts[dst]) - len(got)} of {len(rtts[dst])} lost")
        for name, dst in (("bare path 0", bare), ("tunnel", TUN_SERVER)):
            t = tcp_transfer(bed, bed.client, bed.server, dst, seconds=2)
            print(f"  TCP  {name:12} {t.gbit_per_s:6.2f} Gbit/s")
        print("  path 0 cut for 1 s during a 500 packet/s stream through the tunnel ...")
        received: list[int] = []
        stream = threading.Thread(target=lambda: received.extend(
            udp_stream(bed, bed.client, bed.server, TUN_SERVER, rate=500, count=1500)))
        stream.start()
        time.sleep(1.0)
        bed.set_link(bed.client, bed.paths[0].client_if, up=False)
        time.sleep(1.0)
        bed.set_link(bed.client, bed.paths[0].client_if, up=True)
        stream.join()
        print(f"  UDP  {len(set(received))} of 1500 datagrams delivered, "
              f"{len(received) - len(set(received))} duplicates")
    print("namespaces removed")
    return 0
