"""What a client and a server do differently, one class each, picked once at
start (``role_for``).

The client has one connected socket per path (clientpaths.py: they follow
its interfaces), reconnects a path that had no route at start, and makes the
handshakes. The server has one socket on its listening address and learns
its paths' endpoints from the client's packets (logging each one), forgets
an endpoint silent for --timeout, and answers handshakes. Everything else
about a path is the same on both ends (multitun/tunnel.py).
"""

from __future__ import annotations

import logging
import time

from ._fastpath import Engine
from .config import Config
from .keying import ClientKeying, Keying, ServerKeying
from .logfields import hostport
from .clientpaths import ClientPaths
from .paths import open_server_socket
from .peers import Peer, Peers

log = logging.getLogger("multitun")


class ClientRole:
    name = "client"
    server = False  # for the engine: a client's paths are its sockets
    keying: type[Keying] = ClientKeying

    def __init__(self, config: Config) -> None:
        self.config = config

    def open_sockets(self, gro: bool, tun: str) -> list[int]:
        """The paths' sockets' fds now, by path (-1: waiting for its interface).
        ``tun``: the tunnel's own device, never a path."""
        self.paths = ClientPaths(self.config, gro, tun)
        return self.paths.open()

    def wake_fds(self) -> tuple[int, ...]:
        return (self.paths.watch.fileno(),)

    def start(self, engine: Engine, peers: Peers) -> None:
        self.paths.start(engine, peers[0].states)

    def log_start(self) -> None:
        self.paths.log_start()

    def on_wake(self) -> None:
        self.paths.follow()

    def listed(self, engine_paths: dict[int, dict]) -> list[int]:
        """The paths `multitun status` lists: every path the client has,
        waiting ones too; a pattern's path whose interface went is gone."""
        return sorted(self.paths.paths)

    def describe(self, path: int) -> dict:
        p = self.paths.paths.get(path)
        return {"local": self.paths.local(path), **(p.describe() if p else {})}

    def on_events(self, peer: Peer, paths: list[dict]) -> None:
        """The engine said something changed. The client logs its handshakes
        itself (keying.py) and knows its endpoints: nothing of its own."""

    def housekeeping(self, peer: Peer, paths: list[dict]) -> None:
        self.paths.reconnect()

    def close(self) -> None:
        self.paths.close()


class ServerRole:
    name = "server"
    server = True  # for the engine: one socket, endpoints learned per path
    keying: type[Keying] = ServerKeying

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listening = hostport(str(config.server_listen), config.port)
        self.timeout_ns = int(config.timeout * 1e9)

    def open_sockets(self, gro: bool, tun: str) -> list[int]:
        self.sock = open_server_socket(self.config.server_listen, self.config.port, gro)
        return [self.sock.fileno()]

    def wake_fds(self) -> tuple[int, ...]:
        return ()

    def start(self, engine: Engine, peers: Peers) -> None:
        self.engine = engine

    def on_wake(self) -> None:
        """Its socket is on the listening address, whatever the interfaces do."""

    def close(self) -> None:
        self.sock.close()

    def log_start(self) -> None:
        log.info("listening on %s", self.listening)

    def listed(self, engine_paths: dict[int, dict]) -> list[int]:
        """Only paths with an endpoint now: a forgotten one is not a path."""
        return sorted(i for i, p in engine_paths.items() if p["active"])

    def describe(self, path: int) -> dict:
        return {"local": self.listening}

    def on_events(self, peer: Peer, paths: list[dict]) -> None:
        """Log new keys the client confirmed and endpoints learned or moved."""
        keys = self.engine.peer_stats(peer.index)
        if keys["key_changes"] != peer.seen_key_changes:
            log.log(logging.INFO if peer.seen_key_changes == 0 else logging.DEBUG,
                    peer.said("client confirmed keys %08x"), keys["key_id"],
                    extra=peer.fields("keys_confirmed", key_id=f"{keys['key_id']:08x}"))
            peer.seen_key_changes = keys["key_changes"]
            peer.keys_confirmed_at = time.monotonic()
        for p in paths:
            state = peer.states[p["path"]]
            if p["remote"] and p["remote"] != state.logged_remote:
                log.info(peer.said("path %d: peer endpoint %s"), p["path"],
                         hostport(*p["remote"]),
                         extra=peer.fields("endpoint_learned", path=p["path"],
                                           remote=hostport(*p["remote"])))
            state.logged_remote = p["remote"]

    def housekeeping(self, peer: Peer, paths: list[dict]) -> None:
        """Forget endpoints silent for --timeout: the client moved or left."""
        now_ns = time.monotonic_ns()
        for p in paths:
            i = p["path"]
            if p["active"] and now_ns - p["last_rx_ns"] > self.timeout_ns:
                self.engine.forget(i, peer.index)
                peer.states[i].forget_endpoint()
                log.info(peer.said("path %d: forgot %s after %gs of silence"), i,
                         hostport(*p["remote"]), self.config.timeout,
                         extra=peer.fields("endpoint_forgotten", path=i))


def role_for(config: Config) -> ClientRole | ServerRole:
    return ServerRole(config) if config.is_server else ClientRole(config)

