"""Traffic across a bed, measured: ping, UDP streams and floods, one-way
latency probes, TCP transfers."""

from __future__ import annotations

import hashlib
import json
import math
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyroute2 import netns

from ..paths import SO_RCVBUFFORCE
from .bed import Bed, _serial
from .process import end

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


def internet_checksum(data: bytes) -> int:
    """RFC 1071's: of an IPv4 header, or an ICMP message."""
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
        packet = struct.pack("!BBH", request_type, 0, internet_checksum(packet)) + body
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
        # The reader must never be what drops.
        rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)

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
                  sent_ns: list[int] | None = None) -> dict[str, list[float | None]]:
    """Timestamped datagrams from the client namespace to the server namespace,
    to every target at once (so all see the same conditions), ``rate`` per
    second each, for ``duration`` seconds.

    ``targets`` maps a name to (source address, destination address): a bare
    path is its two ends, the tunnel its two TUN addresses. Returns, per name,
    the one-way delay in ms of datagram i, or None if it never came. Both
    namespaces read the same CLOCK_MONOTONIC, so one-way delay is exact.
    ``progress`` is called about once a second with the results so far;
    ``sent_ns``, if given, gets the CLOCK_MONOTONIC time each datagram left at.
    """
    count = int(rate * duration)
    results = {name: [None] * count for name in targets}
    header = struct.Struct("!IQ")
    receivers, senders = {}, {}
    try:
        for name, (src, dst) in targets.items():
            rx = bed.socket(bed.server, _family(dst))
            rx.bind((dst, port))
            rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
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
            now_ns = time.monotonic_ns()
            if sent_ns is not None:
                sent_ns.append(now_ns)
            for tx, dst in senders.values():
                try:
                    tx.sendto(header.pack(seq, now_ns).ljust(64, b"."), dst)
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
from multitun.paths import SO_RCVBUFFORCE
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
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
        end(rx, signal.SIGTERM)
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
        end(server, signal.SIGTERM)
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


def ping_under_stream(bed: Bed, src_ns: str, dst_ns: str, stream_dst: str, dsts: list[str],
                      count: int = 1000, interval: float = 0.002,
                      ) -> tuple[dict[str, list[float | None]], Transfer]:
    """ping_interleaved to ``dsts`` while one TCP stream from ``src_ns`` to
    ``stream_dst`` fills what it crosses: the round trips, and the stream.
    The stream starts 0.5 s before the pings (past slow start) and lasts
    until they end."""
    seconds = 1.0 + count * interval * 2
    stream: list[Transfer] = []
    load = threading.Thread(target=lambda: stream.append(
        tcp_transfer(bed, src_ns, dst_ns, stream_dst, seconds=seconds)))
    load.start()
    time.sleep(0.5)
    rtts = ping_interleaved(bed, src_ns, dsts, count=count, interval=interval)
    load.join()
    return rtts, stream[0]


def added_under_stream(bed: Bed, bare: str, tunnel: str) -> dict[str, float]:
    """ping_under_stream from the client to the server's address on a bare
    path and to its address in the tunnel, the stream filling the tunnel:
    what the tunnel adds to the median and to the 99th percentile (us), the
    stream's rate and the tunnel's pings lost (%)."""
    rtts, stream = ping_under_stream(bed, bed.client, bed.server, tunnel, [bare, tunnel])
    through = [r for r in rtts[tunnel] if r is not None]
    direct = [r for r in rtts[bare] if r is not None]
    if not through or not direct:
        raise RuntimeError(f"no ping answered under the stream: {len(direct)} bare, "
                           f"{len(through)} through the tunnel")
    return {"added_us": round((statistics.median(through) - statistics.median(direct)) * 1e6, 1),
            "p99_added_us": round((percentile(through, 99) - percentile(direct, 99)) * 1e6, 1),
            "stream_gbit_s": round(stream.gbit_per_s, 2),
            "ping_loss_pct": round(100 * (1 - len(through) / len(rtts[tunnel])), 2)}
