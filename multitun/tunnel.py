"""One tunnel end: sets up the device and sockets, runs the engine, keeps time.

The compiled engine moves packets; this module does what happens a few times a
second: probes on every path (they are the keepalives that let the server learn
the client's paths before any data and keep NAT mappings open, and they measure
each path's health), forgetting server-side endpoints silent for --timeout,
reconnecting client paths that had no route at start, handing handshakes to
the keying (keying.py) with --key-file, answering `multitun status`, publishing
metrics, and logging what changed. Nothing here runs per packet.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import signal
import socket
import sys
import time

from . import wire
from ._fastpath import WAKE, Engine
from ._version import __version__
from .config import Config
from .device import TunDevice
from .errors import SetupError
from .health import LOST_AFTER_INTERVALS, PathHealth
from .keying import ClientKeying, Keying, ServerKeying
from .metrics import MetricsServer
from .paths import (
    connect_client_socket, enable_udp_gro, open_client_socket, open_server_socket,
    udp_gso_supported,
)
from .status import StatusServer

log = logging.getLogger("multitun")

HOUSEKEEPING_INTERVAL = 1.0
# A path's send errors are summarised at most this often (never one line per packet).
ERROR_SUMMARY_INTERVAL = 5.0


def new_session() -> int:
    """A random non-zero 32-bit session id: a restarted peer is a new session."""
    return secrets.randbelow(0xFFFFFFFF) + 1


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _event(name: str, **fields: object) -> dict:
    """Structured fields for a log line (--log-format json shows them)."""
    return {"event": name, **fields}


class Tunnel:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.stopping = False
        self.started = time.monotonic()
        self.probe_seq = 0
        self.health: dict[int, PathHealth] = {}
        self.published: dict = {}
        self._seen_remote: dict[int, tuple | None] = {}
        self._seen_errors: dict[int, int] = {}
        self._gso_refused: set[int] = set()
        self._seen_sessions = 0
        self._seen_key_changes = 0
        self._seen_rejections = (0, 0, 0)
        self._next_error_summary = 0.0
        self.keying: Keying | None = None

    def stop(self, signum: int = 0, frame: object = None) -> None:
        self.stopping = True

    def run(self) -> int:
        """Run until SIGINT/SIGTERM; 0 on a clean stop."""
        cfg = self.config
        with contextlib.ExitStack() as stack:
            wake_fd = self._install_signals(stack)
            if cfg.low_latency:
                stack.enter_context(cpu_latency_qos())
            device = TunDevice(cfg.dev, offload=cfg.offload)
            stack.callback(device.close)
            self.dev = device.name
            device.configure(cfg.tun_addresses, cfg.effective_mtu)
            self.status = StatusServer(device.name)
            stack.callback(self.status.close)
            if cfg.is_server:
                socks = [open_server_socket(cfg.server_listen, cfg.port)]
            else:
                socks = [open_client_socket(p) for p in cfg.paths]
            for s in socks:
                stack.callback(s.close)
            gso = cfg.offload and all(udp_gso_supported(s) for s in socks)
            gro = cfg.offload and all([enable_udp_gro(s) for s in socks])
            self.engine = Engine(
                device.fd, [s.fileno() for s in socks], cfg.is_server, new_session(),
                (wake_fd, self.status.fileno()), gso=gso,
                busy_poll_us=cfg.effective_busy_poll_us, keyed=cfg.key is not None,
                vnet_hdr=device.vnet_hdr)
            if cfg.key is not None:
                keying = ServerKeying if cfg.is_server else ClientKeying
                self.keying = keying(self.engine, cfg.key)
            self.socks, self._gso, self._wake_fd = socks, gso, wake_fd
            if not cfg.is_server:
                for i in range(len(cfg.paths)):
                    self.health[i] = self._new_health()
                    self._connect(i)
            self.published = self.snapshot()
            if cfg.metrics:
                metrics = MetricsServer(cfg.metrics[0], cfg.metrics[1], lambda: self.published)
                stack.callback(metrics.close)
            self._log_start(gso, gro, device)
            notify_systemd("READY=1")
            self._loop()
            notify_systemd("STOPPING=1")
            self._log_totals()
        return 0

    def _install_signals(self, stack: contextlib.ExitStack) -> int:
        # The engine waits in epoll with the GIL released; set_wakeup_fd makes a
        # signal readable on a pipe the engine watches, so it returns at once.
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        stack.callback(os.close, rfd)
        stack.callback(os.close, wfd)
        for sig in (signal.SIGINT, signal.SIGTERM):
            stack.callback(signal.signal, sig, signal.signal(sig, self.stop))
        stack.callback(signal.set_wakeup_fd, signal.set_wakeup_fd(wfd, warn_on_full_buffer=False))
        return rfd

    def _new_health(self) -> PathHealth:
        interval_ns = int(self.config.probe_interval * 1e9)
        return PathHealth(down_after_ns=int(self.config.effective_down_after * 1e9),
                          lost_after_ns=LOST_AFTER_INTERVALS * interval_ns)

    def _connect(self, i: int, retry: bool = False) -> bool:
        path, port = self.config.paths[i], self.config.port
        err = connect_client_socket(self.socks[i], path, port)
        self.engine.set_remote(i, path.remote.packed, port, err is None)
        if err is not None and not retry:
            log.warning("path %d (%s): %s; sending unconnected, will retry", i, path, err.strerror)
        return err is None

    # --------------------------------------------------------------- logging

    def _log_start(self, gso: bool, gro: bool, device: TunDevice) -> None:
        cfg = self.config
        addrs = ", ".join(str(a) for a in cfg.tun_addresses)
        log.info("multitun %s %s on %s (%s, mtu %d), session %08x", __version__,
                 "server" if cfg.is_server else "client", self.dev, addrs,
                 cfg.effective_mtu, self.engine.session)
        if cfg.is_server:
            log.info("listening on %s", _hostport(str(cfg.server_listen), cfg.port))
        for i, path in enumerate(cfg.paths):
            log.info("path %d: %s port %d", i, path, cfg.port)
        if not cfg.offload:
            log.info("offloads off (--no-offload): datagrams sent and received one by one")
        else:
            log.info("UDP GSO on send: %s; UDP GRO on receive: %s; TUN segmentation "
                     "offload (split here) and TCP coalescing: %s",
                     "on" if gso else "not supported by this kernel",
                     "on" if gro else "not supported by this kernel",
                     "TCP and UDP" if device.uso else "TCP" if device.tso
                     else "not supported by this kernel")
        if cfg.metrics:
            log.info("metrics on http://%s/metrics", _hostport(*cfg.metrics))
        if self.keying:
            log.info("sealed: AES-256-GCM under keys from a Noise_NNpsk0 handshake "
                     "with the key file's key")
        else:
            log.warning("no --key-file: the tunnel is neither authenticated nor encrypted; "
                        "anyone on a path can read it, and anyone who can reach the server "
                        "can inject into it (docs/SECURITY.md)")

    def _log_totals(self) -> None:
        s = self.engine.stats()
        log.info("stopped: %d packets from the TUN in %d batches; %d delivered to it, %d "
                 "duplicates, %d too old, %d malformed, %d wrong session, %d unknown source, "
                 "%d from %d receive batches", s["tun_rx_packets"], s["tun_batches"],
                 s["delivered"], s["duplicates"], s["too_old"], s["malformed"],
                 s["wrong_session"], s["unknown_source"],
                 sum(p["rx_packets"] for p in self.engine.paths()), s["rx_batches"],
                 extra=_event("stopped", **s))

    def _log_events(self) -> None:
        """Say what changed: a peer (re)started, an endpoint learned or moved,
        a path refused UDP GSO, the client confirmed new keys."""
        stats = self.engine.stats()
        if self.config.is_server and stats["key_changes"] != self._seen_key_changes:
            log.log(logging.INFO if self._seen_key_changes == 0 else logging.DEBUG,
                    "client confirmed keys %08x", stats["key_id"],
                    extra=_event("keys_confirmed", key_id=f"{stats['key_id']:08x}"))
            self._seen_key_changes = stats["key_changes"]
        if stats["session_changes"] != self._seen_sessions:
            first = self._seen_sessions == 0
            log.info("peer %s session %08x", "started" if first else "restarted: new",
                     stats["peer_session"],
                     extra=_event("peer_started" if first else "peer_restarted",
                                  session=f"{stats['peer_session']:08x}"))
            self._seen_sessions = stats["session_changes"]
        for p in self.engine.paths():
            i = p["path"]
            if self.config.is_server and p["remote"] and p["remote"] != self._seen_remote.get(i):
                log.info("path %d: peer endpoint %s", i, _hostport(*p["remote"]),
                         extra=_event("endpoint_learned", path=i, remote=_hostport(*p["remote"])))
            self._seen_remote[i] = p["remote"]
            if self._gso and not p["udp_gso"] and i not in self._gso_refused:
                log.warning("path %d: refused a UDP GSO train (%s); sending datagrams one "
                            "by one on it", i, os.strerror(p["last_errno"]),
                            extra=_event("gso_refused", path=i))
                self._gso_refused.add(i)

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        engine, interval = self.engine, self.config.probe_interval
        now = time.monotonic()
        next_probe, next_housekeeping = now, now + HOUSEKEEPING_INTERVAL
        while not self.stopping:
            wait = max(0.0, min(next_probe, next_housekeeping) - time.monotonic())
            flags = engine.run(int(wait * 1000) + 1)
            if flags & WAKE["event"]:
                self._log_events()
            for control in engine.take_control():
                self._on_control(*control)
            if flags & WAKE["fd"]:
                _drain(self._wake_fd)
                self.status.serve(self.snapshot)
            now = time.monotonic()
            if now >= next_probe:
                if self.keying:
                    self.keying.tick(now)
                self._probe()
                if self.config.metrics:  # what the scrape thread reads
                    self.published = self.snapshot()
                next_probe = max(next_probe + interval, now)
            if now >= next_housekeeping:
                self._housekeeping(now)
                next_housekeeping = now + HOUSEKEEPING_INTERVAL

    def _probe(self) -> None:
        engine = self.engine
        self.probe_seq += 1
        now_ns = time.monotonic_ns()
        for i, health in self.health.items():
            if health.tick(now_ns):
                log.warning("path %d down: no probe answered for %.1fs", i,
                            (now_ns - health.last_answer_ns) / 1e9,
                            extra=_event("path_down", path=i))
        for p in engine.paths():
            if p["active"]:
                i = p["path"]
                # ENOKEY: sealed, and no handshake yet; nothing was sent.
                if engine.send_probe(i, self.probe_seq, now_ns) != errno.ENOKEY:
                    self.health.setdefault(i, self._new_health()).sent(self.probe_seq, now_ns)

    def _on_control(self, path: int, rx_ns: int, datagram: bytes, source: tuple | None,
                    reply_to: bytes) -> None:
        ptype = wire.peek_header(datagram).type
        if ptype == wire.PacketType.HANDSHAKE_INIT and isinstance(self.keying, ServerKeying):
            self.keying.on_init(path, datagram, source, reply_to, time.monotonic())
        elif ptype == wire.PacketType.HANDSHAKE_RESPONSE and isinstance(self.keying, ClientKeying):
            if self.keying.on_response(path, datagram, source):
                self._probe()  # the server's first authentic packets under the new keys
        elif ptype == wire.PacketType.PROBE_REPLY and path in self.health:
            self._on_probe_reply(path, rx_ns, datagram)

    def _on_probe_reply(self, path: int, rx_ns: int, datagram: bytes) -> None:
        health = self.health[path]
        timestamp_ns, number = wire.probe_payload(datagram)
        rtt_ns = rx_ns - timestamp_ns
        log.debug("path %d: probe %d answered in %.0f us", path, number, rtt_ns / 1000)
        if health.answered(number, rtt_ns, rx_ns):
            log.info("path %d up: round trip %.3f ms", path, rtt_ns / 1e6,
                     extra=_event("path_up", path=path, rtt_ms=round(rtt_ns / 1e6, 3)))

    def _housekeeping(self, now: float) -> None:
        engine, cfg = self.engine, self.config
        now_ns = time.monotonic_ns()
        summarise = now >= self._next_error_summary
        for p in engine.paths():
            i = p["path"]
            if cfg.is_server and p["active"] and now_ns - p["last_rx_ns"] > cfg.timeout * 1e9:
                engine.forget(i)
                self.health.pop(i, None)
                log.info("path %d: forgot %s after %gs of silence", i, _hostport(*p["remote"]),
                         cfg.timeout, extra=_event("endpoint_forgotten", path=i))
                self._seen_remote[i] = None
            errors = p["send_errors"] - self._seen_errors.get(i, 0)
            if summarise and errors:
                log.warning("path %d: %d send errors in the last %gs (last: %s)", i, errors,
                            ERROR_SUMMARY_INTERVAL, os.strerror(p["last_errno"]),
                            extra=_event("send_errors", path=i, count=errors))
                self._seen_errors[i] = p["send_errors"]
        if summarise:
            self._log_rejections()
            self._next_error_summary = now + ERROR_SUMMARY_INTERVAL
        if not cfg.is_server:
            for i, sock in enumerate(self.socks):
                if not _is_connected(sock) and self._connect(i, retry=True):
                    log.info("path %d (%s): connected", i, cfg.paths[i])

    def _log_rejections(self) -> None:
        """One line per summary interval when packets fail authentication or
        come from a peer of the other mode, naming the last sender."""
        stats = self.engine.stats()
        handshakes = self.keying.rejected if self.keying else None
        counts = (stats["auth_failed"], stats["key_mismatch"],
                  handshakes.auth_failed if handshakes else 0)
        failed, mismatched, refused = (c - seen for c, seen in zip(counts, self._seen_rejections))
        self._seen_rejections = counts
        if failed or refused:
            source = handshakes.last_source if refused else stats["rejected_from"]
            log.warning("authentication failing: %d packets and %d handshakes in the last %gs, "
                        "last from %s (a sender without our key)", failed, refused,
                        ERROR_SUMMARY_INTERVAL, _hostport(*source) if source else "?",
                        extra=_event("auth_failed", packets=failed, handshakes=refused,
                                     source=_hostport(*source) if source else None))
        if mismatched:
            source = stats["rejected_from"]
            log.warning("%d packets in the last %gs from %s %s", mismatched,
                        ERROR_SUMMARY_INTERVAL, _hostport(*source) if source else "?",
                        "in clear: the peer has no --key-file" if self.keying else
                        "sealed: the peer has a --key-file and this side has none",
                        extra=_event("key_mismatch", packets=mismatched))

    # -------------------------------------------------------------- reports

    def snapshot(self) -> dict:
        """What `multitun status` and the metrics report."""
        cfg, engine = self.config, self.engine
        stats = engine.stats()
        paths = []
        for p in engine.paths():
            i = p["path"]
            if cfg.is_server:
                if not p["active"]:
                    continue
                local = _hostport(str(cfg.server_listen), cfg.port)
            else:
                local = _hostport(*self.socks[i].getsockname()[:2])
            health = self.health.get(i) or self._new_health()
            paths.append({
                "name": f"path{i}", "index": i, "local": local,
                "remote": _hostport(*p["remote"]) if p["remote"] else None,
                **health.as_dict(),
                **{k: p[k] for k in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes",
                                     "first_arrivals", "duplicates", "send_errors")},
                "last_error": os.strerror(p["last_errno"]) if p["last_errno"] else None,
                "udp_gso": p["udp_gso"],
            })
        tunnel_keys = ("tun_rx_packets", "tun_rx_bytes", "delivered", "delivered_bytes",
                       "duplicates", "too_old", "malformed", "wrong_session", "unknown_source",
                       "tun_write_errors", "auth_failed", "key_mismatch",
                       "no_key", "tun_gso_reads", "tun_gso_dropped", "gro_writes", "gro_coalesced")
        return {
            "version": __version__, "role": "server" if cfg.is_server else "client",
            "dev": self.dev, "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "session": f"{stats['session']:08x}",
            "peer_session": f"{stats['peer_session']:08x}" if stats["peer_session"] else None,
            "tunnel": {k: stats[k] for k in tunnel_keys},
            "security": self.keying.snapshot() if self.keying else {"keyed": False},
            "paths": paths,
        }


@contextlib.contextmanager
def cpu_latency_qos():
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


def _is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass
