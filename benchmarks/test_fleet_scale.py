"""A fleet at scale: one multitun server with a hundred peers, each client
with its own key and its own addresses on two paths (client engines in this
process, multitun/lab/fleet.py's LightClients), in one run:

    python3 -m pytest benchmarks/test_fleet_scale.py -s

- the time until every client carries traffic, from a cold start;
- the server's memory per peer: its resident set with one peer carrying,
  then with all of them (the other peers added by SIGHUP);
- the server's CPU per packet (from /proc/PID/stat, less what it spends
  idle on probes and status), from the peers and to them: with one peer;
  with a hundred, the traffic one peer's; with a hundred, the traffic
  spread over all of them (the last two alternating), in the same batches.
"""

import os
import socket
import statistics
import time

from multitun import config
from multitun.lab import TUN_SERVER
from multitun.lab.engine_pair import udp4
from multitun.lab.fleet import Fleet, FleetBed, LightClients, client_tun
from multitun.keyfile import load_key
from multitun.paths import SO_RCVBUFFORCE

from .conftest import requires_root

pytestmark = requires_root

PEERS = 100
PORT = 9200
BATCH = 16  # packets handed to a client's TUN at a time (each direction)
ROUNDS = 3
PACKETS = 60_000  # per direction, per round
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system time of a process, all its threads (proc(5))."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError("no VmRSS")


class Receiver:
    """Datagrams to the server's tunnel address, counted per source."""

    def __init__(self, bed):
        self.sock = bed.socket(bed.server)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self.sock.bind((TUN_SERVER, PORT))
        self.sock.setblocking(False)
        self.sources, self.count = set(), 0

    def drain(self):
        while True:
            try:
                _, (host, _) = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            self.sources.add(host)
            self.count += 1


def test_a_hundred_clients(tmp_path):
    assert PEERS <= config.MAX_PEERS
    with FleetBed(1) as bed:
        # Light clients answer probes only when their turn comes, tens of
        # milliseconds late: a queue target that such lateness never
        # exceeds keeps the server from pacing their paths.
        fleet = Fleet(bed, tmp_path, npeers=PEERS, clients=False,
                      server_extra=("--queue-target", "1000"))
        fleet.write_peers({0: fleet.keys[0]})  # one peer first, for the memory it takes
        with fleet:
            run(bed, fleet)


def run(bed, fleet):
    """The figures, from a fleet server that has one peer at first."""
    pid = fleet.server.pid
    fleet.wait_log("server", "a fleet of 1 peers")
    locals_ = bed.aliases(PEERS)
    paths = [(locals_[i], bed.server_ip(0, i)) for i in range(bed.npaths)]
    keys = [load_key(k) for k in fleet.keys]
    rx = Receiver(bed)
    clients = LightClients(bed, bed.clients[0])
    clients.add(keys[0], [(local[0], server) for local, server in paths])
    carry_until(clients, rx, [0], 10)
    rss_one = rss_kib(pid)
    with bed.socket(bed.server) as tx:
        alone = costs(clients, rx, tx, pid, [(0,)] * ROUNDS)

        fleet.write_peers(dict(enumerate(fleet.keys)))
        fleet.reload()
        fleet.wait_log("server", f"{PEERS - 1} added")
        start = time.monotonic()
        for k in range(1, PEERS):
            clients.add(keys[k], [(local[k], server) for local, server in paths])
        carry_until(clients, rx, range(PEERS), 60)
        all_carry_s = time.monotonic() - start
        clients.pump(1.0)
        rss_all = rss_kib(pid)
        one, spread = costs(clients, rx, tx, pid, [(0,), tuple(range(PEERS))] * ROUNDS)

    per_peer = (rss_all - rss_one) / (PEERS - 1)
    print(f"\n{PEERS} peers: all carrying {all_carry_s:.2f}s after a cold start; server "
          f"memory {rss_one / 1024:.1f} MiB with 1 peer, {rss_all / 1024:.1f} MiB with "
          f"{PEERS}: {per_peer:.0f} KiB per peer")
    print("  server CPU per packet (us), medians of "
          f"{ROUNDS} rounds: from the peers / to the peers")
    rows = {"1 peer": alone[0], f"{PEERS} peers, one's traffic": one,
            f"{PEERS} peers, all's traffic": spread}
    for name, (inbound_us, outbound_us) in rows.items():
        print(f"  {name:>26}: {inbound_us:.2f} / {outbound_us:.2f}")
    lookup = [one[i] / alone[0][i] for i in range(2)]
    spreading = [spread[i] / one[i] for i in range(2)]
    print(f"  {PEERS} peers against 1, the same traffic: {lookup[0]:.3f} / {lookup[1]:.3f}; "
          f"spread over all against one's: {spreading[0]:.3f} / {spreading[1]:.3f}")
    assert all_carry_s < 30
    assert per_peer < 1024  # KiB
    # Lookups by hash, no scans: what a packet costs does not grow with the
    # peers (within this machine's noise). Traffic spread over many peers
    # goes in shorter trains (one per peer in a batch), which costs a little.
    assert max(lookup) < 1.3 and max(spreading) < 1.6


