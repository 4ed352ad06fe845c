"""`multitun status`, metrics and logs: the snapshot, its table and the
status server on their own, then of a real tunnel."""

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from ipaddress import ip_address, ip_interface

import pytest
from prometheus_client.parser import text_string_to_metric_families

from multitun import metrics, status
from multitun.config import Config
from multitun.counters import PATH_COUNTERS, PEER_COUNTERS, TUNNEL_COUNTERS
from multitun.lab import TUN_SERVER, TunnelPair, ping, tcp_transfer
from multitun.pathstate import PathStates
from multitun.peers import Peers
from multitun.roles import ServerRole

from .conftest import requires_root


def netns(test):
    """A test of real tunnels in network namespaces: root only."""
    return requires_root(pytest.mark.netns(test))


SERVER = Config(tun_addresses=(ip_interface("10.42.42.1/24"),), port=5678,
                server_listen=ip_address("0.0.0.0"))


def engine_dicts(**counts):
    """Engine.stats() and Engine.paths() of a server with two paths, the
    second forgotten (tests/test_counters.py holds these keys to a real
    engine's). ``counts``: counter values, ``path0_...`` per path."""
    stats = {k: counts.get(k, 0) for k in TUNNEL_COUNTERS} | {
        "session": 0x1234, "peer_session": 0x5678, "tx_seq": 9, "keyed": False, "key_id": 0,
        "rejected_from": None}
    paths = [{k: counts.get(f"path{i}_{k}", 0) for k in PATH_COUNTERS} | {
        "path": i, "active": i == 0, "udp_gso": True, "udp_gso_max": None,
        "remote": ("192.0.2.2", 40000) if i == 0 else None, "last_errno": 0,
        "last_rx_ns": 0, "paced_rate": None, "queue_packets": 0, "queue_bytes": 0,
        "queue_sojourn_ns": 0} for i in range(2)]
    return stats, paths


class EngineDicts:
    """What an engine hands the snapshot, as given (tests/test_counters.py
    holds these keys to a real engine's)."""

    def __init__(self, stats, paths):
        self._stats, self._paths = stats, paths

    def stats(self):
        return self._stats

    def paths(self, peer=0):
        return self._paths

    def peer_stats(self, peer=0):
        return {k: 0 for k in PEER_COUNTERS} | {"key_id": 0, "key_changes": 0}


def server_snapshot(stats, paths, states=None):
    engine = EngineDicts(stats, paths)
    peers = Peers(SERVER, engine, None)
    if states is not None:
        peers[0].states = states
    return status.snapshot(ServerRole(SERVER), "multitun0", time.monotonic(), engine, peers)


def test_snapshot_has_every_counter():
    st = server_snapshot(*engine_dicts(delivered=5, path0_tx_packets=7))
    assert set(TUNNEL_COUNTERS) <= st["tunnel"].keys()
    assert st["tunnel"]["delivered"] == 5 and st["tunnel"]["truncated"] == 0
    (path,) = st["paths"]  # the forgotten one is no path of the server's
    assert set(PATH_COUNTERS) <= path.keys() and path["tx_packets"] == 7
    assert (path["name"], path["local"], path["remote"], path["state"]) == (
        "path0", "0.0.0.0:5678", "192.0.2.2:40000", "down")
    assert st["role"] == "server" and st["peer_session"] == "00005678"


def test_send_drops_per_path_and_rare_drops_in_the_table():
    stats, paths = engine_dicts(path0_send_dropped=5, path1_send_dropped=2, truncated=3)
    st = server_snapshot(stats, paths)
    assert st["paths"][0]["send_dropped"] == 5
    assert st["tunnel"]["send_dropped"] == 7  # every path's, the forgotten one's too
    lines = status.render(st).splitlines()
    assert lines[2].split()[-2:] == ["errors", "dropped"]
    assert lines[3].startswith("path0") and lines[3].split()[-2:] == ["0", "5"]
    tunnel_line = next(line for line in lines if line.startswith("tunnel: "))
    assert tunnel_line.endswith("unknown source, 3 with truncated control data")
    stats["truncated"], stats["control_dropped"] = 0, 4
    tunnel_line = next(line for line in status.render(server_snapshot(stats, paths)).splitlines()
                       if line.startswith("tunnel: "))
    assert tunnel_line.endswith("unknown source, 4 control packets")


