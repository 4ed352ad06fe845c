"""A fleet on one host: a server namespace and several client namespaces,
each client joined to the server by its own veth paths; the server runs
one multitun with a ``[[peer]]`` table per client, each client its own.

Addresses come from RFC 2544's benchmarking range, one /24 per client and
path, and exist only inside the namespaces the bed makes:

    client k, path i   client 198.18.(2k + i).2   server 198.18.(2k + i).1
    inside the tunnel  server 10.42.42.1 and fd42::1,
                       client k 10.42.42.(10 + k) and fd42::(10 + k)
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute, netns

from .. import wire
from ..paths import SO_RCVBUFFORCE, SO_SNDBUFFORCE
from ..keyfile import generate_key
from .bed import Bed
from .process import end, logs, wait_logged
from .tunnel_pair import TUN_SERVER, TUN_SERVER6

PORT = 5678


def client_tun(k: int) -> str:
    return f"10.42.42.{10 + k}"


def client_tun6(k: int) -> str:
    return f"fd42::{10 + k}"


def _path_ips(k: int, i: int) -> tuple[str, str]:
    net = 2 * k + i
    return f"198.{18 + net // 256}.{net % 256}.2", f"198.{18 + net // 256}.{net % 256}.1"


class FleetBed(Bed):
    """``with FleetBed(3) as bed:`` ``bed.server`` and ``bed.clients[k]``,
    client k joined to the server by ``npaths`` veth pairs."""

    def __init__(self, nclients: int, npaths: int = 2) -> None:
        super().__init__(1)
        self.clients = [f"mtf{self._tag}k{k}" for k in range(nclients)]
        self.npaths = npaths

    def _build(self) -> None:
        for ns in (self.server, *self.clients):
            netns.create(ns)
            self._made.append(ns)
            with IPRoute(netns=ns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for k, ns in enumerate(self.clients):
            self.join(k)

    def join(self, k: int) -> None:
        """Client k's paths to the server (veth pairs, addressed)."""
        for i in range(self.npaths):
            self._wire(self.clients[k], f"c{i}", self.server, f"k{k}p{i}")
            client_ip, server_ip = _path_ips(k, i)
            for ns, ifname, addr in ((self.clients[k], f"c{i}", client_ip),
                                     (self.server, f"k{k}p{i}", server_ip)):
                with IPRoute(netns=ns) as ipr:
                    ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=addr,
                             prefixlen=24)

    def aliases(self, count: int) -> list[list[str]]:
        """``count`` addresses on each of client 0's paths, one per light
        client (LightClients): per path, client j's local address. Client 0's
        own comes first."""
        out = []
        for i in range(self.npaths):
            client_ip, _ = _path_ips(0, i)
            net = client_ip.rsplit(".", 1)[0]
            addresses = [f"{net}.{2 + j}" for j in range(count)]
            with IPRoute(netns=self.clients[0]) as ipr:
                index = ipr.link_lookup(ifname=f"c{i}")[0]
                for addr in addresses[1:]:
                    ipr.addr("add", index=index, address=addr, prefixlen=24)
            out.append(addresses)
        return out

    def server_ip(self, k: int, i: int) -> str:
        return _path_ips(k, i)[1]

    def endpoints(self, k: int) -> str:
        """Client k's -c: each of its paths by interface (as a robot names its
        modems), following the interface's address."""
        return ",".join(f"c{i}:{_path_ips(k, i)[1]}" for i in range(self.npaths))

    def move(self, k: int, i: int, host: int) -> str:
        """Client k's path i takes another address in its /24 (a modem that
        re-attached): the new address."""
        old, _ = _path_ips(k, i)
        new = f"{old.rsplit('.', 1)[0]}.{host}"
        with IPRoute(netns=self.clients[k]) as ipr:
            index = ipr.link_lookup(ifname=f"c{i}")[0]
            # The old one first: a primary address takes its subnet's
            # secondaries with it when it goes (promote_secondaries is off).
            ipr.addr("del", index=index, address=old, prefixlen=24)
            ipr.addr("add", index=index, address=new, prefixlen=24)
        return new

    def forwarding(self, on: bool) -> None:
        """IPv4 forwarding in the server's namespace (client to client)."""
        subprocess.run(self.command(self.server, [
            "sh", "-c", f"echo {int(on)} > /proc/sys/net/ipv4/ip_forward"]), check=True)


class Fleet:
    """A multitun server in ``bed.server`` with a peer per client of the bed,
    and the clients; keys in ``directory``, logs there too. The server's
    peers are in its config file (``config``), which ``write_peers`` and
    ``reload`` change."""

    def __init__(self, bed: FleetBed, directory: Path, server_extra: tuple[str, ...] = (),
                 npeers: int | None = None, clients: bool = True) -> None:
        """``npeers`` (default: one per client namespace) peers, each with
        its own key; ``clients``: start a multitun client in each client
        namespace."""
        self.bed, self.dir = bed, Path(directory)
        self.config = self.dir / "server.toml"
        self.keys = [self.key(f"robot{k}") for k in range(npeers or len(bed.clients))]
        self.server_extra, self.with_clients = server_extra, clients
        self.server: subprocess.Popen | None = None
        self.clients: dict[int, subprocess.Popen] = {}
        self._starts = itertools.count()

    def key(self, name: str) -> Path:
        path = self.dir / f"{name}.key"
        path.write_text(generate_key())
        path.chmod(0o600)
        return path

    def write_peers(self, peers: dict[int, Path]) -> None:
        """The server's config: tunnel address, and a [[peer]] per client k
        in ``peers``, with that key file."""
        lines = [f'tun_listen_addr = ["{TUN_SERVER}/24", "{TUN_SERVER6}/64"]',
                 'server_listen_addr = "0.0.0.0"', f"server_port = {PORT}", ""]
        for k, key in sorted(peers.items()):
            lines += ["[[peer]]", f'name = "robot{k}"', f'key_file = "{key}"',
                      f'allowed_ips = ["{client_tun(k)}/32", "{client_tun6(k)}/128"]', ""]
        self.config.write_text("\n".join(lines))

    def __enter__(self) -> Fleet:
        if not self.config.exists():  # a peer per key, unless written before
            self.write_peers(dict(enumerate(self.keys)))
        self.server = self._run(self.bed.server, "server",
                                ["--config", str(self.config), *self.server_extra])
        for k in range(len(self.bed.clients) if self.with_clients else 0):
            self.start_client(k)
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in (*self.clients.values(), self.server):
            if proc is not None and proc.poll() is None:
                end(proc, signal.SIGTERM)

    def _run(self, ns: str, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.dir / f"{name}.{next(self._starts)}.log", "wb") as log:
            return self.bed.multitun(ns, args, stdout=log, stderr=subprocess.STDOUT)

    def start_client(self, k: int, key: Path | None = None) -> None:
        self.clients[k] = self._run(self.bed.clients[k], f"client{k}", [
            "-l", f"{client_tun(k)}/24", "-l", f"{client_tun6(k)}/64", "-c",
            self.bed.endpoints(k), "-p", str(PORT),
            "--key-file", str(key or self.keys[k])])

    def stop_client(self, k: int) -> int:
        return end(self.clients.pop(k), signal.SIGTERM)

    def reload(self) -> None:
        """SIGHUP to the server: it reads its peers again."""
        os.kill(self.server.pid, signal.SIGHUP)

    def logs(self, name: str) -> str:
        return logs(self.dir, name)

    def wait_log(self, name: str, text: str, timeout: float = 5.0) -> str:
        return wait_logged(self.dir, name, text, timeout)


class LightClients:
    """Many fleet clients in this process: each a client engine with its own
    key, its own two path sockets (in namespace ``ns``, from its own
    addresses) and a datagram socketpair for its TUN, handshaking through
    the real client keying (multitun/keying.py) and probing as a multitun
    client does. For scale: a hundred clients cost one process."""

    def __init__(self, bed: Bed, ns: str) -> None:
        self.bed, self.ns = bed, ns
        self.clients: list[_LightClient] = []
        self.probe_seq = 0
        self._probed = self._kept = 0.0

    def add(self, key: bytes, paths: list[tuple[str, str]]) -> None:
        """One more client, with key ``key``; ``paths``: per path, (its local
        address, the server's)."""
        from .._fastpath import Engine
        from ..keying import ClientKeying
        from ..tunnel import new_session
        socks = []
        for local, server in paths:
            s = self.bed.socket(self.ns)
            s.bind((local, 0))
            s.connect((server, PORT))
            s.setblocking(False)
            # A light client runs only when its turn comes: its buffers must
            # hold what arrives meanwhile.
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
            socks.append(s)
        inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (inner, outer):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        engine = Engine(inner.fileno(), [s.fileno() for s in socks], False, new_session(),
                        keyed=True)
        for i, (_, server) in enumerate(paths):
            engine.set_remote(i, socket.inet_aton(server), PORT, True)
        self.clients.append(_LightClient(engine, ClientKeying(engine, key), socks, inner, outer))

    def carrying(self) -> list[bool]:
        return [c.keying.current() is not None for c in self.clients]

    def pump(self, seconds: float = 0.0) -> None:
        """Run every client's engine and keying for ``seconds`` (at least
        one round); probes every 0.1 s."""
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            probe = now - self._probed >= 0.1
            if probe:
                self._probed = now
                self.probe_seq += 1
            for c in self.clients:
                c.engine.run(0)
                for _, path, _, datagram, source, reply_to in c.engine.take_control():
                    if datagram[1] != wire.PacketType.PROBE_REPLY and c.keying.on_control(
                            path, datagram, source, reply_to, now):
                        c.probe(self.probe_seq)
                if probe:
                    c.keying.tick(now)
                    c.probe(self.probe_seq)
                c.drain()
            if time.monotonic() >= end:
                return

    def keep_up(self) -> None:
        """A round of every client at most every 50 ms, whichever is sending:
        each answers the server's probes and probes it, so that the server's
        work besides the packets stays the same."""
        now = time.monotonic()
        if now - self._kept >= 0.05:
            self._kept = now
            self.pump()

    def pump_one(self, k: int) -> None:
        """One round of client k's engine alone (what it has queued goes)."""
        c = self.clients[k]
        c.engine.run(0)
        c.engine.take_control()  # probe replies: not needed between probes
        c.drain()

    def send(self, k: int, packet: bytes) -> None:
        """A packet into client k's TUN (it leaves at the next pump)."""
        self.clients[k].outer.send(packet)

    def close(self) -> None:
        for c in self.clients:
            for s in (*c.socks, c.inner, c.outer):
                s.close()


@dataclass
class _LightClient:
    engine: object
    keying: object
    socks: list
    inner: socket.socket
    outer: socket.socket
    received: int = 0

    def probe(self, seq: int) -> None:
        for p in self.engine.paths():
            if p["active"]:
                self.engine.send_probe(p["path"], seq, time.monotonic_ns())

    def drain(self) -> None:
        """What the server sent to this client's TUN: counted, and gone."""
        while True:
            try:
                self.outer.recv(65536)
            except BlockingIOError:
                return
            self.received += 1