def costs(clients, rx, tx, pid, turns):
    """Server CPU per packet (us), medians per kind of turn: ``turns`` are
    the peers the traffic goes to and from, one turn each way in turn. The
    server's own CPU while idle (probes, publishing) is taken out."""
    idle = idle_rate(clients, pid)
    kinds: dict[tuple, list] = {}
    for peers in turns:
        kinds.setdefault(peers, []).append((inbound(clients, rx, pid, peers, idle),
                                            outbound(clients, tx, pid, peers, idle)))
    return [tuple(statistics.median(r[i] for r in runs) for i in range(2))
            for runs in kinds.values()]


def idle_rate(clients, pid, seconds=2.0):
    """The server's CPU seconds per second with no traffic but the probes."""
    start, before = time.monotonic(), cpu_s(pid)
    while time.monotonic() - start < seconds:
        clients.keep_up()
        time.sleep(0.005)
    return (cpu_s(pid) - before) / (time.monotonic() - start)


def carry_until(clients, rx, ks, timeout):
    """Pump until the server has a datagram from each client in ``ks``."""
    want = {client_tun(k) for k in ks}
    deadline = time.monotonic() + timeout
    while not want <= rx.sources:
        assert time.monotonic() < deadline, f"not carrying: {sorted(want - rx.sources)}"
        for k, ready in zip(ks, clients.carrying()):
            if ready and client_tun(k) not in rx.sources:
                clients.send(k, udp4(PORT, PORT, 100, src=client_tun(k), dst=TUN_SERVER))
        clients.pump()
        rx.drain()


def settle(pump, count):
    """Pump until ``count()`` stays the same for 0.1 s: what was in flight
    has arrived."""
    last = None
    while (now := count()) != last:
        last = now
        end = time.monotonic() + 0.1
        while time.monotonic() < end:
            pump()


def inbound(clients, rx, pid, peers, idle):
    """Server CPU per packet (us), less ``idle`` CPU per second, for
    PACKETS packets from ``peers`` in turn, BATCH at a time."""
    packets = {k: udp4(PORT, PORT, 200, src=client_tun(k), dst=TUN_SERVER) for k in peers}
    before_count, before, start = rx.count, cpu_s(pid), time.monotonic()
    for n in range(PACKETS // BATCH):
        k = peers[n % len(peers)]
        for _ in range(BATCH):
            clients.send(k, packets[k])
        clients.pump_one(k)
        rx.drain()
        clients.keep_up()
    settle(rx.drain, lambda: rx.count)
    cpu = cpu_s(pid) - before - idle * (time.monotonic() - start)
    delivered = rx.count - before_count
    assert delivered >= 0.99 * (PACKETS // BATCH) * BATCH, delivered
    return cpu / delivered * 1e6


def outbound(clients, tx, pid, peers, idle):
    """Server CPU per packet (us), less ``idle`` CPU per second, for
    PACKETS datagrams sent from the server's namespace to ``peers`` in
    turn, BATCH at a time."""
    payload = bytes(172)
    received = sum(c.received for c in clients.clients)
    # This process may send faster than the server's engine takes packets
    # from its TUN device, and the kernel drops what does not fit there:
    # what the engine read (the device's tx_packets: tun_put_user() counts
    # what is read) must reach the clients.
    read = tun_read(clients.bed)
    before, start = cpu_s(pid), time.monotonic()
    for n in range(PACKETS // BATCH):
        k = peers[n % len(peers)]
        for _ in range(BATCH):
            tx.sendto(payload, (client_tun(k), PORT))
        clients.pump_one(k)
        clients.keep_up()
    settle(lambda: [clients.pump_one(k) for k in peers],
           lambda: sum(c.received for c in clients.clients))
    cpu = cpu_s(pid) - before - idle * (time.monotonic() - start)
    got = sum(c.received for c in clients.clients) - received
    read = tun_read(clients.bed) - read
    assert got >= 0.999 * read and read >= PACKETS // 2, (got, read)
    return cpu / got * 1e6


def tun_read(bed) -> int:
    return bed.link_stats(bed.server, "multitun0")["tx_packets"]