def test_metrics_export_every_counter():
    st = server_snapshot(*engine_dicts(path0_gso_fallbacks=2, truncated=1))
    families = {f.name: f for f in metrics._Collector(lambda: st).collect()}
    assert {f"multitun_path_{k}" for k in PATH_COUNTERS} <= families.keys()
    assert {f"multitun_{k}" for k in TUNNEL_COUNTERS} <= families.keys()
    assert families["multitun_path_gso_fallbacks"].samples[0].value == 2
    assert families["multitun_truncated"].samples[0].value == 1


def test_pacing_and_queues_in_the_table_json_and_metrics():
    ms = 1_000_000
    stats, paths = engine_dicts(path0_stale_dropped=4, path0_aqm_dropped=2)
    paths[0].update(paced_rate=5_500_000, queue_packets=12, queue_bytes=14_400,
                    queue_sojourn_ns=9 * ms)
    states = PathStates(SERVER)
    capacity = states[0].capacity  # two replies: 75 kB in 110 ms, 10 ms of queue
    capacity.sent(1, 0)
    capacity.feedback(1, 60 * ms, 10**9 + 30 * ms, 0, held=False)
    capacity.sent(2, 100 * ms)
    capacity.feedback(2, 80 * ms, 10**9 + 140 * ms, 75_000, held=True)
    st = server_snapshot(stats, paths, states)
    path = st["paths"][0]
    assert path["capacity_mbit"] == pytest.approx(5.455, abs=0.001)
    assert path["queue_delay_ms"] == 10.0
    assert (path["pacing_mbit"], path["queue_packets"], path["queue_wait_ms"]) == (5.5, 12, 9.0)
    row = next(line for line in status.render(st).splitlines()
               if line.startswith("path0") and "Mbit/s" in line)
    assert row.split() == ["path0", "5.46", "Mbit/s", "10.0", "5.50", "Mbit/s", "12", "9.0",
                           "2", "4"]
    families = {f.name: f for f in metrics._Collector(lambda: st).collect()}
    assert families["multitun_path_pacing_bits_per_second"].samples[0].value == 5.5e6
    assert families["multitun_path_queue_delay_seconds"].samples[0].value == pytest.approx(0.01)
    assert families["multitun_path_stale_dropped"].samples[0].value == 4


# A status server of this process, in this process's network namespace.
DEV = f"test{os.getpid()}"


@pytest.fixture
def server():
    s = status.StatusServer(DEV)
    s.publish({"n": 1})
    s.start()
    yield s
    s.close()


def test_answers_what_was_published_until_closed():
    server = status.StatusServer(DEV)
    server.publish({"n": 1})
    server.start()
    assert status.query(DEV) == {"n": 1}
    server.publish({"n": 2})
    assert status.query(DEV) == {"n": 2}
    server.close()
    assert not server.thread.is_alive()
    with pytest.raises(status.StatusError, match="no multitun instance with device"):
        status.query(DEV)


def test_answers_are_rate_limited(server):
    extra = 25
    start = time.monotonic()
    for _ in range(status.ANSWER_BURST + extra):
        status.query(DEV)
    assert time.monotonic() - start > 0.9 * extra / status.ANSWERS_PER_S


def test_a_caller_that_never_reads_holds_up_no_one(server):
    # A reply far larger than a socket's buffer: sending it to a caller that
    # does not read blocks, until ANSWER_TIMEOUT.
    server.publish({"pad": "x" * (4 << 20)})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.connect(status.address(DEV))
        time.sleep(0.05)  # accepted, and the thread is sending to it
        start = time.monotonic()
        assert len(status.query(DEV)["pad"]) == 4 << 20
        assert time.monotonic() - start < 1.0


def run_status(bed, ns, *args):
    proc = subprocess.run(bed.command(ns, [sys.executable, "-m", "multitun", "status", *args]),
                          capture_output=True, text=True, timeout=30)
    return proc


def status_json(bed, ns):
    """The status as of this call. An instance answers with the snapshot it
    last published (every probe interval): the first with a later uptime
    was published after this call."""
    proc = run_status(bed, ns, "--json")
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout)
    while (st := ask(bed, ns, first["dev"]))["uptime_s"] == first["uptime_s"]:
        time.sleep(0.01)
    return st


def ask(bed, ns, dev="multitun0"):
    """Status from the instance with device ``dev`` in namespace ``ns``,
    asked from this process."""
    return status.query(dev, sock=bed.socket(ns, socket.AF_UNIX, socket.SOCK_STREAM))


def wait_states(bed, ns, want, timeout=3.0):
    """Poll status until the paths' states are ``want``; the seconds it took."""
    start = time.monotonic()
    while True:
        st = status_json(bed, ns)
        states = {p["name"]: p["state"] for p in st["paths"]}
        if states == want:
            return time.monotonic() - start, st
        if time.monotonic() - start > timeout:
            raise AssertionError(f"after {timeout}s: {states}, wanted {want}")
        time.sleep(0.1)


