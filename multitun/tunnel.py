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
import functools
import logging
import os
import secrets
import signal
import time

from . import wire
from ._fastpath import WAKE, Engine
from ._version import __version__
from .config import MAX_PEERS, Config
from .device import TunDevice
from .errors import ConfigError
from .handshake_thread import HandshakeThread
from .logfields import event, hostport
from .metrics import MetricsServer
from .paths import kernel_offloads
from .peerconfig import read_peers
from .peers import Peer, Peers
from .roles import role_for
from .status import StatusServer, snapshot
from .system import cpu_latency_qos, fds_for, notify_systemd

log = logging.getLogger("multitun")

HOUSEKEEPING_INTERVAL = 1.0
# A fleet's probes go a slice of this many peers at a time, the slices
# spread over the probe interval: the loop that forwards packets is never
# away for all of them at once.
PROBE_SLICE = 16
# A fleet server publishes its status (every peer's) at most this often.
FLEET_PUBLISH_INTERVAL = 1.0
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
        self.published: dict = {}
        self._seen_rejections = (0, 0)
        self._seen_unknown_key = 0
        self._turn = 0
        self._next_error_summary = 0.0
        self._reload = False
        # A server's, when sealed: where its handshake cryptography runs.
        self.handshakes: HandshakeThread | None = None

    def stop(self, signum: int = 0, frame: object = None) -> None:
        self.stopping = True

    def reload(self, signum: int = 0, frame: object = None) -> None:
        self._reload = True

    def run(self) -> int:
        """Run until SIGINT/SIGTERM (0) or until the data plane fails (1)."""
        cfg, role = self.config, self.role
        with contextlib.ExitStack() as stack:
            wake_fd = self._install_signals(stack)
            if cfg.low_latency:
                stack.enter_context(cpu_latency_qos())
            fds_for(len(cfg.peers))
            device = TunDevice(cfg.dev, offload=cfg.offload)
            stack.callback(device.close)
            self.dev = device.name
            device.configure(cfg.tun_addresses, cfg.effective_mtu)
            self.status = StatusServer(device.name)
            stack.callback(self.status.close)
            gso, gro = kernel_offloads() if cfg.offload else (False, False)
            socks = role.open_sockets(gro, device.name)
            stack.callback(role.close)
            keying = role.keying
            if role.server and cfg.keyed:
                # A server's handshake cryptography runs on a thread of its
                # own; the engine wakes on its results.
                self.handshakes = HandshakeThread()
                stack.callback(self.handshakes.close)
                keying = functools.partial(keying, thread=self.handshakes)
            self.engine = Engine(
                device.fd, socks, role.server, new_session(),
                (wake_fd, *role.wake_fds(), *([self.handshakes.fd] if self.handshakes else [])),
                gso=gso, busy_poll_us=cfg.effective_busy_poll_us, keyed=cfg.keyed,
                vnet_hdr=device.vnet_hdr, stale_margin_us=int(cfg.stale_margin_ms * 1000),
                fleet=bool(cfg.peers), share_cpu=cfg.low_latency)
            self.peers = Peers(cfg, self.engine, keying)
            role.start(self.engine, self.peers)
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
        if self.config.peers_file:
            # A fleet server whose peers are in its config file reads them
            # again on SIGHUP; anything else keeps SIGHUP's default (it ends).
            stack.callback(signal.signal, signal.SIGHUP,
                           signal.signal(signal.SIGHUP, self.reload))
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
        if cfg.peers:
            log.info("a fleet of %d peers (%s), each sealed under keys from a Noise_NNpsk0 "
                     "handshake with its own key; --cipher %s", len(cfg.peers),
                     ", ".join(p.name for p in cfg.peers), cfg.cipher)
        elif cfg.key is not None:
            keying = self.peers[0].keying
            log.info("sealed under keys from a Noise_NNpsk0 handshake with the key file's "
                     "key; --cipher %s%s", keying.cipher,
                     f" (AES instructions here: {'yes' if keying.has_aes else 'no'})"
                     if keying.cipher == "auto" else "")
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
        stats = self.engine.stats()
        for peer in self.peers:
            paths = self.engine.paths(peer.index)
            if not self.peers.fleet and stats["session_changes"] != peer.seen_sessions:
                first = peer.seen_sessions == 0
                log.info("peer %s session %08x", "started" if first else "restarted: new",
                         stats["peer_session"],
                         extra=event("peer_started" if first else "peer_restarted",
                                     session=f"{stats['peer_session']:08x}"))
                peer.seen_sessions = stats["session_changes"]
            self.role.on_events(peer, paths)
            for p in paths:
                self._log_gso(peer, p)

    def _log_gso(self, peer: Peer, p: dict) -> None:
        state, gso = peer.states[p["path"]], (p["udp_gso"], p["udp_gso_max"])
        if not self._gso or gso == state.logged_gso:
            return
        state.logged_gso = gso
        if not p["udp_gso"]:
            log.warning(peer.said("path %d: refused a UDP GSO train (%s); sending datagrams "
                                  "one by one on it"), p["path"], os.strerror(p["last_errno"]),
                        extra=peer.fields("gso_refused", path=p["path"]))
        else:
            log.warning(peer.said("path %d: refused a UDP GSO train of datagrams over %d bytes "
                                  "(%s): its MTU is smaller; those go one by one, fragmented "
                                  "by the kernel, shorter ones still in trains"), p["path"],
                        p["udp_gso_max"], os.strerror(p["last_errno"]),
                        extra=peer.fields("gso_refused", path=p["path"],
                                          max_datagram=p["udp_gso_max"]))

    def _log_send_errors(self, peer: Peer, paths: list[dict]) -> None:
        for p in paths:
            state = peer.states[p["path"]]
            errors = p["send_errors"] - state.logged_send_errors
            if errors:
                log.warning(peer.said("path %d: %d send errors in the last %gs (last: %s)"),
                            p["path"], errors, ERROR_SUMMARY_INTERVAL,
                            os.strerror(p["last_errno"]),
                            extra=peer.fields("send_errors", path=p["path"], count=errors))
                state.logged_send_errors = p["send_errors"]

    def _log_rejections(self) -> None:
        """One line per summary interval when packets fail authentication,
        handshakes fail it (or, on a fleet server, claim a key no peer has),
        or packets come from a peer of the other mode, naming the last
        sender."""
        stats = self.engine.stats()
        refused, source = self.peers.unknown_key - self._seen_unknown_key, \
            self.peers.unknown_key_source
        self._seen_unknown_key = self.peers.unknown_key
        for peer in self.peers:
            if peer.keying and peer.keying.rejected.auth_failed != peer.seen_refused:
                refused += peer.keying.rejected.auth_failed - peer.seen_refused
                peer.seen_refused = peer.keying.rejected.auth_failed
                source = peer.keying.rejected.last_source
        counts = (stats["auth_failed"], stats["key_mismatch"])
        failed, mismatched = (c - seen for c, seen in zip(counts, self._seen_rejections))
        self._seen_rejections = counts
        if failed or refused:
            source = source if refused else stats["rejected_from"]
            log.warning("authentication failing: %d packets and %d handshakes in the last %gs, "
                        "last from %s (a sender without our key)", failed, refused,
                        ERROR_SUMMARY_INTERVAL, hostport(*source) if source else "?",
                        extra=event("auth_failed", packets=failed, handshakes=refused,
                                    source=hostport(*source) if source else None))
        if mismatched:
            source = stats["rejected_from"]
            log.warning("%d packets in the last %gs from %s %s", mismatched,
                        ERROR_SUMMARY_INTERVAL, hostport(*source) if source else "?",
                        "in clear: the peer has no --key-file" if self.config.keyed else
                        "sealed: the peer has a --key-file and this side has none",
                        extra=event("key_mismatch", packets=mismatched))

    # ------------------------------------------------------------------ loop

    def _loop(self) -> int:
        """Until stopped (0), or until the data plane fails (1)."""
        engine = self.engine
        now = time.monotonic()
        next_probe, next_housekeeping = now, now + HOUSEKEEPING_INTERVAL
        published_at, want_publish = 0.0, False
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
            # endpoint), else at least every probe interval and every second
            # (a fleet: at most every FLEET_PUBLISH_INTERVAL).
            publish = bool(flags & WAKE["event"])
            if publish:
                self._log_events()
            for control in engine.take_control():
                self._on_control(*control)
            if flags & WAKE["fd"]:
                _drain(self._wake_fd)
                if self.handshakes is not None:
                    self.handshakes.finish()  # handshakes answered
                self.role.on_wake()  # the kernel's interfaces changed, say
                publish = True
            if self._reload:
                self._reload = False
                self._reload_peers()
                publish = True
            now = time.monotonic()
            if now >= next_probe:
                next_probe = max(next_probe + self._probe_turn(now), now)
                publish = True
            if now >= next_housekeeping:
                self._housekeeping(now)
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
                publish = True
            want_publish |= publish
            if want_publish and (not self.peers.fleet
                                 or now - published_at >= FLEET_PUBLISH_INTERVAL):
                self._publish()
                published_at, want_publish = now, False
        return 0

    def _probe_turn(self, now: float) -> float:
        """The keying's timers and the probes of this turn's slice of the
        peers (all of them, unless a fleet has more than PROBE_SLICE);
        the seconds until the next turn."""
        peers = list(self.peers)
        slices = max(1, -(-len(peers) // PROBE_SLICE))
        turn = peers[self._turn % slices::slices]
        self._turn += 1
        for peer in turn:
            if peer.keying:
                peer.keying.tick(now)
        self._probe(turn)
        return self.config.probe_interval / slices

    def _reload_peers(self) -> None:
        """SIGHUP: read the config file's peers again (only a fleet server
        whose peers are in its file takes the signal). A set that does not
        pass the checks is refused in one line, and the old one stays."""
        cfg = self.config
        try:
            specs = read_peers(cfg.peers_file, MAX_PEERS)
            if not specs:
                raise ConfigError(f"{cfg.peers_file}: no [[peer]] tables left")
        except ConfigError as e:
            log.error("SIGHUP: reload refused, the peers stay as they were: %s", e,
                      extra=event("reload_refused", error=str(e)))
            return
        added, removed, changed = self.peers.apply(specs)
        log.info("SIGHUP: peers reloaded: %d added (%s), %d removed (%s), %d changed (%s), "
                 "%d in all", len(added), ", ".join(added) or "-", len(removed),
                 ", ".join(removed) or "-", len(changed), ", ".join(changed) or "-",
                 len(specs), extra=event("peers_reloaded", added=added, removed=removed,
                                         changed=changed))

    def _probe(self, peers: list[Peer]) -> None:
        """Probe every path of these peers that has an endpoint; before
        that, the paths' health and pacing follow the time."""
        engine = self.engine
        self.probe_seq += 1
        now_ns = time.monotonic_ns()
        for peer in peers:
            for i, state in peer.states.items():
                if state.health.tick(now_ns):
                    log.warning(peer.said("path %d down: no probe answered for %.1fs"), i,
                                (now_ns - state.health.last_answer_ns) / 1e9,
                                extra=peer.fields("path_down", path=i))
                self._shape(peer, i, now_ns)
            for p in engine.paths(peer.index):
                if p["active"]:
                    i = p["path"]
                    # ENOKEY: sealed, and no handshake yet; nothing was sent.
                    if engine.send_probe(i, self.probe_seq, now_ns, peer.index) != errno.ENOKEY:
                        peer.states[i].health.sent(self.probe_seq, now_ns)
                        peer.states[i].capacity.sent(self.probe_seq, now_ns)

    def _on_control(self, index: int, path: int, rx_ns: int, datagram: bytes,
                    source: tuple | None, reply_to: object) -> None:
        if wire.peek_header(datagram).type == wire.PacketType.PROBE_REPLY:
            self._on_probe_reply(self.peers[index], path, rx_ns, datagram)
            return
        # A handshake. Index -1: a first message to a fleet server, whose peer
        # is the one whose key it claims.
        peer = self.peers[index] if index >= 0 else self.peers.for_handshake(datagram, source)
        if peer is not None and peer.keying and peer.keying.on_control(
                path, datagram, source, reply_to, time.monotonic()):
            self._probe([peer])  # the first authentic packets under the new keys, on every path

    def _on_probe_reply(self, peer: Peer, path: int, rx_ns: int, datagram: bytes) -> None:
        timestamp_ns, number = wire.probe_payload(datagram)
        rtt_ns = rx_ns - timestamp_ns
        log.debug(peer.said("path %d: probe %d answered in %.0f us"), path, number,
                  rtt_ns / 1000)
        state = peer.states[path]
        if state.health.answered(number, rtt_ns, rx_ns):
            log.info(peer.said("path %d up: round trip %.3f ms"), path, rtt_ns / 1e6,
                     extra=peer.fields("path_up", path=path, rtt_ms=round(rtt_ns / 1e6, 3)))
        feedback = wire.probe_feedback(datagram)
        if feedback is not None:
            state.capacity.feedback(number, rtt_ns, *feedback,
                                    held=self.engine.held(path, peer.index))
        self._shape(peer, path, rx_ns)

    def _shape(self, peer: Peer, path: int, now_ns: int) -> None:
        """Tell the engine how to pace the path, and its delay: none unless
        it answers now, for a path that went silent must be nobody's reason
        to drop a copy as stale (at every probe, so within a few intervals)."""
        state = peer.states[path]
        delay = state.capacity.delay_ns if state.health.answering(now_ns) else 0
        try:
            self.engine.shape(path, state.capacity.pacing_rate, delay, peer.index)
        except OSError as e:
            # No timer for the peer's pacing (out of file descriptors): the
            # path goes unpaced, as before this version; said once a path.
            if not state.logged_unpaced:
                state.logged_unpaced = True
                log.error(peer.said("path %d cannot be paced: %s"), path, e.strerror,
                          extra=peer.fields("pacing_failed", path=path))

    def _housekeeping(self, now: float) -> None:
        summary = now >= self._next_error_summary
        for peer in self.peers:
            paths = self.engine.paths(peer.index)
            self.role.housekeeping(peer, paths)
            if summary:
                self._log_send_errors(peer, paths)
        if summary:
            self._log_rejections()
            self._next_error_summary = now + ERROR_SUMMARY_INTERVAL

    def _publish(self) -> None:
        """What `multitun status` answers and the metrics report until the next
        publish: their threads read only this, never the engine."""
        self.published = snapshot(self.role, self.dev, self.started, self.engine, self.peers)
        self.status.publish(self.published)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass
