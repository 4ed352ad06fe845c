"""A test bed on one host: a client and a server network namespace joined by
N veth pairs, one per path, built with pyroute2 and always torn down.

Addresses are from the documentation ranges (RFC 5737 / RFC 3849) and exist only
inside the namespaces the bed makes:

    path i   client 192.0.2.2 / 198.51.100.2 / 203.0.113.2   (IPv6 2001:db8:i::2)
             server 192.0.2.1 / 198.51.100.1 / 203.0.113.1   (IPv6 2001:db8:i::1)
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns
from pyroute2.ethtool import Ethtool

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


class Bed:
    """``with Bed(2) as bed:`` two namespaces, ``bed.client`` and ``bed.server``,
    joined by two paths (``bed.paths``).

    ``emulate`` gives, per path, None (a plain veth pair) or the impairments of
    its two directions, (client to server, server to client). Emulated paths run
    through a third namespace, ``bed.mid``, where multitun.emulator bridges them.
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
        self.paths = [
            BedPath(i, f"c{i}", f"s{i}", f"{net}.2", f"{net}.1",
                    f"2001:db8:{i}::2", f"2001:db8:{i}::1")
            for i, net in enumerate(PATH_NETS[:npaths])
        ]
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
        for ns, side in ((self.client, "client"), (self.server, "server")):
            with IPRoute(netns=ns) as ipr:
                for p in self.paths:
                    index = ipr.link_lookup(ifname=getattr(p, f"{side}_if"))[0]
                    ipr.addr("add", index=index, address=getattr(p, f"{side}_ip"), prefixlen=24)
                    ipr.addr("add", index=index, address=getattr(p, f"{side}_ip6"),
                             prefixlen=64, flags=0x02)  # IFA_F_NODAD: usable at once
        if links:
            config = json.dumps({"seed": self.seed, "links": links})
            self.emulator = self.popen(self.mid, [sys.executable, "-m", "multitun.emulator",
                                                  config], stdout=subprocess.PIPE,
                                       env=_same_package_env())
            ready = json.loads(self.emulator.stdout.readline() or "{}")
            if not ready.get("ready"):
                raise RuntimeError("the path emulator did not start")
            self.emulator_start_ns = ready["start_ns"]

    def close(self) -> None:
        """Remove the namespaces (their veths go with them) and whatever ran there."""
        if self.emulator is not None:
            _end(self.emulator, signal.SIGTERM)
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

    def multitun(self, ns: str, args: list[str], **kw: object) -> subprocess.Popen:
        """Start ``python -m multitun ARGS`` in ``ns``."""
        return self.popen(ns, [sys.executable, "-m", "multitun", *args],
                          env=_same_package_env(), **kw)

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


def _same_package_env() -> dict:
    """An environment in which ``python -m multitun...`` runs the very package
    this process imported (installed or a source tree), whatever the cwd."""
    here = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [here, os.environ.get("PYTHONPATH")]))}


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


# ---------------------------------------------------------------- the tunnel

TUN_SERVER, TUN_CLIENT = "10.42.42.1", "10.42.42.2"
TUN_SERVER6, TUN_CLIENT6 = "fd42::1", "fd42::2"


class TunnelPair:
    """A multitun server in ``bed.server`` and a client in ``bed.client``, with
    their logs in ``logdir``. ``stop()`` (or leaving the ``with``) ends both."""

    def __init__(self, bed: Bed, logdir: Path, port: int = 5678,
                 server_extra: tuple[str, ...] = (), client_extra: tuple[str, ...] = (),
                 command: list[str] | None = None) -> None:
        """``command``: run this program instead of multitun, with the original
        C++ tool's flags only (-l, -s, -c, -p), to compare tunnels on one bed."""
        self.bed, self.logdir, self.port, self.command = bed, Path(logdir), port, command
        ipv6 = () if command else ("-l", f"{TUN_SERVER6}/64")
        self.server_args = ["-l", TUN_SERVER, *ipv6, "-s", "0.0.0.0", "-p", str(port),
                            *server_extra]
        ipv6 = () if command else ("-l", f"{TUN_CLIENT6}/64")
        self.client_args = ["-l", TUN_CLIENT, *ipv6, "-c", bed.client_endpoints(),
                            "-p", str(port), *client_extra]
        self.server: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None
        self._starts = itertools.count()

    def __enter__(self) -> TunnelPair:
        self.start_server()
        self.start_client()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, side: str) -> subprocess.Popen:
        ns = self.bed.server if side == "server" else self.bed.client
        args = self.server_args if side == "server" else self.client_args
        log = open(self.logdir / f"{side}.{next(self._starts)}.log", "wb")
        with log:
            if self.command:
                return self.bed.popen(ns, [*self.command, *args], stdout=log,
                                      stderr=subprocess.STDOUT)
            return self.bed.multitun(ns, args, stdout=log, stderr=subprocess.STDOUT)

    def start_server(self) -> None:
        self.server = self._start("server")

    def start_client(self) -> None:
        self.client = self._start("client")

    def stop_server(self, sig: int = signal.SIGTERM) -> int:
        return _end(self.server, sig)

    def stop_client(self, sig: int = signal.SIGTERM) -> int:
        return _end(self.client, sig)

    def stop(self) -> None:
        for proc in (self.client, self.server):
            if proc is not None and proc.poll() is None:
                _end(proc, signal.SIGTERM)

    def logs(self, side: str) -> str:
        return "".join(p.read_text() for p in sorted(self.logdir.glob(f"{side}.*.log")))

    def wait_log(self, side: str, text: str, timeout: float = 5.0) -> str:
        """Wait until ``text`` is in ``side``'s logs; the logs."""
        deadline = time.monotonic() + timeout
        while text not in (logs := self.logs(side)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged by the {side} within {timeout:g}s:\n{logs}")
            time.sleep(0.05)
        return logs

    def wait_carrying(self, timeout: float = 10.0, v6: bool = False) -> float:
        """Seconds until a datagram sent client -> server arrives through the tunnel."""
        return wait_udp(self.bed, self.bed.client, self.bed.server,
                        TUN_SERVER6 if v6 else TUN_SERVER, timeout)


def _end(proc: subprocess.Popen | None, sig: int) -> int:
    if proc is None:
        raise RuntimeError("not started")
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# ------------------------------------------------------------ traffic tools

def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def wait_udp(bed: Bed, src_ns: str, dst_ns: str, dst: str, timeout: float = 10.0) -> float:
    """Send a datagram every 20 ms until one arrives; the seconds that took."""
    fam = _family(dst)
    start = time.monotonic()
    with bed.socket(dst_ns, fam) as rx, bed.socket(src_ns, fam) as tx:
        while True:  # the address appears when the far end has configured its TUN
            try:
                rx.bind((dst, 0))
                break
            except OSError:
                if time.monotonic() - start > timeout:
                    raise
                time.sleep(0.02)
        port = rx.getsockname()[1]
        while time.monotonic() - start < timeout:
            try:
                tx.sendto(b"ready?", (dst, port))
            except OSError:
                pass  # no route yet
            if select.select([rx], [], [], 0.02)[0]:
                rx.recv(64)
                return time.monotonic() - start
    raise TimeoutError(f"nothing reached {dst} within {timeout:g}s")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping(bed: Bed, ns: str, dst: str, count: int = 10, interval: float = 0.01,
         timeout: float = 1.0) -> list[float | None]:
    """ICMP echo from namespace ``ns``: each round trip in seconds, None if lost."""
    return ping_interleaved(bed, ns, [dst], count, interval, timeout)[dst]


def ping_interleaved(bed: Bed, ns: str, dsts: list[str], count: int = 10,
                     interval: float = 0.01, timeout: float = 1.0) -> dict[str, list[float | None]]:
    """ICMP echo to each of ``dsts`` in turn, ``count`` rounds: alternating
    gives every destination the same conditions (CPU idle states, load),
    which is what a comparison of round trips needs."""
    ident = os.getpid() & 0xFFFF
    sockets = {}
    rtts: dict[str, list[float | None]] = {d: [] for d in dsts}
    try:
        for dst in dsts:
            proto = socket.IPPROTO_ICMPV6 if ":" in dst else socket.IPPROTO_ICMP
            sockets[dst] = netns.create_socket(ns, _family(dst), socket.SOCK_RAW, proto)
        for seq in range(count):
            for i, dst in enumerate(dsts):
                # A raw ICMP socket sees every echo reply: a distinct identifier
                # and the source address tell this destination's apart.
                rtts[dst].append(_echo(sockets[dst], dst, (ident + i) & 0xFFFF, seq, timeout))
            time.sleep(interval)
    finally:
        for s in sockets.values():
            s.close()
    return rtts


def _echo(s: socket.socket, dst: str, ident: int, seq: int, timeout: float) -> float | None:
    v6 = ":" in dst
    request_type, reply_type = (128, 129) if v6 else (8, 0)
    body = struct.pack("!HH", ident, seq) + b"multitun-ping".ljust(48, b".")
    packet = struct.pack("!BBH", request_type, 0, 0) + body
    if not v6:  # the kernel fills ICMPv6 checksums itself (RFC 3542)
        packet = struct.pack("!BBH", request_type, 0, _checksum(packet)) + body
    start = time.perf_counter()
    s.sendto(packet, (dst, 0))
    while (left := start + timeout - time.perf_counter()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        reply, source = s.recvfrom(2048)
        icmp = reply if v6 else reply[(reply[0] & 0x0F) * 4:]
        if source[0] == dst and icmp[0] == reply_type and icmp[4:8] == body[:4]:
            return time.perf_counter() - start
    return None


def udp_stream(bed: Bed, src_ns: str, dst_ns: str, dst: str, rate: float, count: int,
               port: int = 9001, quiet: float = 1.5) -> list[int]:
    """Send ``count`` numbered datagrams at ``rate`` per second; the numbers
    received, in arrival order (a number twice is a duplicate delivered)."""
    fam = _family(dst)
    received: list[int] = []
    with bed.socket(dst_ns, fam) as rx, bed.socket(src_ns, fam) as tx:
        rx.bind((dst, port))
        # socket(7) SO_RCVBUFFORCE: the reader must never be what drops.
        rx.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)

        def catch() -> None:
            while select.select([rx], [], [], quiet)[0]:
                received.append(struct.unpack("!I", rx.recv(2048)[:4])[0])

        catcher = threading.Thread(target=catch)
        catcher.start()
        start = time.monotonic()
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            tx.sendto(struct.pack("!I", i).ljust(100, b"."), (dst, port))
        catcher.join()
    return received


def latency_probe(bed: Bed, targets: dict[str, tuple[str, str]], rate: float,
                  duration: float, port: int = 9003,
                  progress: Callable[[dict[str, list[float | None]]], None] | None = None,
                  ) -> dict[str, list[float | None]]:
    """Timestamped datagrams from the client namespace to the server namespace,
    to every target at once (so all see the same conditions), ``rate`` per
    second each, for ``duration`` seconds.

    ``targets`` maps a name to (source address, destination address): a bare
    path is its two ends, the tunnel its two TUN addresses. Returns, per name,
    the one-way delay in ms of datagram i, or None if it never came. Both
    namespaces read the same CLOCK_MONOTONIC, so one-way delay is exact.
    ``progress`` is called about once a second with the results so far.
    """
    count = int(rate * duration)
    results = {name: [None] * count for name in targets}
    header = struct.Struct("!IQ")
    receivers, senders = {}, {}
    try:
        for name, (src, dst) in targets.items():
            rx = bed.socket(bed.server, _family(dst))
            rx.bind((dst, port))
            rx.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # socket(7) SO_RCVBUFFORCE
            receivers[rx] = name
            tx = bed.socket(bed.client, _family(src))
            tx.bind((src, 0))
            senders[name] = (tx, (dst, port))
        stop = threading.Event()

        def receive() -> None:
            while not stop.is_set():
                for rx in select.select(list(receivers), [], [], 0.1)[0]:
                    data = rx.recv(2048)
                    seq, sent = header.unpack_from(data)
                    if seq < count:
                        results[receivers[rx]][seq] = (time.monotonic_ns() - sent) / 1e6

        catcher = threading.Thread(target=receive, daemon=True)
        catcher.start()
        start = time.monotonic()
        next_progress = start + 1
        for seq in range(count):
            delay = start + seq / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for tx, dst in senders.values():
                try:
                    tx.sendto(header.pack(seq, time.monotonic_ns()).ljust(64, b"."), dst)
                except OSError:
                    pass  # a path without a route is a lost datagram
            if progress and time.monotonic() >= next_progress:
                progress(results)
                next_progress += 1
        time.sleep(1.0)  # the last ones may still be on their way
        stop.set()
        catcher.join()
    finally:
        for sock in [*receivers, *(tx for tx, _ in senders.values())]:
            sock.close()
    return results


def percentile(values: list[float], q: float, population: int | None = None) -> float | None:
    """The q-th percentile (0..100), nearest rank, of ``population`` samples of
    which ``values`` are the ones that exist (the others never happened: lost
    datagrams). None when the rank falls among those."""
    n = len(values) if population is None else population
    rank = max(1, math.ceil(round(q / 100 * n, 9)))
    return sorted(values)[rank - 1] if rank <= len(values) else None


PERCENTILES = (50, 90, 99, 99.9)


def summarise(latencies: list[float | None]) -> dict:
    """One target's probe results. ``pN_ms``: N% of the datagrams *sent* arrived
    within this delay, a lost one counting as never arriving (None: more than
    100-N% were lost). ``delivered``: the same percentiles of the datagrams
    that arrived. ``jitter_ms``: mean difference of successive delays."""
    got = [v for v in latencies if v is not None]
    out: dict = {"sent": len(latencies), "received": len(got),
                 "loss_pct": round(100 * (1 - len(got) / len(latencies)), 3) if latencies else None}
    name = {q: f"p{str(q).replace('.', '_')}_ms" for q in PERCENTILES}
    for q in PERCENTILES:
        v = percentile(got, q, len(latencies)) if got else None
        out[name[q]] = None if v is None else round(v, 3)
    out["delivered"] = {name[q]: round(percentile(got, q), 3) for q in PERCENTILES} if got else {}
    out["jitter_ms"] = (round(sum(abs(a - b) for a, b in zip(got, got[1:])) / (len(got) - 1), 3)
                        if len(got) > 1 else None)
    return out


_FLOOD_RECEIVER = """
import select, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
n, first, last = 0, None, None
while select.select([s], [], [], 1.0)[0]:
    while True:
        try:
            s.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        last = time.monotonic()
        first = first or last
        n += 1
print(n, (last - first) if n > 1 else 0, flush=True)
"""

_FLOOD_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst, size, seconds = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3]), float(sys.argv[4])
payload, n, end = bytes(size), 0, time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(1000):
        try:
            s.sendto(payload, dst)
            n += 1
        except OSError:
            pass
print(n, flush=True)
"""


def udp_flood(bed: Bed, src_ns: str, dst_ns: str, dst: str, size: int,
              seconds: float = 3.0, port: int = 9004) -> dict:
    """Datagrams of ``size`` bytes as fast as one sender process can send them;
    packets per second sent and received (each end its own process, so the
    measure is not the GIL's)."""
    rx = bed.popen(dst_ns, [sys.executable, "-c", _FLOOD_RECEIVER, dst, str(port)],
                   stdout=subprocess.PIPE, text=True)
    try:
        if rx.stdout.readline().strip() != "ready":
            raise RuntimeError("flood receiver did not start")
        tx = subprocess.run(bed.command(src_ns, [sys.executable, "-c", _FLOOD_SENDER, dst,
                                                 str(port), str(size), str(seconds)]),
                            capture_output=True, text=True, check=True)
        received, span = rx.stdout.readline().split()
    finally:
        _end(rx, signal.SIGTERM)
        rx.stdout.close()
    sent = int(tx.stdout)
    return {"size": size, "sent": sent, "received": int(received),
            "sent_pps": round(sent / seconds), "received_pps": round(int(received) / seconds)}


def tcp_throughput(bed: Bed, src_ns: str, dst_ns: str, dst: str, seconds: float = 3.0) -> float:
    """Gbit/s of one TCP stream from ``src_ns`` to ``dst``: iperf3 when it is
    installed, the built-in sender and receiver (tcp_transfer) otherwise."""
    if not shutil.which("iperf3"):
        return tcp_transfer(bed, src_ns, dst_ns, dst, seconds=seconds).gbit_per_s
    port = 5201 + next(_serial) % 100
    server = bed.popen(dst_ns, ["iperf3", "--server", "--bind", dst, "--port", str(port)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Wait until it listens; a connection attempt before then would count.
        listening = bed.command(dst_ns, ["ss", "-Hltn", f"sport = :{port}"])
        deadline = time.monotonic() + 5
        while not subprocess.run(listening, capture_output=True, text=True).stdout.strip():
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not start")
            time.sleep(0.02)
        out = subprocess.run(bed.command(src_ns, [
            "iperf3", "--client", dst, "--port", str(port), "--time", str(seconds), "--json"]),
            capture_output=True, text=True)
        result = json.loads(out.stdout or "{}")
        if out.returncode or "error" in result:
            raise RuntimeError(f"iperf3 failed: {result.get('error', out.stderr.strip())}")
    finally:
        _end(server, signal.SIGTERM)
    return result["end"]["sum_received"]["bits_per_second"] / 1e9


@dataclass
class Transfer:
    sent: int
    received: int
    seconds: float
    sent_sha256: str
    received_sha256: str

    @property
    def gbit_per_s(self) -> float:
        return self.received * 8 / self.seconds / 1e9


def tcp_transfer(bed: Bed, src_ns: str, dst_ns: str, dst: str, data: bytes | None = None,
                 seconds: float | None = None, chunk: int = 1 << 20) -> Transfer:
    """Send ``data`` (checked by SHA-256 on both ends) or, for ``seconds``, a
    repeated buffer (throughput only) over TCP from ``src_ns`` to ``dst``."""
    fam = _family(dst)
    listener = bed.socket(dst_ns, fam, socket.SOCK_STREAM)
    listener.bind((dst, 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    got: dict = {}

    def receive() -> None:
        conn, _ = listener.accept()
        digest = hashlib.sha256() if data is not None else None
        buf = bytearray(chunk)
        view = memoryview(buf)
        n = 0
        with conn:
            while k := conn.recv_into(buf):
                n += k
                if digest:
                    digest.update(view[:k])
        got.update(n=n, end=time.perf_counter(), sha=digest.hexdigest() if digest else "")

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    sent_digest = hashlib.sha256()
    with listener, bed.socket(src_ns, fam, socket.SOCK_STREAM) as tx:
        tx.connect((dst, port))
        start = time.perf_counter()
        sent = 0
        if data is not None:
            view = memoryview(data)
            for offset in range(0, len(data), chunk):
                tx.sendall(view[offset:offset + chunk])
            sent = len(data)
            sent_digest.update(data)
        else:
            block = os.urandom(chunk)
            while time.perf_counter() - start < seconds:
                tx.sendall(block)
                sent += len(block)
        tx.shutdown(socket.SHUT_WR)
        thread.join(60)
    if thread.is_alive():
        raise TimeoutError("receiver did not finish")
    return Transfer(sent, got["n"], got["end"] - start,
                    sent_digest.hexdigest() if data is not None else "", got["sha"])