@netns
def test_paths_up_down_up_and_counters(tunnel):
    bed = tunnel.bed
    _, st = wait_states(bed, bed.client, {"path0": "up", "path1": "up"})
    for p in st["paths"]:
        assert p["rtt_ms"] > 0 and p["rtt_min_ms"] > 0 and p["loss_pct"] is not None
        assert {"local", "remote", "tx_packets", "rx_packets", "first_arrivals"} <= p.keys()
    before = st
    result = tcp_transfer(bed, bed.server, bed.client, "10.42.42.2", data=os.urandom(4 << 20))
    assert result.received_sha256 == result.sent_sha256
    after = status_json(bed, bed.client)
    for b, a in zip(before["paths"], after["paths"]):
        assert a["rx_packets"] > b["rx_packets"] + 1000
        assert a["tx_packets"] > b["tx_packets"]
    t = after["tunnel"]
    assert t["delivered"] >= before["tunnel"]["delivered"] + 2800  # 4 MiB in 1416-byte segments
    assert sum(p["first_arrivals"] for p in after["paths"]) == t["delivered"]

    bed.set_link(bed.client, "c0", up=False)
    took, _ = wait_states(bed, bed.client, {"path0": "down", "path1": "up"})
    assert took < 3
    bed.set_link(bed.client, "c0", up=True)
    took, _ = wait_states(bed, bed.client, {"path0": "up", "path1": "up"})
    assert took < 3
    log = tunnel.logs("client")
    # The kernel said the link went down: down at once, without waiting for
    # probes to go unanswered (test_probe_timeout_is_down below waits).
    assert "path 0 (192.0.2.2): link down" in log and log.count("path 0 up") == 2
    assert "path 0 down: no probe answered" not in log


@netns
def test_probe_timeout_is_down(tunnel):
    # A path that fails where the kernel cannot see it (here: a firewall on the
    # far end drops it) is down once no probe was answered for --down-after.
    bed = tunnel.bed
    wait_states(bed, bed.client, {"path0": "up", "path1": "up"})
    table = ["add table inet mt", "add chain inet mt input { type filter hook input priority 0; }",
             "add rule inet mt input ip saddr 192.0.2.2 udp dport 5678 drop"]
    for command in table:
        subprocess.run(bed.command(bed.server, ["nft", *command.split()]), check=True)
    took, _ = wait_states(bed, bed.client, {"path0": "down", "path1": "up"})
    assert 0.4 < took < 3
    subprocess.run(bed.command(bed.server, ["nft", "delete", "table", "inet", "mt"]), check=True)
    wait_states(bed, bed.client, {"path0": "up", "path1": "up"})
    tunnel.wait_log("client", "path 0 down: no probe answered")


@netns
def test_server_sees_the_same_paths(tunnel):
    bed = tunnel.bed
    _, st = wait_states(bed, bed.server, {"path0": "up", "path1": "up"})
    assert st["role"] == "server"
    assert [p["remote"].split(":")[0] for p in st["paths"]] == ["192.0.2.2", "198.51.100.2"]


@netns
def test_two_instances_in_two_namespaces_answer_separately(tunnel):
    bed = tunnel.bed
    client, server = status_json(bed, bed.client), status_json(bed, bed.server)
    assert (client["role"], server["role"]) == ("client", "server")
    assert client["pid"] == tunnel.client.pid and server["pid"] == tunnel.server.pid
    assert client["session"] == server["peer_session"]
    assert server["session"] == client["peer_session"]
    assert client["dev"] == server["dev"] == "multitun0"  # same name, no collision


@netns
def test_table(tunnel):
    bed = tunnel.bed
    wait_states(bed, bed.client, {"path0": "up", "path1": "up"})
    proc = run_status(bed, bed.client)
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("multitun client on multitun0")
    assert any(line.startswith("path0  up") for line in lines)
    assert any(line.startswith("tunnel: ") for line in lines)
    assert lines[-1] == "in clear: no --key-file (neither authenticated nor encrypted)"


@netns
def test_no_instance_here_is_a_one_line_error(bed):
    proc = run_status(bed, bed.client)
    assert proc.returncode == 2
    assert proc.stderr == "multitun status: error: no multitun instance is running in this network namespace\n"


@netns
def test_only_root_or_the_owner_may_ask(tunnel):
    # A process of another user in the same namespace is refused.
    path = status.address("multitun0")
    r, w = os.pipe()
    sock = tunnel.bed.socket(tunnel.bed.client, socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # child: become nobody, then ask
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock.connect(path)
            reply = sock.recv(65536)
            os.write(w, reply)
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    reply = json.loads(os.read(r, 65536))
    sock.close()
    os.close(r)
    assert reply == {"error": "permission denied: only root or the instance's owner may ask "
                              "for its status"}


def scrape(bed, ns, hostport):
    """The metric families served at http://HOSTPORT/metrics in namespace ns."""
    fetch = [sys.executable, "-c", "import urllib.request, sys; sys.stdout.write("
             f"urllib.request.urlopen('http://{hostport}/metrics').read().decode())"]
    text = subprocess.run(bed.command(ns, fetch), capture_output=True, text=True,
                          check=True).stdout
    return {f.name: f for f in text_string_to_metric_families(text)}


@netns
def test_metrics_scraped_and_parsed(bed, tmp_path):
    with TunnelPair(bed, tmp_path, client_extra=("--metrics", "127.0.0.1:9105")) as pair:
        pair.wait_carrying()
        tcp_transfer(bed, bed.client, bed.server, TUN_SERVER, data=os.urandom(1 << 20))
        time.sleep(0.5)
        families = scrape(bed, bed.client, "127.0.0.1:9105")
        up = {s.labels["path"]: s.value for s in families["multitun_path_up"].samples}
        assert up == {"path0": 1.0, "path1": 1.0}
        rtts = [s.value for s in families["multitun_path_rtt_seconds"].samples]
        assert len(rtts) == 2 and all(0 < r < 0.1 for r in rtts)
        sent = sum(s.value for s in families["multitun_path_tx_packets"].samples
                   if s.name.endswith("_total"))
        assert sent > 700  # 1 MiB through the tunnel, on two paths
        delivered = families["multitun_delivered"].samples[0].value
        firsts = sum(s.value for s in families["multitun_path_first_arrivals"].samples
                     if s.name.endswith("_total"))
        assert delivered == firsts > 0


@netns
def test_json_log_lines(bed, tmp_path):
    with TunnelPair(bed, tmp_path, server_extra=("--log-format", "json")) as pair:
        pair.wait_carrying()
        pair.wait_log("server", '"event": "path_up"')
    records = [json.loads(line) for line in pair.logs("server").splitlines()]
    events = {r.get("event") for r in records}
    assert {"peer_started", "endpoint_learned", "path_up", "stopped"} <= events
    assert all({"time", "level", "pid", "message"} <= r.keys() for r in records)


# Connects to an instance's status socket as fast as it is let, for at most
# argv[2] seconds or until SIGTERM; prints how many connections it made.
FLOOD = """
import signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit())
address, deadline = b"\\0multitun/" + sys.argv[1].encode(), time.monotonic() + float(sys.argv[2])
connections = 0
print("flooding", flush=True)
try:
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(address)
            connections += 1
finally:
    print(connections, flush=True)
"""


@netns
def test_status_flood_by_another_user_leaves_the_round_trip_alone(tunnel):
    # Any local user can connect to the status socket. Answering used to run
    # on the data plane's thread: connecting in a loop took the round trip
    # through the tunnel from 0.23 ms to 56 ms.
    bed = tunnel.bed
    idle = ping(bed, bed.client, TUN_SERVER, count=200, interval=0.01)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    flooders = [bed.popen(bed.client, [*nobody, sys.executable, "-c", FLOOD, "multitun0", "15"],
                          stdout=subprocess.PIPE, text=True) for _ in range(4)]
    try:
        for f in flooders:
            assert f.stdout.readline() == "flooding\n"
        flooded = ping(bed, bed.client, TUN_SERVER, count=200, interval=0.01)
    finally:
        for f in flooders:
            f.terminate()
    connections = 0
    for f in flooders:
        f.wait(10)
        connections += int(f.stdout.read())
        f.stdout.close()
    assert None not in idle and None not in flooded
    idle_ms, flooded_ms = statistics.mean(idle) * 1e3, statistics.mean(flooded) * 1e3
    print(f"mean round trip: idle {idle_ms:.3f} ms, under the flood {flooded_ms:.3f} ms, "
          f"{connections} connections")
    assert abs(flooded_ms - idle_ms) < 1.0
    # Not vacuous: the flood got through to the instance (answered at
    # ANSWERS_PER_S, the rest waiting) for the whole measurement, 2 s or more.
    assert connections > status.ANSWERS_PER_S
    assert tunnel.client.poll() is None
