"""One tunnel end: sets up the device and sockets, runs the engine, keeps time.

The compiled engine moves packets; this module does what happens a few times a
second: probes on every path with an endpoint (they are the keepalives that let
the server learn the client's paths before any data and keep NAT mappings open,
and they measure each path's health, kept in pathstate.py), hands probe replies
to that health and other control packets to the keying (keying.py, with
--key-file), publishes the snapshot that `multitun status` and the metrics
report from their own threads, and logs what changed. What only a client or
only a server does is in roles.py. Nothing here runs per packet.

The loop ends on SIGINT/SIGTERM, or when the engine raises OSError: an error
the data plane cannot go on after, said in one line before the process exits
with status 1.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import signal
import time

from . import wire
from ._fastpath import WAKE, Engine
from ._version import __version__
from .config import Config
from .device import TunDevice
from .keying import Keying
from .logfields import event, hostport
from .metrics import MetricsServer
from .paths import kernel_offloads
from .pathstate import PathStates
from .roles import role_for
from .status import StatusServer, snapshot
from .system import cpu_latency_qos, notify_systemd

log = logging.getLogger("multitun")

HOUSEKEEPING_INTERVAL = 1.0
# A path's send errors are summarised at most this often (never one line per packet).
ERROR_SUMMARY_INTERVAL = 5.0


def new_session() -> int:
    """A random non-zero 32-bit session id: a restarted peer is a new session."""
    return secrets.randbelow(0xFFFFFFFF) + 1


class Tunnel:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.role = role_for(config)
        self.stopping = False
        self.started = time.monotonic()
        self.probe_seq = 0
        self.states = PathStates(config)
        self.published: dict = {}
        self._seen_sessions = 0
        self._seen_rejections = (0, 0, 0)
        self._next_error_summary = 0.0
        self.keying: Keying | None = None

    def stop(self, signum: int = 0, frame: object = None) -> None:
        self.stopping = True

    def run(self) -> int:
        """Run until SIGINT/SIGTERM (0) or until the data plane fails (1)."""
        cfg, role = self.config, self.role
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
            gso, gro = kernel_offloads() if cfg.offload else (False, False)
            socks = role.open_sockets(gro, device.name)
            stack.callback(role.close)
            self.engine = Engine(
                device.fd, socks, role.server, new_session(), (wake_fd, *role.wake_fds()),
                gso=gso, busy_poll_us=cfg.effective_busy_poll_us, keyed=cfg.key is not None,
                vnet_hdr=device.vnet_hdr, stale_margin_us=int(cfg.stale_margin_ms * 1000))
            if cfg.key is not None:
                self.keying = role.keying(self.engine, cfg.key, cfg.cipher)
            role.start(self.engine, self.states)
            self._gso, self._wake_fd = gso, wake_fd
            self._publish()
            self.status.start()
            if cfg.metrics:
                metrics = MetricsServer(cfg.metrics[0], cfg.metrics[1], lambda: self.published)
                stack.callback(metrics.close)
            self._log_start(gso, gro, device)
            notify_systemd("READY=1")
            code = self._loop()
            notify_systemd("STOPPING=1")
            self._log_totals()
        return code

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

    # --------------------------------------------------------------- logging

    def _log_start(self, gso: bool, gro: bool, device: TunDevice) -> None:
        cfg = self.config
        addrs = ", ".join(str(a) for a in cfg.tun_addresses)
        log.info("multitun %s %s on %s (%s, mtu %d), session %08x", __version__,
                 self.role.name, self.dev, addrs, cfg.effective_mtu, self.engine.session)
        self.role.log_start()
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
            log.info("metrics on http://%s/metrics", hostport(*cfg.metrics))
        if self.keying:
            log.info("sealed under keys from a Noise_NNpsk0 handshake with the key file's "
                     "key; --cipher %s%s", self.keying.cipher,
                     f" (AES instructions here: {'yes' if self.keying.has_aes else 'no'})"
                     if self.keying.cipher == "auto" else "")
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
                 extra=event("stopped", **s))

    def _log_events(self) -> None:
        """Say what changed: a peer (re)started, what the role logs (endpoints,
        keys), a path refused UDP GSO."""
        stats, paths = self.engine.stats(), self.engine.paths()
        if stats["session_changes"] != self._seen_sessions:
            first = self._seen_sessions == 0
            log.info("peer %s session %08x", "started" if first else "restarted: new",
                     stats["peer_session"],
                     extra=event("peer_started" if first else "peer_restarted",
                                 session=f"{stats['peer_session']:08x}"))
            self._seen_sessions = stats["session_changes"]
        self.role.on_events(stats, paths, self.states)
        for p in paths:
            state, gso = self.states[p["path"]], (p["udp_gso"], p["udp_gso_max"])
            if not self._gso or gso == state.logged_gso:
                continue
            state.logged_gso = gso
            if not p["udp_gso"]:
                log.warning("path %d: refused a UDP GSO train (%s); sending datagrams one "
                            "by one on it", p["path"], os.strerror(p["last_errno"]),
                            extra=event("gso_refused", path=p["path"]))
            else:
                log.warning("path %d: refused a UDP GSO train of datagrams over %d bytes (%s): "
                            "its MTU is smaller; those go one by one, fragmented by the "
                            "kernel, shorter ones still in trains", p["path"],
                            p["udp_gso_max"], os.strerror(p["last_errno"]),
                            extra=event("gso_refused", path=p["path"],
                                        max_datagram=p["udp_gso_max"]))

    def _log_send_errors(self, paths: list[dict]) -> None:
        for p in paths:
            state = self.states[p["path"]]
            errors = p["send_errors"] - state.logged_send_errors
            if errors:
                log.warning("path %d: %d send errors in the last %gs (last: %s)", p["path"],
                            errors, ERROR_SUMMARY_INTERVAL, os.strerror(p["last_errno"]),
                            extra=event("send_errors", path=p["path"], count=errors))
                state.logged_send_errors = p["send_errors"]

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
                        ERROR_SUMMARY_INTERVAL, hostport(*source) if source else "?",
                        extra=event("auth_failed", packets=failed, handshakes=refused,
                                    source=hostport(*source) if source else None))
        if mismatched:
            source = stats["rejected_from"]
            log.warning("%d packets in the last %gs from %s %s", mismatched,
                        ERROR_SUMMARY_INTERVAL, hostport(*source) if source else "?",
                        "in clear: the peer has no --key-file" if self.keying else
                        "sealed: the peer has a --key-file and this side has none",
                        extra=event("key_mismatch", packets=mismatched))

    # ------------------------------------------------------------------ loop

    def _loop(self) -> int:
        """Until stopped (0), or until the data plane fails (1)."""
        engine, interval = self.engine, self.config.probe_interval
        now = time.monotonic()
        next_probe, next_housekeeping = now, now + HOUSEKEEPING_INTERVAL
        while not self.stopping:
            wait = max(0.0, min(next_probe, next_housekeeping) - time.monotonic())
            try:
                flags = engine.run(int(wait * 1000) + 1)
            except OSError as e:
                # An error the data plane cannot go on after (its TUN device
                # was deleted, say): said once, and the process exits.
                log.error("data plane stopped: %s", e.strerror or e,
                          extra=event("data_plane_stopped", errno=e.errno))
                return 1
            # Published when the engine says something changed (a peer, an
            # endpoint), else at least every probe interval and every second.
            publish = bool(flags & WAKE["event"])
            if publish:
                self._log_events()
            for control in engine.take_control():
                self._on_control(*control)
            if flags & WAKE["fd"]:
                _drain(self._wake_fd)
                self.role.on_wake()  # the kernel's interfaces changed, say
                publish = True
            now = time.monotonic()
            if now >= next_probe:
                if self.keying:
                    self.keying.tick(now)
                self._probe()
                next_probe = max(next_probe + interval, now)
                publish = True
            if now >= next_housekeeping:
                self._housekeeping(now)
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
                publish = True
            if publish:
                self._publish()
        return 0

    def _probe(self) -> None:
        engine = self.engine
        self.probe_seq += 1
        now_ns = time.monotonic_ns()
        for i, state in self.states.items():
            if state.health.tick(now_ns):
                log.warning("path %d down: no probe answered for %.1fs", i,
                            (now_ns - state.health.last_answer_ns) / 1e9,
                            extra=event("path_down", path=i))
            self._shape(i, now_ns)
        for p in engine.paths():
            if p["active"]:
                i = p["path"]
                # ENOKEY: sealed, and no handshake yet; nothing was sent.
                if engine.send_probe(i, self.probe_seq, now_ns) != errno.ENOKEY:
                    self.states[i].health.sent(self.probe_seq, now_ns)
                    self.states[i].capacity.sent(self.probe_seq, now_ns)

    def _on_control(self, path: int, rx_ns: int, datagram: bytes, source: tuple | None,
                    reply_to: object) -> None:
        if wire.peek_header(datagram).type == wire.PacketType.PROBE_REPLY:
            self._on_probe_reply(path, rx_ns, datagram)
        elif self.keying and self.keying.on_control(path, datagram, source, reply_to,
                                                    time.monotonic()):
            self._probe()  # the first authentic packets under the new keys, on every path

    def _on_probe_reply(self, path: int, rx_ns: int, datagram: bytes) -> None:
        timestamp_ns, number = wire.probe_payload(datagram)
        rtt_ns = rx_ns - timestamp_ns
        log.debug("path %d: probe %d answered in %.0f us", path, number, rtt_ns / 1000)
        state = self.states[path]
        if state.health.answered(number, rtt_ns, rx_ns):
            log.info("path %d up: round trip %.3f ms", path, rtt_ns / 1e6,
                     extra=event("path_up", path=path, rtt_ms=round(rtt_ns / 1e6, 3)))
        feedback = wire.probe_feedback(datagram)
        if feedback is not None:
            state.capacity.feedback(number, rtt_ns, *feedback, held=self.engine.held(path))
        self._shape(path, rx_ns)

    def _shape(self, path: int, now_ns: int) -> None:
        """Tell the engine how to pace the path, and its delay: none unless
        it answers now, for a path that went silent must be nobody's reason
        to drop a copy as stale (at every probe, so within a few intervals)."""
        state = self.states[path]
        delay = state.capacity.delay_ns if state.health.answering(now_ns) else 0
        self.engine.shape(path, state.capacity.pacing_rate, delay)

    def _housekeeping(self, now: float) -> None:
        paths = self.engine.paths()
        self.role.housekeeping(paths, self.states)
        if now >= self._next_error_summary:
            self._log_send_errors(paths)
            self._log_rejections()
            self._next_error_summary = now + ERROR_SUMMARY_INTERVAL

    def _publish(self) -> None:
        """What `multitun status` answers and the metrics report until the next
        publish: their threads read only this, never the engine."""
        self.published = snapshot(self.role, self.dev, self.started, self.engine.stats(),
                                  self.engine.paths(), self.states, self.keying)
        self.status.publish(self.published)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass
