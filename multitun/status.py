"""``multitun status``: ask a running instance how its paths are doing.

Each instance listens on an abstract Unix socket named after its TUN device,
``@multitun/<dev>`` (unix(7)). Abstract names belong to the network namespace,
so instances in different namespaces never collide, and ``multitun status`` run
in a namespace finds the instances of that namespace. Abstract sockets have no
file permissions; the instance checks the caller's credentials (SO_PEERCRED)
and answers only root or its own user.

Any local user can connect, so answering must cost the tunnel nothing: a
thread of its own answers, from the snapshot the tunnel's loop last published
(encoded once per publish), at most ANSWERS_PER_S a second, and gives each
caller ANSWER_TIMEOUT at most. Callers beyond the rate wait in the listen
backlog, or in connect() once it is full.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING

from ._version import __version__
from .counters import PATH_COUNTERS, PEER_COUNTERS, TUNNEL_COUNTERS
from .errors import OneLineParser, SetupError
from .logfields import hostport
from .ratelimit import TokenBucket

if TYPE_CHECKING:
    from ._fastpath import Engine
    from .pathstate import PathStates
    from .peers import Peer, Peers
    from .roles import ClientRole, ServerRole

PREFIX = "multitun/"
REPLY_TIMEOUT = 2.0
ANSWERS_PER_S = 50
ANSWER_BURST = 10
ANSWER_TIMEOUT = 0.5
BACKLOG = 8
DENIED = json.dumps({"error": "permission denied: only root or the instance's owner may ask "
                              "for its status"}).encode()


def address(dev: str) -> bytes:
    return b"\0" + (PREFIX + dev).encode()


def snapshot(role: ClientRole | ServerRole, dev: str, started: float, engine: Engine,
             peers: Peers) -> dict:
    """What `multitun status` and the metrics report, from the engine's
    counters, the paths' states and the keying. One peer: its paths and
    keys at the top level. A fleet server: a list of peers, each with its
    own."""
    stats = engine.stats()
    tunnel = _counters(stats, TUNNEL_COUNTERS)
    paths = {peer.index: engine.paths(peer.index) for peer in peers}
    views = [_peer(role, engine, peer, paths[peer.index]) for peer in peers]
    # Counted per path now; the totals (forgotten paths' too) stay for
    # readers of earlier output.
    for key in ("send_dropped", "gso_fallbacks"):
        tunnel[key] = sum(p[key] for each in paths.values() for p in each)
    out = {
        "version": __version__, "role": role.name, "dev": dev, "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - started, 3),
        "session": f"{stats['session']:08x}",
        "tunnel": tunnel,
    }
    if not peers.fleet:
        view = views[0]
        return {**out, "peer_session": f"{stats['peer_session']:08x}"
                if stats["peer_session"] else None,
                "security": view["security"], "paths": view["paths"]}
    return {**out, "peer_session": None,
            "security": {"keyed": True, "fleet": True, "handshake_unknown_key":
                         peers.unknown_key},
            "paths": [], "peers": views}


def _peer(role: ClientRole | ServerRole, engine: Engine, peer: Peer,
          paths: list[dict]) -> dict:
    by_index = {p["path"]: p for p in paths}
    listed = [_path(i, by_index[i], role, peer.states) for i in role.listed(by_index)]
    up = [p for p in listed if p["state"] == "up"]
    rtts = [p["rtt_ms"] for p in up if p["rtt_ms"] is not None]
    return {
        "name": peer.name, "index": peer.index,
        "allowed_ips": [str(n) for n in peer.spec.allowed_ips] if peer.spec else None,
        "paths_up": len(up),
        "best_rtt_ms": min(rtts) if rtts else None,
        "keys_confirmed_s_ago": None if peer.keys_confirmed_at is None
        else round(time.monotonic() - peer.keys_confirmed_at, 1),
        "tx_bytes": sum(p["tx_bytes"] for p in listed),
        "rx_bytes": sum(p["rx_bytes"] for p in listed),
        **_counters(engine.peer_stats(peer.index), PEER_COUNTERS),
        "security": peer.keying.snapshot() if peer.keying else {"keyed": False},
        "paths": listed,
    }


def _path(i: int, p: dict, role: ClientRole | ServerRole, states: PathStates) -> dict:
    return {
        "name": f"path{i}", "index": i, **role.describe(i),
        "remote": hostport(*p["remote"]) if p["remote"] else None,
        **states[i].health.as_dict(),
        **states[i].capacity.as_dict(),
        "pacing_mbit": None if p["paced_rate"] is None else round(p["paced_rate"] / 1e6, 3),
        "queue_packets": p["queue_packets"],
        "queue_bytes": p["queue_bytes"],
        "queue_wait_ms": round(p["queue_sojourn_ns"] / 1e6, 3),
        **_counters(p, PATH_COUNTERS),
        "last_error": os.strerror(p["last_errno"]) if p["last_errno"] else None,
        "udp_gso": p["udp_gso"],
        "udp_gso_max": p["udp_gso_max"],
    }


def _counters(engine_dict: dict, names: dict) -> dict:
    return {name: engine_dict[name] for name in names}


class StatusServer:
    """The instance's end: bound at once (so that a second instance with the
    same device name fails at start), answering from ``start()`` until
    ``close()`` whatever ``publish()`` last gave it."""

    def __init__(self, dev: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(address(dev))
        except OSError as e:
            self.sock.close()
            if e.errno == errno.EADDRINUSE:
                raise SetupError(f"another multitun instance in this network namespace "
                                 f"reports status as {dev}") from None
            raise
        self.sock.listen(BACKLOG)
        self.owner = os.geteuid()
        self.reply = b""
        self.bucket = TokenBucket(ANSWERS_PER_S, ANSWER_BURST)
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="multitun status", daemon=True)

    def publish(self, snapshot: dict) -> None:
        # Replaced whole: the thread sends either the old bytes or the new.
        self.reply = json.dumps(snapshot).encode()

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        while not self.closing.wait(self.bucket.wait(time.monotonic())):
            self.bucket.take(time.monotonic())
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue  # shut down by close(), or out of fds: tried again at the next token
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        # The whole sendall() gets ANSWER_TIMEOUT: a caller that does not read
        # holds the thread no longer (socket.settimeout, Python 3.5 and later).
        conn.settimeout(ANSWER_TIMEOUT)
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            uid = struct.unpack("3i", creds)[1]
            conn.sendall(self.reply if uid in (0, self.owner) else DENIED)
        except OSError:
            pass  # the caller left, or would not read: its loss alone

    def close(self) -> None:
        self.closing.set()
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept()
        if self.thread.is_alive():
            self.thread.join()
        self.sock.close()


class StatusError(Exception):
    pass


def instances() -> list[str]:
    """Devices of the instances listening in this network namespace."""
    found = []
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            # Path is the 8th field; state 01 (unconnected) marks a listener.
            if len(fields) >= 8 and fields[7].startswith("@" + PREFIX) and fields[5] == "01":
                found.append(fields[7][len(PREFIX) + 1:])
    return sorted(set(found))


def query(dev: str | None = None, sock: socket.socket | None = None) -> dict:
    """The status of the instance with TUN device ``dev`` (or the only one).
    ``sock``: an AF_UNIX stream socket made in another network namespace, to
    ask an instance there (abstract names are looked up in the socket's own)."""
    if dev is None:
        running = instances()
        if not running:
            raise StatusError("no multitun instance is running in this network namespace")
        if len(running) > 1:
            raise StatusError(f"several instances are running ({', '.join(running)}); "
                              f"choose one with --dev")
        dev = running[0]
    busy = f"the instance with device {dev} did not answer within {REPLY_TIMEOUT:g}s (busy)"
    with sock or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(REPLY_TIMEOUT)
        try:
            s.connect(address(dev))
        except TimeoutError:  # its listen backlog is full
            raise StatusError(busy) from None
        except OSError:
            raise StatusError(f"no multitun instance with device {dev} in this "
                              f"network namespace") from None
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise StatusError(busy) from None
    reply = json.loads(b"".join(chunks))
    if "error" in reply:
        raise StatusError(reply["error"])
    return reply


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _rate(mbit: float | None) -> str:
    return "-" if mbit is None else f"{mbit:.2f} Mbit/s"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _state(path: dict) -> str:
    # A client path with no interface or address to use now is waiting for it.
    return "wait" if path.get("link") == "waiting" else path["state"]


def render(st: dict, peer: str | None = None) -> str:
    """The status as tables: one peer's paths, or a fleet server's peers
    (``peer``: one of them in full)."""
    if st.get("peers") is None:
        if peer is not None:
            peer_view(st, peer)  # says why not
        return _render_one(st, st, f"peer {st['peer_session'] or 'not seen yet'}")
    if peer is None:
        return _render_fleet(st)
    view = peer_view(st, peer)
    return _render_one(st, view, f"peer {peer}, allowed {', '.join(view['allowed_ips'])}")


def peer_view(st: dict, peer: str) -> dict:
    """One peer of a fleet server's status."""
    if st.get("peers") is None:
        raise StatusError("--peer: this instance has no [[peer]] tables (one client)")
    view = next((v for v in st["peers"] if v["name"] == peer), None)
    if view is None:
        raise StatusError(f"--peer: no peer {peer!r} (peers: "
                          f"{', '.join(v['name'] for v in st['peers'])})")
    return view


def _render_fleet(st: dict) -> str:
    t = st["tunnel"]
    lines = [
        f"multitun {st['role']} on {st['dev']} (pid {st['pid']}), up {_duration(st['uptime_s'])}, "
        f"{len(st['peers'])} peers",
        "",
        f"{'peer':16} {'paths up':>8} {'best rtt ms':>11} {'keys':>9} {'tx bytes':>14} "
        f"{'rx bytes':>14} {'delivered':>10} {'refused':>8}",
    ]
    for v in st["peers"]:
        keys = "-" if v["keys_confirmed_s_ago"] is None else f"{v['keys_confirmed_s_ago']:.0f}s ago"
        lines.append(
            f"{v['name']:16} {v['paths_up']:>8} {_num(v['best_rtt_ms'], '.3f'):>11} "
            f"{keys:>9} {v['tx_bytes']:>14} {v['rx_bytes']:>14} {v['delivered']:>10} "
            f"{v['source_refused']:>8}")
    lines += [
        "",
        f"tunnel: {t['delivered']} packets delivered, {t['tun_rx_packets']} sent, "
        f"{t['no_route']} to no peer's address; refused: {t['auth_failed']} packets failing "
        f"authentication, {st['security']['handshake_unknown_key']} handshakes with a key no "
        f"peer has",
        "(multitun status --peer NAME shows one peer's paths)",
    ]
    return "\n".join(lines)


def _render_one(st: dict, view: dict, who: str) -> str:
    t = st["tunnel"]
    lines = [
        f"multitun {st['role']} on {st['dev']} (pid {st['pid']}), up {_duration(st['uptime_s'])}, "
        f"session {st['session']}, {who}",
        "",
        f"{'path':6} {'state':5} {'iface':8} {'local':>22} {'remote':>22} {'rtt ms':>8} {'min':>7} "
        f"{'jitter':>7} {'loss%':>6} {'tx pkts':>10} {'rx pkts':>10} {'first':>10} "
        f"{'dups':>10} {'errors':>7} {'dropped':>7}",
    ]
    for p in view["paths"]:
        lines.append(
            f"{p['name']:6} {_state(p):5} {p.get('interface') or '-':8} "
            f"{p['local'] or '-':>22} {p['remote'] or '-':>22} "
            f"{_num(p['rtt_ms'], '.3f'):>8} {_num(p['rtt_min_ms'], '.3f'):>7} "
            f"{_num(p['jitter_ms'], '.3f'):>7} {_num(p['loss_pct'], '.1f'):>6} "
            f"{p['tx_packets']:>10} {p['rx_packets']:>10} {p['first_arrivals']:>10} "
            f"{p['duplicates']:>10} {p['send_errors']:>7} {p['send_dropped']:>7}")
    lines += [
        "",
        f"{'path':6} {'capacity':>12} {'queue ms':>9} {'pacing':>12} {'held':>6} "
        f"{'wait ms':>8} {'aqm drop':>9} {'stale':>9}",
    ]
    for p in view["paths"]:
        lines.append(
            f"{p['name']:6} {_rate(p['capacity_mbit']):>12} {_num(p['queue_delay_ms'], '.1f'):>9} "
            f"{_rate(p['pacing_mbit']):>12} {p['queue_packets']:>6} "
            f"{_num(p['queue_wait_ms'], '.1f'):>8} {p['aqm_dropped']:>9} "
            f"{p['stale_dropped']:>9}")
    # Drops that a healthy tunnel never has are named only when they happen.
    rare = "".join(f", {t[key]} {what}" for key, what in (
        ("truncated", "with truncated control data"), ("control_dropped", "control packets"))
        if t[key])
    lines += [
        "",
        f"tunnel: {t['delivered']} packets delivered ({t['delivered_bytes']} bytes), "
        f"{t['tun_rx_packets']} sent; dropped: {t['duplicates']} duplicates, "
        f"{t['too_old']} too old, {t['malformed']} malformed, {t['wrong_session']} wrong "
        f"session, {t['unknown_source']} unknown source{rare}",
    ]
    sec = view["security"]
    if sec["keyed"]:
        lines.append(
            f"sealed: {sec['cipher'] or 'no cipher agreed yet'} (--cipher "
            f"{sec['cipher_setting']}), keys {sec['key_id'] or 'none yet'}"
            + (f" ({sec['key_age_s']:.0f}s old)" if sec["key_age_s"] is not None else "")
            + f", {sec['handshakes']} handshakes; refused: {t['auth_failed']} packets failing "
            f"authentication, {sec['handshake_auth_failed']} handshakes failing it, "
            f"{sec['handshake_replayed']} replayed, {sec['handshake_rate_limited']} over the "
            f"rate limit")
    else:
        lines.append("in clear: no --key-file (neither authenticated nor encrypted)")
    if t["key_mismatch"]:
        lines.append(f"{t['key_mismatch']} packets from a peer of the other mode "
                     "(a key on one end only)")
    return "\n".join(lines)


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="multitun status",
        description="Show the paths and counters of a multitun instance running in this "
                    "network namespace (needs root or the instance's user).")
    p.add_argument("--dev", metavar="NAME",
                   help="the instance's TUN device (needed when several run here)")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--peer", metavar="NAME",
                   help="a server with [[peer]] tables: show this peer's paths and keys "
                        "(the default lists the peers)")
    p.add_argument("--watch", nargs="?", const=1.0, type=float, metavar="SECONDS",
                   help="refresh every SECONDS (default 1) until Ctrl-C")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        while True:
            st = query(args.dev)
            if args.json:
                out = json.dumps(peer_view(st, args.peer) if args.peer else st, indent=2)
            else:
                out = render(st, args.peer)
            if args.watch:
                print("\033[H\033[2J" + out, flush=True)  # home, clear screen
                time.sleep(args.watch)
            else:
                print(out)
                return 0
    except StatusError as e:
        print(f"multitun status: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
